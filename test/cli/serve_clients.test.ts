// Real NBD clients against `pcache serve` (the real command, a cache file in front of a
// backing file): nbdinfo (size and every flag), nbdcopy (multi-connection copies in and out,
// byte for byte), qemu-io (sub-4 KiB and unaligned I/O, write-zeroes, discard, checked against
// a model) and fio's nbd engine (several verifying jobs). After each, `pcache drain` must leave
// the backing file equal to the model: the cache wrote back exactly what the clients wrote.
//
// The clients come from Debian packages (libnbd-bin, qemu-utils, fio); a missing one fails
// its test naming the package, it is never skipped.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { MiB } from '../../src/lib/units.js';
import { patternBytes } from '../helpers/bytes.js';
import { tempDir } from '../helpers/files.js';
import { runCli, type ServeProcess, startServe } from '../helpers/pcache.js';
import { fioVerifyJobs, nbdcopy, qemuIo, requireFioNbd, requireTool, runTool, uriFor } from '../helpers/tools.js';

const backingBytes = 64 * MiB;

interface Rig {
  readonly dir: string;
  readonly socket: string;
  readonly control: string;
  readonly backing: string;
  readonly server: ServeProcess;
  /** What the export must hold: the backing file's first contents, then every client write. */
  readonly model: Buffer;
}

async function serveRig(t: TestContext, extra: string[] = []): Promise<Rig> {
  const dir = tempDir(t);
  const backing = path.join(dir, 'backing.img');
  const model = patternBytes(backingBytes, 41);
  fs.writeFileSync(backing, model);
  const socket = path.join(dir, 'nbd.sock');
  const control = path.join(dir, 'control.sock');
  const server = await startServe(t, ['--cache', path.join(dir, 'cache.img'), '--cache-size', '256M', '--backing', backing, '--socket', socket, '--control', control, ...extra], dir);
  return { dir, socket, control, backing, server, model };
}

/** Drains through the control socket, then checks that the backing file equals the model. */
async function assertBackingMatches(rig: Rig): Promise<void> {
  const drained = await runCli(['drain', '--control', rig.control]);
  assert.equal(drained.code, 0, drained.stderr);
  assert.match(drained.stdout, /^drained in [\d.]+ s/);
  assert.ok(fs.readFileSync(rig.backing).equals(rig.model), 'after the drain the backing file holds exactly what the clients wrote');
}

interface NbdinfoExport {
  'export-name': string;
  description: string;
  'export-size': number;
  contexts: string[];
  [flag: `is_${string}` | `can_${string}`]: boolean;
  block_size_minimum: number;
  block_size_preferred: number;
  block_size_maximum: number;
}

describe('nbdinfo against pcache serve', () => {
  it('sees the backing size, the block sizes and every flag, under the export name and the empty name', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const rig = await serveRig(t);
    for (const name of ['pcache', '']) {
      const result = await runTool('nbdinfo', ['--json', uriFor(rig.socket, name)]);
      assert.equal(result.code, 0, result.stderr);
      const report = JSON.parse(result.stdout) as { protocol: string; TLS: boolean; structured: boolean; exports: NbdinfoExport[] };
      assert.deepEqual([report.protocol, report.TLS, report.structured, report.exports.length], ['newstyle-fixed', false, true, 1]);
      const info = report.exports[0];
      assert.ok(info !== undefined);
      assert.equal(info['export-name'], 'pcache', 'the server reports its canonical name, whichever name was asked for');
      assert.equal(info['export-size'], backingBytes);
      assert.match(info.description, /backing\.img cached on .*cache\.img/);
      assert.deepEqual(info.contexts, ['base:allocation']);
      assert.deepEqual(
        [info.is_rotational, info.is_read_only, info.can_cache, info.can_df, info.can_fast_zero, info.can_flush, info.can_fua, info.can_multi_conn, info.can_trim, info.can_zero],
        [false, false, true, true, true, true, true, true, true, true],
        'is_rotational is_read_only can_cache can_df can_fast_zero can_flush can_fua can_multi_conn can_trim can_zero',
      );
      assert.deepEqual([info.block_size_minimum, info.block_size_preferred, info.block_size_maximum], [512, 4096, 32 * MiB]);
    }
  });

  it('sees a --read-only export as read-only, without trim or zero', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const dir = tempDir(t);
    const backing = path.join(dir, 'backing.img');
    fs.writeFileSync(backing, Buffer.alloc(8 * MiB));
    const cache = path.join(dir, 'cache.img');
    const formatted = await runCli(['format', '--cache', cache, '--cache-size', '8M', '--segment-size', '1M', '--backing', backing]);
    assert.equal(formatted.code, 0, formatted.stderr);
    const before = fs.readFileSync(cache);
    const socket = path.join(dir, 'ro.sock');
    const server = await startServe(t, ['--cache', cache, '--backing', backing, '--socket', socket, '--read-only'], dir);
    const result = await runTool('nbdinfo', ['--json', uriFor(socket)]);
    assert.equal(result.code, 0, result.stderr);
    const info = (JSON.parse(result.stdout) as { exports: NbdinfoExport[] }).exports[0];
    assert.ok(info !== undefined);
    assert.deepEqual([info.is_read_only, info.can_trim, info.can_zero, info.can_fast_zero], [true, false, false, false]);
    const write = await runTool('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4096', uriFor(socket)]);
    assert.match(write.stdout + write.stderr, /Operation not permitted|read-only|Permission denied/i);
    assert.equal(await server.stop(), 0);
    assert.ok(fs.readFileSync(cache).equals(before), 'nothing was written to a cache served read-only');
  });
});

describe('nbdcopy against pcache serve', () => {
  it('copies in and out over four connections, byte for byte, and drains to the backing file', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const rig = await serveRig(t);
    const source = path.join(rig.dir, 'source.bin');
    const data = patternBytes(24 * MiB, 43);
    fs.writeFileSync(source, data);
    await nbdcopy(['-C', '4', '-T', '4', '--flush', source, uriFor(rig.socket)]);
    data.copy(rig.model, 0);
    const out = path.join(rig.dir, 'out.bin');
    await nbdcopy(['-C', '4', '-T', '4', uriFor(rig.socket), out]);
    assert.ok(fs.readFileSync(out).equals(rig.model), 'the copy out equals what was copied in, over the rest of the backing file');
    const status = await runCli(['status', '--control', rig.control, '--json']);
    const report = JSON.parse(status.stdout) as { nbd: { connectionsTotal: number } };
    assert.ok(report.nbd.connectionsTotal >= 8, `nbdcopy used multi-conn both ways (${report.nbd.connectionsTotal} connections)`);
    await assertBackingMatches(rig);
  });
});

describe('qemu-io against pcache serve', () => {
  it('does sub-4 KiB and unaligned I/O, write-zeroes and discard, exactly as a model says', async (t) => {
    requireTool('qemu-io', 'qemu-utils');
    requireTool('nbdcopy', 'libnbd-bin');
    const rig = await serveRig(t);
    const m = rig.model;
    const commands: [string, () => void][] = [
      ['write -P 0xab 100 3000', () => m.fill(0xab, 100, 3100)],
      ['write -P 0xcd 5000 100', () => m.fill(0xcd, 5000, 5100)],
      ['write -P 0x5a 1048575 2', () => m.fill(0x5a, 1048575, 1048577)],
      ['write -P 0x77 4194000 1000', () => m.fill(0x77, 4194000, 4195000)], // crosses a 4 MiB subtree boundary
      ['write -z 65536 8192', () => m.fill(0, 65536, 73728)],
      ['write -z 70000 1000', () => m.fill(0, 70000, 71000)],
      ['discard 131072 65536', () => m.fill(0, 131072, 196608)],
      ['write -P 0x11 200000 40000', () => m.fill(0x11, 200000, 240000)],
      ['write -P 0x22 210000 512', () => m.fill(0x22, 210000, 210512)],
      ['read -P 0xab 100 3000', () => undefined],
      ['read -P 0xcd 5000 100', () => undefined],
      ['read -P 0x77 4194000 1000', () => undefined],
      ['read -P 0 65536 8192', () => undefined],
      ['read -P 0 131072 65536', () => undefined],
      ['read -P 0x22 210000 512', () => undefined],
      ['flush', () => undefined],
    ];
    for (const [, apply] of commands) apply();
    const result = await qemuIo(uriFor(rig.socket), commands.map(([command]) => command));
    assert.equal(result.stdout.match(/^read /gm)?.length, 6, result.stdout);
    const out = path.join(rig.dir, 'out.bin');
    await nbdcopy([uriFor(rig.socket), out]);
    assert.ok(fs.readFileSync(out).equals(m), 'the export holds exactly what the model says, nothing else changed');
    await assertBackingMatches(rig);
  });
});

describe('fio (nbd engine) against pcache serve', () => {
  it('runs four verifying jobs at depth 16 without one verification error', async (t) => {
    await requireFioNbd();
    const rig = await serveRig(t);
    await fioVerifyJobs(uriFor(rig.socket), 4, 'pcache-verify');
    // fio's verify header makes every 4 KiB block unique; the backing file must now hold them.
    const drained = await runCli(['drain', '--control', rig.control]);
    assert.equal(drained.code, 0, drained.stderr);
    const backing = fs.readFileSync(rig.backing);
    assert.ok(!backing.subarray(0, 32 * MiB).equals(rig.model.subarray(0, 32 * MiB)), 'the writes reached the backing file');
    assert.ok(backing.subarray(32 * MiB).equals(rig.model.subarray(32 * MiB)), 'nothing beyond the jobs\' ranges changed');
    const out = path.join(rig.dir, 'out.bin');
    await nbdcopy([uriFor(rig.socket), out]);
    assert.ok(fs.readFileSync(out).equals(backing), 'the export and the drained backing file agree byte for byte');
  });
});
