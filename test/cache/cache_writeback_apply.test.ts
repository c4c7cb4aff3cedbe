// How writeback's extents reach the backing device: in batches where the device takes several
// writes at once (writeMany), one write per run where it does not, as copies the backing file's
// writer thread makes itself from the cache file (copyMany), the same bytes every way, and a
// failed batch that advances nothing and is redone in full.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BlockDevice, DeviceWrite } from '../../src/device/block_device.js';
import { FileDevice } from '../../src/device/file_device.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache, eagerWriteback } from '../../src/cache/cache.js';
import { writebackBatchWritesMax, writebackWritesInFlightMax } from '../../src/cache/cache_writeback_apply.js';
import { PcacheError } from '../../src/lib/errors.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { MiB } from '../../src/lib/units.js';
import { cacheBytesFor, pattern, settle } from '../helpers/cache_fixture.js';

const blockBytes = 4096;

/** A memory backing device that counts its requests (BatchingDevice adds writeMany). */
class CountingDevice implements BlockDevice {
  readonly inner: MemoryDevice;
  readonly sizeBytes: number;
  readonly identity = undefined;
  readonly blocking = undefined;
  /** Writes per writeMany call, in order. */
  readonly batchSizes: number[] = [];
  singleWrites = 0;
  /** The next writeMany fails after writing its first half. */
  failNextBatch = false;

  constructor(inner: MemoryDevice) {
    this.inner = inner;
    this.sizeBytes = inner.sizeBytes;
  }

  read(target: Uint8Array, offsetBytes: number): Promise<void> {
    return this.inner.read(target, offsetBytes);
  }

  write(source: Uint8Array, offsetBytes: number): Promise<void> {
    this.singleWrites++;
    return this.inner.write(source, offsetBytes);
  }

  sync(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

}

class BatchingDevice extends CountingDevice {
  async writeMany(writes: readonly DeviceWrite[]): Promise<void> {
    this.batchSizes.push(writes.length);
    const fail = this.failNextBatch;
    this.failNextBatch = false;
    const upTo = fail ? Math.floor(writes.length / 2) : writes.length;
    for (const w of writes.slice(0, upTo)) await this.inner.write(w.source, w.offsetBytes);
    if (fail) throw new PcacheError('EIO', 'injected batch failure');
  }
}

async function rig(batches: boolean): Promise<{ cache: Cache; backing: CountingDevice }> {
  const inner = new MemoryDevice(pattern(0xbb, 0, 16 * MiB));
  const backing = batches ? new BatchingDevice(inner) : new CountingDevice(inner);
  const cache = await Cache.open({
    cacheDevice: new MemoryDevice(cacheBytesFor(16)),
    backingDevice: backing,
    timers: new ManualTimers(),
    background: false,
    formatIfBlank: { segmentSizeBytes: MiB },
    tuning: eagerWriteback,
  });
  return { cache, backing };
}

/** Every other 4 KiB block of the first `blocks` * 8 KiB (no two adjacent: one run each), then one contiguous 64 KiB run past them. */
async function writeScattered(cache: Cache, blocks: number): Promise<{ offsetBytes: number; data: Buffer }[]> {
  const written: { offsetBytes: number; data: Buffer }[] = [];
  for (let i = 0; i < blocks; i++) {
    const offsetBytes = i * 2 * blockBytes;
    const data = pattern(i + 1, offsetBytes, blockBytes);
    await cache.write(data, offsetBytes);
    written.push({ offsetBytes, data });
  }
  const runOffset = blocks * 2 * blockBytes;
  const run = pattern(0x77, runOffset, 64 * 1024);
  await cache.write(run, runOffset);
  written.push({ offsetBytes: runOffset, data: run });
  await cache.flush();
  return written;
}

function assertOnBacking(backing: CountingDevice, written: readonly { offsetBytes: number; data: Buffer }[]): void {
  for (const { offsetBytes, data } of written) {
    assert.deepEqual(Buffer.from(backing.inner.bytes.subarray(offsetBytes, offsetBytes + data.length)), data, `backing bytes at ${offsetBytes}`);
  }
  // The blocks between the written ones kept the backing device's own data.
  assert.deepEqual(Buffer.from(backing.inner.bytes.subarray(blockBytes, 2 * blockBytes)), pattern(0xbb, 0, 16 * MiB).subarray(blockBytes, 2 * blockBytes));
}

describe('writeback to the backing device', () => {
  it('sends scattered runs in batches of at most writebackBatchWritesMax writes to a device with writeMany', async () => {
    const { cache, backing } = await rig(true);
    const blocks = writebackBatchWritesMax + 100;
    const written = await writeScattered(cache, blocks);
    await cache.drain();
    assertOnBacking(backing, written);
    const total = backing.batchSizes.reduce((a, b) => a + b, 0);
    assert.equal(total, blocks + 1, 'one write per run: every scattered block, and the contiguous run as one');
    assert.equal(backing.singleWrites, 0, 'nothing went through write() one at a time');
    assert.ok(backing.batchSizes.length >= 2, `the runs did not fit one batch: ${backing.batchSizes.join(',')}`);
    assert.ok(backing.batchSizes.every((n) => n >= 1 && n <= writebackBatchWritesMax), `batch sizes ${backing.batchSizes.join(',')}`);
    assert.equal(cache.status().counters.writebackBackingWrites, blocks + 1);
    await cache.close();
  });

  it('writes one run per request to a device without writeMany, with the same result', async () => {
    const { cache, backing } = await rig(false);
    const written = await writeScattered(cache, 40);
    await cache.drain();
    assertOnBacking(backing, written);
    assert.equal(backing.singleWrites, 41);
    assert.equal(backing.batchSizes.length, 0);
    await cache.close();
  });

  it('a failed batch advances nothing; the round is redone in full and the data arrives', async () => {
    const { cache, backing } = await rig(true);
    const written = await writeScattered(cache, 64);
    const before = cache.status();
    backing.failNextBatch = true;
    assert.equal(await cache.writebackStep(), false, 'the round failed');
    const failed = cache.status();
    assert.equal(failed.dirtyTail, before.dirtyTail, 'dirty_tail did not move');
    assert.equal(failed.dirtyBytes, before.dirtyBytes);
    assert.equal(failed.counters.writebackErrors, 1);
    assert.equal(failed.counters.backingWriteErrors, 1);
    await cache.drain();
    assertOnBacking(backing, written);
    assert.equal(cache.status().dirtyBytes, 0);
    await cache.close();
  });
});

/** A backing device (one write per request) whose writes wait until the test settles them. */
class HoldingDevice extends CountingDevice {
  readonly held: { resolve: () => void; reject: (error: unknown) => void }[] = [];

  override write(source: Uint8Array, offsetBytes: number): Promise<void> {
    this.singleWrites++;
    return new Promise<void>((resolve, reject) => {
      this.held.push({ resolve: () => { this.inner.writeSync(source, offsetBytes); resolve(); }, reject });
    });
  }
}

describe('writeback against a failing store', () => {
  it('issues nothing more once a write has failed, even when the failure makes room: the round fails as soon as what it issued settles', async () => {
    const backing = new HoldingDevice(new MemoryDevice(pattern(0xbb, 0, 16 * MiB)));
    const cache = await Cache.open({
      cacheDevice: new MemoryDevice(cacheBytesFor(16)), backingDevice: backing, timers: new ManualTimers(), background: false,
      formatIfBlank: { segmentSizeBytes: MiB }, tuning: eagerWriteback,
    });
    const written = await writeScattered(cache, writebackWritesInFlightMax + 36);
    const round = cache.writebackStep();
    for (let i = 0; i < 100 && backing.held.length < writebackWritesInFlightMax; i++) await settle();
    for (let i = 0; i < 10; i++) await settle();
    assert.equal(backing.held.length, writebackWritesInFlightMax, 'the window is full');
    // The store fails one write (a store going away): that frees a place in the window, which
    // must not be used. A failing store may hold new requests until it is back.
    backing.held[0]?.reject(new PcacheError('EIO', 'the store is gone'));
    for (let i = 0; i < 10; i++) await settle();
    assert.equal(backing.singleWrites, writebackWritesInFlightMax, 'no write after the failure');
    for (const write of backing.held.slice(1)) write.resolve();
    assert.equal(await round, false, 'the round failed');
    assert.equal(cache.status().counters.writebackErrors, 1);
    assert.equal(cache.status().counters.writebackBackingWrites, writebackWritesInFlightMax);
    // The store is back: the round is redone and everything arrives.
    backing.held.length = 0;
    const drained = cache.drain();
    for (let i = 0; i < 200 && backing.held.length < written.length; i++) {
      await settle();
      for (const write of backing.held.splice(0)) write.resolve();
    }
    await drained;
    assertOnBacking(backing, written);
    await cache.close();
  });
});

describe('writeback from a cache file to a backing file', () => {
  for (const dataCrc of [false, true]) {
    it(`${dataCrc ? 'with data CRCs, reads and checks the data and sends it' : 'sends only where the data is; the writer thread copies it'}: the backing file ends up with every byte`, async () => {
      const dir = mkdtempSync(join(tmpdir(), 'pcache-apply-'));
      try {
        const cachePath = join(dir, 'cache.img');
        const backingPath = join(dir, 'backing.img');
        FileDevice.create(cachePath, cacheBytesFor(16));
        writeFileSync(backingPath, pattern(0xbb, 0, 16 * MiB));
        const cacheDevice = await FileDevice.open(cachePath, { blocking: true });
        const backingDevice = await FileDevice.open(backingPath);
        // Count which way the runs went (the bytes are the same either way).
        const via = { copied: 0, written: 0 };
        const copyMany = backingDevice.copyMany.bind(backingDevice);
        const writeMany = backingDevice.writeMany.bind(backingDevice);
        backingDevice.copyMany = (copies) => { via.copied += copies.length; return copyMany(copies); };
        backingDevice.writeMany = (writes) => { via.written += writes.length; return writeMany(writes); };
        const cache = await Cache.open({
          cacheDevice, backingDevice, timers: new ManualTimers(), background: false,
          formatIfBlank: { segmentSizeBytes: MiB, dataCrc }, tuning: eagerWriteback,
        });
        const written = await writeScattered(cache, writebackBatchWritesMax + 20);
        await cache.drain();
        assert.equal(cache.status().counters.writebackBackingWrites, writebackBatchWritesMax + 21);
        assert.deepEqual(via, dataCrc ? { copied: 0, written: writebackBatchWritesMax + 21 } : { copied: writebackBatchWritesMax + 21, written: 0 });
        await cache.close();
        await cacheDevice.close();
        await backingDevice.close();
        const bytes = new MemoryDevice(readFileSync(backingPath));
        for (const { offsetBytes, data } of written) {
          assert.deepEqual(Buffer.from(bytes.bytes.subarray(offsetBytes, offsetBytes + data.length)), data, `backing bytes at ${offsetBytes}`);
        }
        assert.deepEqual(Buffer.from(bytes.bytes.subarray(blockBytes, 2 * blockBytes)), pattern(0xbb, 0, 16 * MiB).subarray(blockBytes, 2 * blockBytes));
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});
