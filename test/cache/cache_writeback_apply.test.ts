// How writeback's extents reach the backing device: in batches where the device takes several
// writes at once (writeMany), one write per run where it does not, the same bytes either way,
// and a failed batch that advances nothing and is redone in full.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockDevice, DeviceWrite } from '../../src/device/block_device.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache, eagerWriteback } from '../../src/cache/cache.js';
import { writebackBatchWritesMax } from '../../src/cache/cache_writeback_apply.js';
import { PcacheError } from '../../src/lib/errors.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { MiB } from '../../src/lib/units.js';
import { cacheBytesFor, pattern } from '../helpers/cache_fixture.js';

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
