// When writeback runs: dirty data at the start watermark (until the stop watermark), an idle
// spell without client writes, data older than the maximum age, right after a restart, and
// whenever it is urgent. Background work on, manual timers.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache, type CacheTuning } from '../../src/cache/cache.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { MiB } from '../../src/lib/units.js';
import { cacheBytesFor, pattern, settle } from '../helpers/cache_fixture.js';
import { ksetCloseDelayMs } from '../../src/cache/cache_kset.js';

const segments = 10;
const capacityBytes = segments * (MiB - 12 * 1024);

async function policyRig(tuning: Partial<CacheTuning> = {}, gcPercent = 90) {
  const cacheDevice = new MemoryDevice(cacheBytesFor(segments));
  const backingDevice = new MemoryDevice(64 * MiB);
  const timers = new ManualTimers();
  const open = (): Promise<Cache> => Cache.open({
    cacheDevice, backingDevice, timers, background: true,
    formatIfBlank: { segmentSizeBytes: MiB, gcPercent },
    tuning: { writebackStartPercent: 40, writebackStopPercent: 20, writebackIdleMs: 1000, writebackMaxAgeMs: 30_000, sequentialCutoffBytes: 0, ...tuning },
  });
  return { cacheDevice, backingDevice, timers, open, cache: await open() };
}

/** Lets queued work run, then waits for a writeback loop (if one started) to finish. */
async function quiesce(cache: Cache): Promise<void> {
  await settle();
  await cache.internals.writeback.idle();
  await settle();
}

/** Writes `bytes` in 64 KiB pieces from `offset`, flushing each, without letting time pass. */
async function writeFlushed(cache: Cache, offset: number, bytes: number, tag: number): Promise<void> {
  for (let done = 0; done < bytes; done += 64 * 1024) {
    await cache.write(pattern(tag, offset + done, 64 * 1024), offset + done);
    await cache.flush();
  }
  await settle();
}

describe('writeback policy', () => {
  it('waits while dirty data is below the start watermark and clients keep writing; an idle spell writes it all back', async () => {
    const { cache, timers } = await policyRig();
    await writeFlushed(cache, 0, MiB, 1);
    timers.advance(900);
    await writeFlushed(cache, MiB, MiB, 2);
    assert.equal(cache.status().dirtyBytes, 2 * MiB, 'nothing was written back yet');
    assert.equal(cache.status().counters.writebackRounds, 0);
    timers.advance(999);
    await settle();
    assert.equal(cache.status().dirtyBytes, 2 * MiB, 'not idle long enough yet');
    timers.advance(1);
    await quiesce(cache);
    assert.equal(cache.status().dirtyBytes, 0, 'one idle second later everything is written back');
    await cache.close();
  });

  it('starts at the start watermark and stops at the stop watermark, even while clients keep writing', async () => {
    const { cache } = await policyRig();
    const start = Math.ceil(capacityBytes * 0.4);
    let offset = 0;
    while (cache.status().counters.writebackRounds === 0) {
      await writeFlushed(cache, offset, 64 * 1024, 3);
      offset += 64 * 1024;
      assert.ok(offset < 40 * MiB, 'writeback started');
    }
    assert.ok(offset >= start - 64 * 1024, `writeback started at ${offset} bytes, at the watermark (${start})`);
    await quiesce(cache);
    const dirty = cache.status().dirtyBytes;
    assert.ok(dirty <= capacityBytes * 0.2, `writeback went on down to the stop watermark: ${dirty} dirty`);
    assert.ok(dirty > 0, 'and stopped there instead of writing everything back');
    await cache.close();
  });

  it('writes back data older than the maximum age while clients keep writing', async () => {
    const { cache, timers, backingDevice } = await policyRig({ writebackMaxAgeMs: 5000 });
    await writeFlushed(cache, 0, 64 * 1024, 4); // the old data
    for (let t = 0; t < 4500; t += 500) {
      timers.advance(500);
      await writeFlushed(cache, MiB + t * 128, 4096, 5); // never idle for a second
    }
    assert.ok(!Buffer.from(backingDevice.bytes.subarray(0, 64 * 1024)).equals(pattern(4, 0, 64 * 1024)), 'not yet');
    timers.advance(600);
    await quiesce(cache);
    assert.ok(Buffer.from(backingDevice.bytes.subarray(0, 64 * 1024)).equals(pattern(4, 0, 64 * 1024)), 'the old data reached the backing device');
    assert.ok((cache.status().writeback.oldestDirtyAgeMs ?? 0) < 5000);
    await cache.close();
  });

  it('writes back dirty data found after a restart right away', async () => {
    const rig = await policyRig();
    await writeFlushed(rig.cache, 0, 256 * 1024, 6);
    rig.cache.abandon();
    const reopened = await rig.open();
    await quiesce(reopened);
    assert.equal(reopened.status().dirtyBytes, 0);
    assert.ok(Buffer.from(rig.backingDevice.bytes.subarray(0, 256 * 1024)).equals(pattern(6, 0, 256 * 1024)));
    await reopened.close();
  });

  it('refuses bad tuning before formatting a blank device: nothing is written', async () => {
    const cacheDevice = new MemoryDevice(cacheBytesFor(8));
    const backingDevice = new MemoryDevice(4 * MiB);
    await assert.rejects(
      Cache.open({ cacheDevice, backingDevice, formatIfBlank: true, tuning: { writebackStartPercent: 30, writebackStopPercent: 60 } }),
      (error: Error & { code?: string }) => error.code === 'EINVAL',
    );
    assert.ok(cacheDevice.bytes.every((byte) => byte === 0), 'the blank device is still blank');
  });

  it('drain writes back regardless of the policy; setTuning validates and applies knobs', async () => {
    const { cache } = await policyRig();
    await writeFlushed(cache, 0, 128 * 1024, 7);
    await cache.drain();
    assert.equal(cache.status().dirtyBytes, 0);
    assert.throws(() => cache.setTuning({ writebackStopPercent: 60 }), /writebackStopPercent must not exceed writebackStartPercent/);
    assert.throws(() => cache.setTuning({ writebackIdleMs: -1 }), /whole number of milliseconds/);
    assert.throws(() => cache.setTuning({ dirtyHighWaterPercent: 101 }), /0 to 100/);
    assert.equal(cache.setTuning({ writebackStartPercent: 0, writebackStopPercent: 0 }).writebackStartPercent, 0);
    await writeFlushed(cache, 0, 64 * 1024, 8);
    assert.equal(cache.status().dirtyBytes, 0, 'eager after the change');
    await cache.close();
  });

  it('GC starts when the segments in use reach gc_percent, though dirty_tail stands still after a drain', async () => {
    // After a drain nothing moves dirty_tail; new writes fill the cache. GC must start at the
    // threshold on its own, not wait until a writer runs out of space (which made writers wait
    // and writeback run urgently).
    const { cache } = await policyRig({ writebackStartPercent: 90, writebackStopPercent: 80 }, 50);
    const core = cache.internals;
    await writeFlushed(cache, 0, 2 * MiB, 9);
    await cache.drain();
    await quiesce(cache);
    const usedAfterDrain = core.ctx.segments.usedCount;
    assert.ok(usedAfterDrain < core.ctx.gcThresholdSegments, `below the threshold after the drain: ${usedAfterDrain} of ${core.ctx.gcThresholdSegments}`);
    assert.equal(cache.status().counters.gcSegmentsFreed, 0);
    let offset = 2 * MiB;
    while (core.ctx.segments.usedCount < core.ctx.gcThresholdSegments) {
      await writeFlushed(cache, offset, 64 * 1024, 10);
      offset += 64 * 1024;
    }
    assert.equal(core.ctx.spaceWaiters, 0, 'no writer waited for space');
    await settle();
    await core.gc.idle();
    await settle();
    assert.ok(cache.status().counters.gcSegmentsFreed > 0, 'GC reclaimed the drained segments');
    assert.equal(core.ctx.keyTail.lsn, core.ctx.dirtyTail.lsn, 'everything written back was reclaimed');
    for (let at = 0; at < offset; at += 64 * 1024) {
      const got = new Uint8Array(64 * 1024);
      await cache.read(got, at);
      assert.deepEqual(Buffer.from(got), Buffer.from(pattern(at < 2 * MiB ? 9 : 10, at, 64 * 1024)), `data at ${at}`);
    }
    await cache.close();
  });
});

describe('writeback urgency', () => {
  it('ends once no writer waits for space: writeback then stops instead of writing everything back', async () => {
    // The start watermark (90%) is above what the data segments can hold, so only a writer
    // short of space can start writeback here; once it has its space, the policy takes over
    // again and the rest stays dirty (no idle spell: the manual clock never moves).
    const { cache } = await policyRig({ writebackStartPercent: 90, writebackStopPercent: 80 }, 50);
    const core = cache.internals;
    let offset = 0;
    let sawWaiter = false;
    while (cache.status().counters.writebackRounds === 0) {
      const write = writeFlushed(cache, offset % (32 * MiB), 64 * 1024, 11);
      await settle();
      if (core.ctx.spaceWaiters > 0) sawWaiter = true;
      await write;
      offset += 64 * 1024;
      assert.ok(offset < 64 * MiB, 'writeback never started');
    }
    assert.ok(sawWaiter, 'a writer waited for space');
    await quiesce(cache);
    await core.gc.idle();
    await quiesce(cache);
    assert.equal(core.ctx.spaceWaiters, 0);
    const dirty = cache.status().dirtyBytes;
    assert.ok(dirty > 0, 'writeback stopped once the writer had its space, with data still dirty');
    // More writes keep working: the writer that needs space gets it again.
    await writeFlushed(cache, 0, 2 * MiB, 12);
    await quiesce(cache);
    const got = new Uint8Array(2 * MiB);
    await cache.read(got, 0);
    assert.deepEqual(Buffer.from(got), Buffer.from(pattern(12, 0, 2 * MiB)));
    await cache.drain();
    assert.equal(cache.status().dirtyBytes, 0, 'a drain still writes everything back');
    await cache.close();
  });

  it('keeps a read-only cache admitting: GC starved of clean ksets has writeback pass them, with no idle spell', async () => {
    // The idle and age rules are an hour away, so neither can start writeback: only GC's need
    // can. The clock moves by the kset close delay after each read, so that the fills' ksets
    // are committed as they would be. Reads of three times the cache, in 64 KiB pieces, each
    // read twice: a full cache stores a miss only when it recurs (cache_admission.ts).
    const { cache, timers } = await policyRig({ writebackIdleMs: 3_600_000, writebackMaxAgeMs: 3_600_000 }, 70);
    const piece = new Uint8Array(64 * 1024);
    const readBytes = 3 * capacityBytes;
    for (let offset = 0; offset + piece.length <= readBytes; offset += piece.length) {
      await cache.read(piece, offset);
      await cache.read(piece, offset);
      await settle();
      timers.advance(ksetCloseDelayMs);
      await quiesce(cache);
      await cache.internals.gc.idle();
    }
    const before = cache.status().counters;
    assert.equal(cache.status().dirtyBytes, 0);
    assert.ok(before.gcSegmentsFreed > 0, 'GC freed segments of clean copies');
    // The most recent reads are cached: the cache kept taking fills to the end.
    const lastBytes = 2 * MiB;
    const end = Math.floor(readBytes / piece.length) * piece.length;
    for (let offset = end - lastBytes; offset < end; offset += piece.length) await cache.read(piece, offset);
    const after = cache.status().counters;
    assert.equal(after.readHitBytes - before.readHitBytes, lastBytes, `the last ${lastBytes} bytes read hit (fills skipped: ${after.fillsSkipped})`);
    await cache.close();
  });
});
