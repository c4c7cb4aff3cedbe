// Real NBD clients against NbdServer serving DeviceExport: nbdinfo (every advertised flag and
// size), nbdcopy (multi-connection copies in and out, compared byte for byte), qemu-io
// (unaligned and sub-4 KiB I/O through qemu's read-modify-write, write-zeroes, discard) and
// fio's nbd engine (several jobs, crc32c verification).
//
// The tools come from Debian packages (libnbd-bin, qemu-utils, fio); a missing tool fails its
// test with the package name, it is never skipped. The server runs in this process, so tools
// are run asynchronously: a blocking spawn would stall the server they talk to.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { DeviceExport } from '../../../src/device/device_export.js';
import { FileDevice } from '../../../src/device/file_device.js';
import { MemoryDevice } from '../../../src/device/memory_device.js';
import type { NbdServerOptions } from '../../../src/nbd/server/server.js';
import { MiB } from '../../../src/lib/units.js';
import { patternBytes } from '../../helpers/bytes.js';
import { tempDir } from '../../helpers/files.js';
import { startServer, type TestServer } from '../../helpers/nbd_server.js';
import { fioVerifyJobs, nbdcopy, qemuIo, requireFioNbd, requireTool, runTool, uriFor } from '../../helpers/tools.js';

const deviceBytes = 64 * MiB;

async function memoryServer(t: TestContext, options: Partial<NbdServerOptions> = {}): Promise<{ srv: TestServer; device: MemoryDevice }> {
  const device = new MemoryDevice(patternBytes(deviceBytes, 11));
  const srv = await startServer({ description: 'pcache interop test', ...options, export: new DeviceExport(device) });
  t.after(() => srv.stop());
  return { srv, device };
}

interface NbdinfoExport {
  'export-name': string;
  description?: string;
  'export-size': number;
  contexts?: string[];
  is_rotational: boolean;
  is_read_only: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
}

interface NbdinfoReport {
  protocol: string;
  TLS: boolean;
  structured: boolean;
  exports: NbdinfoExport[];
}

async function nbdinfo(uri: string): Promise<NbdinfoReport> {
  const result = await runTool('nbdinfo', ['--json', uri]);
  assert.equal(result.code, 0, `nbdinfo failed: ${result.stderr}`);
  return JSON.parse(result.stdout) as NbdinfoReport;
}

describe('nbdinfo', () => {
  it('reports the size, the block sizes and every flag of a writable export', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const { srv } = await memoryServer(t);
    const report = await nbdinfo(uriFor(srv.path, 'pcache'));
    assert.equal(report.protocol, 'newstyle-fixed');
    assert.equal(report.TLS, false);
    assert.equal(report.structured, true);
    assert.equal(report.exports.length, 1);
    const info = report.exports[0];
    assert.ok(info !== undefined);
    assert.deepEqual(
      {
        name: info['export-name'], description: info.description, size: info['export-size'], contexts: info.contexts,
        rotational: info.is_rotational, readOnly: info.is_read_only, cache: info.can_cache, df: info.can_df,
        fastZero: info.can_fast_zero, flush: info.can_flush, fua: info.can_fua, multiConn: info.can_multi_conn,
        trim: info.can_trim, zero: info.can_zero, minimum: info.block_size_minimum, preferred: info.block_size_preferred,
        maximum: info.block_size_maximum,
      },
      {
        name: 'pcache', description: 'pcache interop test', size: deviceBytes, contexts: ['base:allocation'],
        rotational: false, readOnly: false, cache: true, df: true, fastZero: true, flush: true, fua: true, multiConn: true,
        trim: true, zero: true, minimum: 512, preferred: 4096, maximum: 32 * MiB,
      },
    );
  });

  it('reports a read-only export without trim or zero', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const { srv } = await memoryServer(t, { readOnly: true });
    const info = (await nbdinfo(uriFor(srv.path))).exports[0];
    assert.ok(info !== undefined);
    assert.deepEqual(
      [info.is_read_only, info.can_trim, info.can_zero, info.can_fast_zero, info.can_flush, info.can_multi_conn],
      [true, false, false, false, true, true],
    );
  });

  it('falls back to simple replies when structured replies are switched off', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const { srv } = await memoryServer(t, { offerStructuredReplies: false });
    const report = await nbdinfo(uriFor(srv.path));
    assert.equal(report.structured, false);
    const info = report.exports[0];
    assert.ok(info !== undefined);
    assert.equal(info.can_df, false, 'DF is only advertised with structured replies');
    assert.deepEqual(info.contexts ?? [], []);
  });

  it('maps the export through BLOCK_STATUS and lists it', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const { srv } = await memoryServer(t);
    const map = await runTool('nbdinfo', ['--map', '--json', uriFor(srv.path)]);
    assert.equal(map.code, 0, map.stderr);
    assert.deepEqual(JSON.parse(map.stdout), [{ offset: 0, length: deviceBytes, type: 0, description: 'data' }]);
    const list = await runTool('nbdinfo', ['--list', '--json', uriFor(srv.path)]);
    assert.equal(list.code, 0, list.stderr);
    const listed = JSON.parse(list.stdout) as NbdinfoReport;
    assert.deepEqual(listed.exports.map((e) => [e['export-name'], e.description]), [['pcache', 'pcache interop test']]);
  });
});

describe('nbdcopy', () => {
  it('copies in and out over several connections, byte for byte (file-backed, asynchronous I/O)', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const backing = await startFileServer(t);
    const source = path.join(backing.srv.dir, 'source.bin');
    const sourceBytes = patternBytes(24 * MiB, 21);
    fs.writeFileSync(source, sourceBytes);
    const connectionsBefore = backing.srv.server.stats().connectionsTotal;
    await nbdcopy(['-C', '4', '-T', '4', '--flush', source, uriFor(backing.srv.path)]);
    assert.ok(backing.srv.server.stats().connectionsTotal - connectionsBefore >= 4, 'nbdcopy used multi-conn');
    const stored = fs.readFileSync(backing.file);
    assert.ok(stored.subarray(0, sourceBytes.length).equals(sourceBytes), 'copied data landed intact');

    const out = path.join(backing.srv.dir, 'out.bin');
    await nbdcopy(['-C', '4', '-T', '4', uriFor(backing.srv.path), out]);
    assert.ok(fs.readFileSync(out).equals(stored), 'the copy out equals the export byte for byte');
  });
});

async function startFileServer(t: TestContext): Promise<{ srv: TestServer; file: string }> {
  const dir = tempDir(t, 'pcache-nbd-file-');
  const file = path.join(dir, 'backing.img');
  fs.writeFileSync(file, patternBytes(deviceBytes, 31));
  const device = await FileDevice.open(file);
  t.after(() => device.close());
  const srv = await startServer({ export: new DeviceExport(device) });
  t.after(() => srv.stop());
  return { srv, file };
}

describe('qemu-io', () => {
  it('does unaligned and sub-4 KiB I/O, write-zeroes and discard correctly', async (t) => {
    requireTool('qemu-io', 'qemu-utils');
    const { srv, device } = await memoryServer(t);
    const expected = Buffer.from(device.bytes);
    const commands: [string, (model: Buffer) => void][] = [
      ['write -P 0xab 100 3000', (m) => m.fill(0xab, 100, 3100)],
      ['write -P 0xcd 5000 100', (m) => m.fill(0xcd, 5000, 5100)],
      ['write -P 0x5a 1048575 2', (m) => m.fill(0x5a, 1048575, 1048577)],
      ['write -z 65536 8192', (m) => m.fill(0, 65536, 73728)],
      ['write -z 70000 1000', (m) => m.fill(0, 70000, 71000)],
      ['discard 131072 65536', (m) => m.fill(0, 131072, 196608)],
      ['write -P 0x11 200000 40000', (m) => m.fill(0x11, 200000, 240000)],
      ['read -P 0xab 100 3000', () => undefined],
      ['read -P 0xcd 5000 100', () => undefined],
      ['read -P 0 65536 8192', () => undefined],
      ['read -P 0x11 200000 40000', () => undefined],
    ];
    for (const [, apply] of commands) apply(expected);
    const result = await qemuIo(uriFor(srv.path), commands.map(([command]) => command));
    assert.equal(result.stdout.match(/^read /gm)?.length, 4, result.stdout);
    assert.ok(Buffer.from(device.bytes).equals(expected), 'the device holds exactly what qemu-io wrote, nothing else');
  });
});

describe('fio (nbd engine)', () => {
  it('runs several verifying jobs at depth without a single verification error', async (t) => {
    await requireFioNbd();
    const { srv, device } = await memoryServer(t);
    const before = Buffer.from(device.bytes.subarray(0, 32 * MiB));
    const jobs = 4;
    await fioVerifyJobs(uriFor(srv.path), jobs, 'pcache-nbd');
    assert.ok(srv.server.stats().connectionsTotal >= jobs, 'one connection per job');
    assert.ok(!Buffer.from(device.bytes.subarray(0, 32 * MiB)).equals(before), 'fio wrote through the server');
  });
});
