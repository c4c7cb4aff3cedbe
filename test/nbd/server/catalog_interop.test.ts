// Real NBD clients against one NbdServer serving three exports from an ExportMap, each a
// DeviceExport over its own MemoryDevice: nbdinfo --list shows all three with their
// descriptions and sizes; nbdinfo, nbdcopy and qemu-io reach each export by name, and what is
// written to one lands in that one only; fio verifies on all three at once; an unknown name fails the way libnbd and qemu report
// an unknown export, and the server keeps serving; an export added while the server runs is
// listed and served, and a removed one is neither.
//
// The tools come from Debian packages (libnbd-bin, qemu-utils, fio); a missing tool fails its test
// with the package name, it is never skipped. They run asynchronously (runTool): the server
// lives in this process.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { DeviceExport } from '../../../src/device/device_export.js';
import { MemoryDevice } from '../../../src/device/memory_device.js';
import { MiB } from '../../../src/lib/units.js';
import { ExportMap } from '../../../src/nbd/server/export_catalog.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import { patternBytes } from '../../helpers/bytes.js';
import { tempDir } from '../../helpers/files.js';
import { fioVerifyJobs, nbdcopy, qemuIo, requireFioNbd, requireTool, runTool, uriFor } from '../../helpers/tools.js';

/** Name, description and size of each export; the sizes differ so that a mix-up shows. */
const volumes = [
  { name: 'alpha', description: 'first volume', sizeBytes: 8 * MiB },
  { name: 'beta', description: 'second volume', sizeBytes: 12 * MiB },
  { name: 'gamma', description: 'third volume', sizeBytes: 16 * MiB },
] as const;

interface Served {
  readonly server: NbdServer;
  readonly socketPath: string;
  readonly dir: string;
  readonly catalog: ExportMap;
  readonly devices: Map<string, MemoryDevice>;
}

async function serveThree(t: TestContext): Promise<Served> {
  const catalog = new ExportMap();
  const devices = new Map<string, MemoryDevice>();
  volumes.forEach((volume, index) => {
    const device = new MemoryDevice(patternBytes(volume.sizeBytes, 50 + index));
    devices.set(volume.name, device);
    catalog.add({ name: volume.name, description: volume.description, export: new DeviceExport(device) });
  });
  const server = new NbdServer({ catalog });
  const dir = tempDir(t, 'pcache-nbd-volumes-');
  const socketPath = path.join(dir, 'nbd.sock');
  await server.listen({ path: socketPath });
  t.after(() => server.close());
  return { server, socketPath, dir, catalog, devices };
}

function deviceOf(s: Served, name: string): MemoryDevice {
  const device = s.devices.get(name);
  assert.ok(device !== undefined, name);
  return device;
}

interface ListedExport {
  'export-name': string;
  description?: string;
  'export-size': number;
  is_read_only: boolean;
}

async function nbdinfoList(socketPath: string): Promise<ListedExport[]> {
  const result = await runTool('nbdinfo', ['--list', '--json', uriFor(socketPath)]);
  assert.equal(result.code, 0, result.stderr);
  return (JSON.parse(result.stdout) as { exports: ListedExport[] }).exports;
}

describe('several exports through real clients', () => {
  it('nbdinfo --list shows every export with its description and size', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const s = await serveThree(t);
    const listed = await nbdinfoList(s.socketPath);
    assert.deepEqual(
      listed.map((entry) => [entry['export-name'], entry.description, entry['export-size'], entry.is_read_only]),
      volumes.map((volume) => [volume.name, volume.description, volume.sizeBytes, false]),
    );
  });

  it('nbdinfo on each name reports that export, and an unknown name fails as an unknown export while the server keeps serving', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const s = await serveThree(t);
    for (const volume of volumes) {
      const result = await runTool('nbdinfo', ['--json', uriFor(s.socketPath, volume.name)]);
      assert.equal(result.code, 0, result.stderr);
      const [info] = (JSON.parse(result.stdout) as { exports: ListedExport[] }).exports;
      assert.deepEqual([info?.['export-name'], info?.description, info?.['export-size']], [volume.name, volume.description, volume.sizeBytes]);
    }
    const unknown = await runTool('nbdinfo', [uriFor(s.socketPath, 'delta')]);
    assert.notEqual(unknown.code, 0);
    // libnbd turns NBD_REP_ERR_UNKNOWN into ENOENT and names the export.
    assert.match(unknown.stderr, /server replied with error to opt_go request: No such file or directory for export: delta/);
    const noDefault = await runTool('nbdinfo', [uriFor(s.socketPath)]);
    assert.notEqual(noDefault.code, 0, 'there is no default export to pick');
    assert.match(noDefault.stderr, /No such file or directory/);
    const after = await runTool('nbdinfo', ['--size', uriFor(s.socketPath, 'beta')]);
    assert.equal(after.code, 0, after.stderr);
    assert.equal(after.stdout.trim(), String(12 * MiB));
  });

  it('nbdcopy writes distinct data into each export and reads each back; no export sees another\'s data', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const s = await serveThree(t);
    const written = new Map<string, Buffer>();
    for (const [index, volume] of volumes.entries()) {
      const source = path.join(s.dir, `${volume.name}.in`);
      const bytes = patternBytes(volume.sizeBytes, 70 + index);
      fs.writeFileSync(source, bytes);
      written.set(volume.name, bytes);
      await nbdcopy(['-C', '2', '--flush', source, uriFor(s.socketPath, volume.name)]);
    }
    for (const volume of volumes) {
      const expected = written.get(volume.name) ?? Buffer.alloc(0);
      assert.ok(Buffer.from(deviceOf(s, volume.name).bytes).equals(expected), `${volume.name} holds its own copy`);
      const out = path.join(s.dir, `${volume.name}.out`);
      await nbdcopy([uriFor(s.socketPath, volume.name), out]);
      assert.ok(fs.readFileSync(out).equals(expected), `${volume.name} reads back byte for byte`);
    }
  });

  it('qemu-io writes a pattern into each export by name and reads it back; the others keep their bytes', async (t) => {
    requireTool('qemu-io', 'qemu-utils');
    const s = await serveThree(t);
    const before = new Map(volumes.map((volume) => [volume.name, Buffer.from(deviceOf(s, volume.name).bytes)]));
    const patterns = [0x1a, 0x2b, 0x3c];
    for (const [index, volume] of volumes.entries()) {
      const fill = patterns[index] ?? 0;
      const offset = (index + 1) * MiB + 100;
      await qemuIo(uriFor(s.socketPath, volume.name), [`write -P ${fill} ${offset} 70000`, `read -P ${fill} ${offset} 70000`]);
      before.get(volume.name)?.fill(fill, offset, offset + 70000);
    }
    for (const volume of volumes) {
      assert.ok(Buffer.from(deviceOf(s, volume.name).bytes).equals(before.get(volume.name) ?? Buffer.alloc(0)), `${volume.name} holds exactly its own write`);
    }
    const unknown = await runTool('qemu-io', ['-f', 'raw', uriFor(s.socketPath, 'delta'), '-c', 'read 0 512']);
    assert.notEqual(unknown.code, 0);
    assert.match(unknown.stdout + unknown.stderr, /Requested export not available[\s\S]*no export named "delta"/);
    await qemuIo(uriFor(s.socketPath, 'gamma'), ['read -P 0x3c 3145828 70000']);
  });

  it('fio verifies on all three exports at once, each connection on its own export', async (t) => {
    await requireFioNbd();
    const s = await serveThree(t);
    const before = volumes.map((volume) => Buffer.from(deviceOf(s, volume.name).bytes.subarray(0, 8 * MiB)));
    // Were two names served by one device, the jobs' writes would overwrite each other and fail verification.
    await Promise.all(volumes.map((volume) => fioVerifyJobs(uriFor(s.socketPath, volume.name), 1, `pcache-${volume.name}`)));
    volumes.forEach((volume, index) => {
      assert.ok(!Buffer.from(deviceOf(s, volume.name).bytes.subarray(0, 8 * MiB)).equals(before[index] ?? Buffer.alloc(0)), `fio wrote into ${volume.name}`);
    });
  });

  it('an export added while the server runs is listed and served; a removed one is neither', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    requireTool('nbdcopy', 'libnbd-bin');
    const s = await serveThree(t);
    const added = new MemoryDevice(4 * MiB);
    s.catalog.add({ name: 'delta', description: 'added while serving', export: new DeviceExport(added), readOnly: true });
    s.catalog.remove('alpha');
    const listed = await nbdinfoList(s.socketPath);
    assert.deepEqual(listed.map((entry) => [entry['export-name'], entry.is_read_only]), [['beta', false], ['gamma', false], ['delta', true]]);
    added.bytes.set(patternBytes(4 * MiB, 99));
    const out = path.join(s.dir, 'delta.out');
    await nbdcopy([uriFor(s.socketPath, 'delta'), out]);
    assert.ok(fs.readFileSync(out).equals(Buffer.from(added.bytes)), 'the added export is served');
    const gone = await runTool('nbdinfo', [uriFor(s.socketPath, 'alpha')]);
    assert.notEqual(gone.code, 0);
    assert.match(gone.stderr, /No such file or directory for export: alpha/);
  });
});
