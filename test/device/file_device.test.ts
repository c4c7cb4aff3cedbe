// FileDevice: synchronous and asynchronous positional I/O on real files, identity, creation,
// read-only opening, error mapping, and the engine running on files across a reopen.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { DeviceWrite } from '../../src/device/block_device.js';
import { FileDevice, toPcacheError } from '../../src/device/file_device.js';
import { FileWriter } from '../../src/device/file_writer.js';
import { Cache } from '../../src/cache/cache.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { MiB } from '../../src/lib/units.js';
import { cacheDeviceBytesFor } from '../../src/ondisk/layout.js';
import { pattern, readBytes } from '../helpers/cache_fixture.js';

let dir = '';
before(() => { dir = mkdtempSync(join(tmpdir(), 'pcache-file-')); });
after(() => { rmSync(dir, { recursive: true, force: true }); });

const code = (expected: string) => (error: unknown): boolean => (error as { code?: string }).code === expected;

/** Reads `lengthBytes` at `offsetBytes` of a file device opened with `blocking`. */
function readSyncAt(device: FileDevice, offsetBytes: number, lengthBytes: number): Buffer {
  const out = Buffer.alloc(lengthBytes);
  device.blocking?.readSync(out, offsetBytes);
  return out;
}

describe('FileDevice', () => {
  it('creates a sparse file of the requested size and refuses to replace one', () => {
    const path = join(dir, 'created.img');
    FileDevice.create(path, 64 * MiB);
    assert.equal(statSync(path).size, 64 * MiB);
    assert.ok(statSync(path).blocks * 512 < MiB, 'the file is sparse');
    assert.throws(() => { FileDevice.create(path, MiB); }, /cannot create/);
  });

  for (const blocking of [true, false]) {
    it(`${blocking ? 'blocking' : 'asynchronous'} I/O reads what was written, at any offset`, async () => {
      const path = join(dir, `io-${String(blocking)}.img`);
      FileDevice.create(path, 8 * MiB);
      const device = await FileDevice.open(path, { blocking });
      assert.equal(device.blocking !== undefined, blocking);
      assert.equal(device.sizeBytes, 8 * MiB);
      assert.match(device.identity ?? '', /^file:ino=\d+$/);
      const data = pattern(5, 4096, 64 * 1024);
      if (blocking) device.blocking?.writeSync(data, 4096);
      else await device.write(data, 4096);
      await device.sync();
      const back = Buffer.alloc(64 * 1024);
      await device.read(back, 4096);
      assert.deepEqual(back, data);
      if (blocking) {
        const again = Buffer.alloc(512);
        device.blocking?.readSync(again, 4096 + 512);
        assert.deepEqual(again, data.subarray(512, 1024));
      }
      await device.discard(4096, 4096);
      const zeroed = Buffer.alloc(4096, 1);
      await device.read(zeroed, 4096);
      assert.ok(zeroed.every((b) => b === 0), 'a discarded range reads as zeroes');
      await device.close();
      await assert.rejects(() => device.read(Buffer.alloc(512), 0), code('ENODEV'));
    });
  }

  for (const blocking of [false, true]) {
    it(`writeMany (${blocking ? 'blocking' : 'writer thread'}) writes scattered pieces, shared or not, and close waits for batches in flight`, async () => {
      const path = join(dir, `many-${String(blocking)}.img`);
      FileDevice.create(path, 8 * MiB);
      const device = await FileDevice.open(path, { blocking });
      // Views of one SharedArrayBuffer (what writeback sends) and plain buffers (copied).
      const shared = new Uint8Array(new SharedArrayBuffer(3 * 4096));
      shared.set(pattern(1, 0, 4096), 0);
      shared.set(pattern(2, 0, 8192), 4096);
      const batches: DeviceWrite[][] = [
        [{ source: shared.subarray(0, 4096), offsetBytes: 7 * MiB }, { source: shared.subarray(4096), offsetBytes: 4096 }],
        [{ source: pattern(3, 0, 512), offsetBytes: 3 * MiB + 512 }, { source: pattern(4, 0, 65536), offsetBytes: MiB }],
      ];
      const inFlight = batches.map((writes) => device.writeMany(writes));
      await device.close(); // must not close the descriptor under the writer thread's writes
      await Promise.all(inFlight);
      await assert.rejects(() => device.writeMany([{ source: pattern(5, 0, 512), offsetBytes: 0 }]), code('ENODEV'));
      const back = await FileDevice.open(path, { blocking: true });
      for (const writes of batches) {
        for (const { source, offsetBytes } of writes) {
          const read = Buffer.alloc(source.length);
          back.blocking?.readSync(read, offsetBytes);
          assert.deepEqual(read, Buffer.from(source), `bytes at ${offsetBytes}`);
        }
      }
      await back.close();
    });
  }

  it('writeMany refuses a read-only file, and the writer thread reports a failed write as an operating error', async () => {
    const path = join(dir, 'many-ro.img');
    writeFileSync(path, Buffer.alloc(MiB));
    const device = await FileDevice.open(path, { readOnly: true });
    await assert.rejects(() => device.writeMany([{ source: Buffer.alloc(512), offsetBytes: 0 }]), code('EPERM'));
    await device.close();
    // A descriptor without write access: pwrite fails with EBADF in the thread.
    const fd = openSync(path, 'r');
    const writer = new FileWriter(path, fd, (failure) => toPcacheError(Object.assign(new Error(failure.message), { code: failure.code }), `write at ${failure.offsetBytes}`));
    await assert.rejects(() => writer.write([{ source: Buffer.alloc(512), offsetBytes: 4096 }]), (error: unknown) => code('ENODEV')(error) && /write at 4096/.test(String(error)));
    assert.equal(writer.queued, 0);
    await writer.close();
    closeSync(fd);
  });

  it('copyMany gathers each run from other files in the writer thread and writes it as one', async () => {
    const sourcePath = join(dir, 'copy-source.img');
    const targetPath = join(dir, 'copy-target.img');
    FileDevice.create(sourcePath, 4 * MiB);
    FileDevice.create(targetPath, 4 * MiB);
    const source = await FileDevice.open(sourcePath, { blocking: true });
    const blocking = source.blocking;
    assert.ok(blocking?.locate !== undefined, 'a blocking file device locates its ranges');
    blocking.writeSync(pattern(1, 0, 4096), 0);
    blocking.writeSync(pattern(2, 0, 8192), 2 * MiB);
    blocking.writeSync(pattern(3, 0, 4096), MiB);
    const from = (offsetBytes: number, lengthBytes: number) => {
      const extent = blocking.locate?.(offsetBytes, lengthBytes);
      assert.ok(extent !== undefined);
      assert.equal(extent.offsetBytes, offsetBytes);
      return { from: extent, lengthBytes };
    };
    const target = await FileDevice.open(targetPath);
    // One run of three pieces from three places, back to back, and a run of one piece.
    await target.copyMany([
      { offsetBytes: 64 * 1024, sources: [from(2 * MiB, 8192), from(0, 4096), from(MiB, 4096)] },
      { offsetBytes: 3 * MiB, sources: [from(0, 4096)] },
    ]);
    await target.close();
    const back = await FileDevice.open(targetPath, { blocking: true });
    const read = (offsetBytes: number, lengthBytes: number): Buffer => readSyncAt(back, offsetBytes, lengthBytes);
    assert.deepEqual(read(64 * 1024, 16384), Buffer.concat([pattern(2, 0, 8192), pattern(1, 0, 4096), pattern(3, 0, 4096)]));
    assert.deepEqual(read(3 * MiB, 4096), pattern(1, 0, 4096));
    assert.deepEqual(read(0, 4096), Buffer.alloc(4096), 'nothing else was written');
    await back.close();
    // A source the thread cannot read (a descriptor open for writing only: EBADF): an operating error that says so.
    const writeOnly = openSync(sourcePath, 'a');
    const again = await FileDevice.open(targetPath);
    await assert.rejects(() => again.copyMany([{ offsetBytes: 0, sources: [{ from: { fd: writeOnly, offsetBytes: 0 }, lengthBytes: 4096 }] }]),
      (error: unknown) => code('ENODEV')(error) && /reading the source at 0/.test(String(error)));
    await again.close();
    closeSync(writeOnly);
    await source.close();
  });

  for (const blocking of [true, false]) {
    it(`readMany (${blocking ? 'blocking' : 'asynchronous'} device) reads pieces at unrelated offsets on the file's thread, in place in shared memory`, async () => {
      const path = join(dir, `read-many-${String(blocking)}.img`);
      FileDevice.create(path, 4 * MiB);
      const device = await FileDevice.open(path, { blocking });
      await device.write(pattern(7, 0, 4 * MiB), 0);
      const expected = (offsetBytes: number, lengthBytes: number): Buffer => pattern(7, offsetBytes, lengthBytes);
      // Pieces out of file order, into views of one SharedArrayBuffer: filled in place.
      const shared = new Uint8Array(new SharedArrayBuffer(64 * 1024)).fill(0xee);
      await device.readMany([
        { target: shared.subarray(0, 4096), offsetBytes: 3 * MiB },
        { target: shared.subarray(4096, 12288), offsetBytes: 512 },
        { target: shared.subarray(20480, 20992), offsetBytes: 4 * MiB - 512 },
      ]);
      assert.deepEqual(Buffer.from(shared.subarray(0, 4096)), expected(3 * MiB, 4096));
      assert.deepEqual(Buffer.from(shared.subarray(4096, 12288)), expected(512, 8192));
      assert.deepEqual(Buffer.from(shared.subarray(20480, 20992)), expected(4 * MiB - 512, 512));
      assert.ok(shared.subarray(12288, 20480).every((b) => b === 0xee) && shared.subarray(20992).every((b) => b === 0xee), 'nothing else was written');
      // Targets of ordinary memory, or of two shared buffers: read through a buffer of the thread's, copied over.
      const plain = [Buffer.alloc(4096), Buffer.alloc(1024)];
      const other = new Uint8Array(new SharedArrayBuffer(2048));
      await device.readMany([
        { target: plain[0] as Buffer, offsetBytes: MiB },
        { target: shared.subarray(0, 2048), offsetBytes: 2 * MiB },
        { target: other, offsetBytes: 8192 },
        { target: plain[1] as Buffer, offsetBytes: 0 },
      ]);
      assert.deepEqual(plain[0], expected(MiB, 4096));
      assert.deepEqual(Buffer.from(shared.subarray(0, 2048)), expected(2 * MiB, 2048));
      assert.deepEqual(Buffer.from(other), expected(8192, 2048));
      assert.deepEqual(plain[1], expected(0, 1024));
      await device.readMany([]);
      await device.close();
      await assert.rejects(() => device.readMany([{ target: shared.subarray(0, 512), offsetBytes: 0 }]), code('ENODEV'));
    });
  }

  it('readMany reports a piece the thread cannot read as an operating error naming where, and reads nothing after it', async () => {
    const path = join(dir, 'read-many-short.img');
    FileDevice.create(path, MiB);
    const device = await FileDevice.open(path, { blocking: true });
    device.blocking?.writeSync(pattern(3, 0, MiB), 0);
    // The file shrinks under the open device (another program truncates it): reading past its end is EIO.
    spawnSync('truncate', ['-s', String(512 * 1024), path]);
    const target = new Uint8Array(new SharedArrayBuffer(8192)).fill(0xee);
    await assert.rejects(() => device.readMany([
      { target: target.subarray(0, 4096), offsetBytes: 4096 },
      { target: target.subarray(4096, 6144), offsetBytes: 768 * 1024 },
      { target: target.subarray(6144), offsetBytes: 8192 },
    ]), (error: unknown) => code('EIO')(error) && /read .*read-many-short\.img at 786432/.test(String(error)));
    assert.deepEqual(Buffer.from(target.subarray(0, 4096)), pattern(3, 4096, 4096), 'the piece before the failure was read');
    assert.ok(target.subarray(6144).every((b) => b === 0xee), 'the piece after it was not');
    await device.close();
  });

  it('copyMany reads nearby pieces of a source together and still writes every run right', async () => {
    const sourcePath = join(dir, 'span-source.img');
    const otherPath = join(dir, 'span-other.img');
    const targetPath = join(dir, 'span-target.img');
    FileDevice.create(sourcePath, 4 * MiB);
    FileDevice.create(otherPath, MiB);
    FileDevice.create(targetPath, 4 * MiB);
    // The source holds a different pattern in every 4 KiB block, so a piece read from the
    // wrong place (a span's gap, a neighbour) shows.
    const content = Buffer.concat(Array.from({ length: 64 }, (_, block) => pattern(100 + block, 0, 4096)));
    writeFileSync(sourcePath, content, { flag: 'r+' });
    writeFileSync(otherPath, pattern(7, 0, 8192), { flag: 'r+' });
    const source = openSync(sourcePath, 'r');
    const other = openSync(otherPath, 'r');
    const piece = (fd: number, offsetBytes: number, lengthBytes: number) => ({ from: { fd, offsetBytes }, lengthBytes });
    const block = (n: number) => content.subarray(n * 4096, (n + 1) * 4096);
    const target = await FileDevice.open(targetPath);
    const runs = [
      // Out of source order, a block apart, and an 8 KiB gap: one span in the thread.
      { offsetBytes: MiB, sources: [piece(source, 5 * 4096, 4096), piece(source, 0, 4096)] },
      { offsetBytes: 2 * MiB, sources: [piece(source, 3 * 4096, 8192)] },
      // Two pieces back to back in the source: written straight from the span.
      { offsetBytes: 3 * MiB, sources: [piece(source, 7 * 4096, 4096), piece(source, 8 * 4096, 4096)] },
      // Further than a span's gap away.
      { offsetBytes: 3 * MiB + 65536, sources: [piece(source, 60 * 4096, 4096)] },
    ];
    await target.copyMany(runs);
    // A batch that cannot be sorted (a second file, and an offset that is not sector-aligned)
    // is read in batch order, and still right.
    await target.copyMany([
      { offsetBytes: 0, sources: [piece(source, 100, 1000), piece(other, 4096, 4096)] },
      { offsetBytes: 65536, sources: [piece(source, 4096, 512)] },
    ]);
    await target.close();
    const back = await FileDevice.open(targetPath, { blocking: true });
    const read = (offsetBytes: number, lengthBytes: number): Buffer => readSyncAt(back, offsetBytes, lengthBytes);
    assert.deepEqual(read(MiB, 8192), Buffer.concat([block(5), block(0)]));
    assert.deepEqual(read(2 * MiB, 8192), Buffer.concat([block(3), block(4)]));
    assert.deepEqual(read(3 * MiB, 8192), Buffer.concat([block(7), block(8)]));
    assert.deepEqual(read(3 * MiB + 65536, 4096), block(60));
    assert.deepEqual(read(0, 5096), Buffer.concat([content.subarray(100, 1100), pattern(7, 0, 8192).subarray(4096)]));
    assert.deepEqual(read(65536, 512), content.subarray(4096, 4608));
    assert.deepEqual(read(MiB + 8192, 4096), Buffer.alloc(4096), 'nothing past the runs was written');
    await back.close();
    // A piece past the source's end, read in one span with a good piece just before it: the
    // span fails, its pieces are read one by one, and the error names the piece that failed.
    const spanned = await FileDevice.open(targetPath);
    await assert.rejects(() => spanned.copyMany([
      { offsetBytes: 0, sources: [piece(source, 4 * MiB - 4096, 4096)] },
      { offsetBytes: 8192, sources: [piece(source, 4 * MiB + 4096, 4096)] },
    ]), (error: unknown) => code('EIO')(error) && /reading the source at 4198400/.test(String(error)));
    await spanned.close();
    // A piece past the source's end: EIO, and nothing of that batch is written.
    const again = await FileDevice.open(targetPath);
    await assert.rejects(() => again.copyMany([
      { offsetBytes: 3 * MiB - 4096, sources: [piece(source, 0, 4096)] },
      { offsetBytes: 3 * MiB - 8192, sources: [piece(source, 4 * MiB, 4096)] },
    ]), (error: unknown) => code('EIO')(error) && /reading the source at 4194304/.test(String(error)));
    await again.close();
    const after = await FileDevice.open(targetPath, { blocking: true });
    assert.deepEqual(readSyncAt(after, 3 * MiB - 8192, 8192), Buffer.alloc(8192));
    await after.close();
    closeSync(source);
    closeSync(other);
  });

  it('a writer thread keeps its process alive while a batch is out, and not once it is idle', () => {
    // A child process that copies through a file device's writer thread and never closes it:
    // with nothing else running, it must finish the copy (the thread held the process while the
    // batch was out) and then exit on its own (an idle thread does not hold it).
    const sourcePath = join(dir, 'alive-source.img');
    const targetPath = join(dir, 'alive-target.img');
    writeFileSync(sourcePath, pattern(9, 0, 4 * MiB));
    FileDevice.create(targetPath, 4 * MiB);
    const module = new URL('../../src/device/file_device.js', import.meta.url).href;
    const script = `
      import fs from 'node:fs';
      const { FileDevice } = await import(${JSON.stringify(module)});
      const source = fs.openSync(${JSON.stringify(sourcePath)}, 'r');
      const target = await FileDevice.open(${JSON.stringify(targetPath)});
      const runs = [];
      for (let at = 0; at < 4 * 1024 * 1024; at += 8192) runs.push({ offsetBytes: at, sources: [{ from: { fd: source, offsetBytes: at }, lengthBytes: 8192 }] });
      await target.copyMany(runs);
      console.log('copied');`;
    const scriptPath = join(dir, 'alive.mjs');
    writeFileSync(scriptPath, script);
    const child = spawnSync(process.execPath, [scriptPath], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(child.error, undefined, `the process exited on its own (${String(child.error)})`);
    assert.equal(child.status, 0, child.stderr);
    assert.equal(child.stdout.trim(), 'copied');
    assert.deepEqual(readFileSync(targetPath), pattern(9, 0, 4 * MiB));
  });

  it('keeps its identity across reopening and distinguishes files', async () => {
    const a = join(dir, 'a.img');
    const b = join(dir, 'b.img');
    FileDevice.create(a, MiB);
    FileDevice.create(b, MiB);
    const [a1, a2, b1] = await Promise.all([FileDevice.open(a), FileDevice.open(a), FileDevice.open(b)]);
    assert.equal(a1.identity, a2.identity);
    assert.notEqual(a1.identity, b1.identity);
    await Promise.all([a1.close(), a2.close(), b1.close()]);
  });

  it('maps system errors to operating errors', async () => {
    await assert.rejects(() => FileDevice.open(join(dir, 'missing.img')), code('ENODEV'));
    await assert.rejects(() => FileDevice.open(dir), code('EINVAL'));
    const path = join(dir, 'ro.img');
    writeFileSync(path, Buffer.alloc(MiB));
    const device = await FileDevice.open(path, { readOnly: true });
    await assert.rejects(() => device.write(Buffer.alloc(512), 0), code('EPERM'));
    await device.close();
  });
});

describe('the engine on files', () => {
  it('keeps flushed data across close and reopen, with a blocking cache file and an asynchronous backing file', async () => {
    const cachePath = join(dir, 'cache.img');
    const backingPath = join(dir, 'backing.img');
    FileDevice.create(cachePath, cacheDeviceBytesFor(8, MiB));
    FileDevice.create(backingPath, 32 * MiB);
    const open = async (): Promise<{ cache: Cache; devices: FileDevice[] }> => {
      const devices = [await FileDevice.open(cachePath, { blocking: true }), await FileDevice.open(backingPath)];
      const [cacheDevice, backingDevice] = devices as [FileDevice, FileDevice];
      const cache = await Cache.open({ cacheDevice, backingDevice, formatIfBlank: { segmentSizeBytes: MiB }, background: false, timers: new ManualTimers() });
      return { cache, devices };
    };
    let { cache, devices } = await open();
    for (let i = 0; i < 20; i++) await cache.write(pattern(i, i * 64 * 1024, 64 * 1024), i * 64 * 1024);
    await cache.flush();
    await cache.close();
    await Promise.all(devices.map((d) => d.close()));
    ({ cache, devices } = await open());
    for (let i = 0; i < 20; i++) assert.deepEqual(await readBytes(cache, i * 64 * 1024, 64 * 1024), pattern(i, i * 64 * 1024, 64 * 1024));
    await cache.drain();
    assert.deepEqual(await cache.check(), []);
    await cache.close();
    await Promise.all(devices.map((d) => d.close()));
  });
});
