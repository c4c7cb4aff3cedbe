// Writeback and garbage collection: log order, newest data per range, clean keys skipped,
// the backing device synced before dirty_tail moves, errors that advance nothing and retry
// with back-off, GC thresholds and generations, and a full cache that makes writes wait.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache, eagerWriteback } from '../../src/cache/cache.js';
import { gcSweepSegmentsDivisor } from '../../src/cache/cache_gc.js';
import { cachePosRecordBytes } from '../../src/ondisk/cache_pos.js';
import { layoutFor } from '../../src/ondisk/layout.js';

const { dirtyTailOffsetsBytes, keyTailOffsetsBytes } = layoutFor(2);
import { ManualTimers } from '../../src/lib/timers.js';
import { MiB } from '../../src/lib/units.js';
import { isPcacheError } from '../../src/lib/errors.js';
import { cacheBytesFor, type DeviceEvent, openRig, pattern, readBytes, RecordingDevice, settle } from '../helpers/cache_fixture.js';

const S = 512;

/** Manual timers whose background slice is always spent: every piece of background work is deferred. */
class SlicingTimers extends ManualTimers {
  deferrals = 0;
  override pace(): Promise<void> | undefined {
    this.deferrals++;
    return Promise.resolve();
  }
}

async function recordingRig(options: { segments?: number; gcPercent?: number; background?: boolean; timers?: ManualTimers } = {}) {
  const events: DeviceEvent[] = [];
  const cacheDevice = new RecordingDevice(new MemoryDevice(cacheBytesFor(options.segments ?? 8)), 'cache', events);
  const backingDevice = new RecordingDevice(new MemoryDevice(pattern(0xbb, 0, 32 * MiB)), 'backing', events, { blocking: false });
  const timers = options.timers ?? new ManualTimers();
  const open = (): Promise<Cache> => Cache.open({
    cacheDevice, backingDevice, timers, background: options.background ?? false,
    formatIfBlank: { segmentSizeBytes: MiB, gcPercent: options.gcPercent ?? 70 },
    tuning: eagerWriteback, // these tests watch writeback happen right after a flush
  });
  const cache = await open();
  events.length = 0;
  return { events, cacheDevice, backingDevice, timers, cache, open };
}

const isTailWrite = (e: DeviceEvent, offsets: readonly number[]): boolean => e.device === 'cache' && e.kind === 'write' && offsets.includes(e.offsetBytes);

describe('writeback', () => {
  it('applies ksets in log order, newest data per range, skipping clean keys, and syncs the backing device before dirty_tail moves', async () => {
    const rig = await recordingRig();
    const { cache, events } = rig;
    await readBytes(cache, 64 * S, 8 * S); // a miss fill: a CLEAN key
    await cache.write(pattern(1, 0, 8 * S), 0);
    await cache.write(pattern(2, 4 * S, 8 * S), 4 * S); // overwrites half of the first write in the same kset
    await cache.flush(); // epoch 1 ends
    await cache.write(pattern(3, 0, 2 * S), 0); // epoch 2 overwrites the start again
    await cache.flush();
    events.length = 0;

    assert.equal(await cache.writebackStep(), true);
    const round1 = events.filter((e) => e.device === 'backing' || isTailWrite(e, dirtyTailOffsetsBytes));
    // Epoch 1 only: the merged extents (newest data per range: the first write's [0, 4) and the
    // second write's [4, 12), contiguous, so one backing write), no write for the CLEAN fill,
    // a sync, then dirty_tail.
    assert.deepEqual(round1.map((e) => [e.device, e.kind, e.offsetBytes / S, e.lengthBytes / S]), [
      ['backing', 'write', 0, 12],
      ['backing', 'sync', 0, 0],
      // Format wrote both copies with the same seq, so the first update goes to copy 1; once the
      // sync after it made it durable, the same record goes to copy 0 (its mirror).
      ['cache', 'write', dirtyTailOffsetsBytes[1] / S, cachePosRecordBytes(2) / S],
      ['cache', 'write', dirtyTailOffsetsBytes[0] / S, cachePosRecordBytes(2) / S],
    ]);
    const backing = rig.backingDevice.inner;
    assert.deepEqual(Buffer.from(backing.bytes.subarray(0, 12 * S)), Buffer.concat([pattern(1, 0, 4 * S), pattern(2, 4 * S, 8 * S)]));

    events.length = 0;
    assert.equal(await cache.writebackStep(), true);
    assert.deepEqual(events.filter((e) => e.device === 'backing').map((e) => [e.kind, e.offsetBytes / S, e.lengthBytes / S]), [['write', 0, 2], ['sync', 0, 0]]);
    assert.equal(await cache.writebackStep(), false, 'nothing left');
    assert.equal(cache.status().dirtyBytes, 0);
    assert.equal(cache.status().counters.writebackBytes, 18 * S);
  });

  it('writes ZERO extents (trim, write-zeroes) to the backing device in log order', async () => {
    const rig = await recordingRig();
    await rig.cache.write(pattern(5, 0, 16 * S), 0);
    await rig.cache.trim(4 * S, 4 * S);
    await rig.cache.drain();
    const backing = Buffer.from(rig.backingDevice.inner.bytes.subarray(0, 16 * S));
    assert.ok(backing.subarray(4 * S, 8 * S).every((b) => b === 0));
    assert.deepEqual(backing.subarray(0, 4 * S), pattern(5, 0, 4 * S));
    assert.deepEqual(backing.subarray(8 * S, 16 * S), pattern(5, 8 * S, 8 * S));
  });

  it('a drain waiting on writeback fails with the cache: once the cache device fails, writeback stops, so nothing would end the wait', async () => {
    const rig = await recordingRig({ background: true });
    const { cache, cacheDevice, backingDevice } = rig;
    backingDevice.failWrites = 'the backing device refuses writes, so the drain waits';
    await cache.write(pattern(8, 0, 8 * S), 0);
    await cache.flush();
    let outcome: unknown = 'pending';
    const draining = cache.drain().then(() => 'drained', (error: unknown) => error);
    void draining.then((value) => { outcome = value; });
    await settle();
    assert.equal(outcome, 'pending', 'the drain waits while writeback cannot write');
    // A failed sync of the log fails the cache (a failed data write fails only its request).
    cacheDevice.failSyncs = 'injected cache sync error';
    await cache.write(pattern(9, 64 * S, S), 64 * S);
    await assert.rejects(cache.flush(), { code: 'EIO' });
    assert.equal(cache.status().state, 'failed');
    await settle();
    assert.ok(isPcacheError(outcome), 'the drain ended with the failure of the cache instead of waiting until close');
    assert.equal(outcome.code, 'EIO');
    assert.match(outcome.message, /cache device failed/);
    await assert.rejects(cache.drain(), { code: 'EIO' }, 'a drain started after the failure fails at once');
    cacheDevice.failSyncs = undefined;
    backingDevice.failWrites = undefined;
    cache.abandon();
  });

  it('advances nothing on a backing write or sync error, reports degraded, and retries with back-off until it succeeds', async () => {
    const rig = await recordingRig({ background: true });
    const { cache, backingDevice, timers } = rig;
    backingDevice.failWrites = 'injected write error';
    await cache.write(pattern(7, 0, 8 * S), 0);
    await cache.flush();
    await settle();
    const dirtyTail = cache.status().dirtyTail;
    let status = cache.status();
    assert.equal(status.state, 'degraded');
    assert.match(status.stateReason ?? '', /injected write error/);
    assert.ok(status.counters.writebackErrors >= 1);
    assert.equal(status.dirtyBytes, 8 * S, 'the data stays dirty');
    assert.equal(status.writeback.backoffMs, 100);
    // Each retry doubles the back-off; dirty_tail never moves while the device fails.
    timers.advance(100);
    await settle();
    assert.equal(cache.status().writeback.backoffMs, 200);
    backingDevice.failWrites = undefined;
    backingDevice.failSyncs = 'injected sync error';
    timers.advance(200);
    await settle();
    status = cache.status();
    assert.equal(status.dirtyTail, dirtyTail, 'a failed sync advances nothing');
    assert.equal(status.writeback.backoffMs, 400);
    backingDevice.failSyncs = undefined;
    timers.advance(400);
    await settle();
    status = cache.status();
    assert.equal(status.state, 'running');
    assert.equal(status.dirtyBytes, 0);
    assert.notEqual(status.dirtyTail, dirtyTail);
    assert.deepEqual(Buffer.from(backingDevice.inner.bytes.subarray(0, 8 * S)), pattern(7, 0, 8 * S));
    // Client requests never saw the errors.
    assert.deepEqual(await readBytes(cache, 0, 8 * S), pattern(7, 0, 8 * S));
    await cache.close();
  });
});

describe('writeback back-off', () => {
  it('retryBackingNow ends the back-off at once, and close never waits it out', async () => {
    const rig = await recordingRig({ background: true });
    const { cache, backingDevice, timers } = rig;
    backingDevice.failWrites = 'unreachable';
    await cache.write(pattern(5, 0, 8 * S), 0);
    await cache.flush();
    await settle();
    for (let i = 0; i < 4; i++) { // 100 + 200 + 400 + 800 ms of back-off: now 1.6 s
      timers.advance(cache.status().writeback.backoffMs);
      await settle();
    }
    assert.equal(cache.status().writeback.backoffMs, 1600);
    const errors = cache.status().counters.writebackErrors;
    backingDevice.failWrites = undefined;
    cache.retryBackingNow(); // the clock does not move: only the call can start the round
    await settle();
    let status = cache.status();
    assert.equal(status.counters.writebackErrors, errors, 'the retry did not fail');
    assert.equal(status.dirtyBytes, 0, 'written back without waiting out 1.6 s');
    assert.equal(status.state, 'running');

    backingDevice.failWrites = 'unreachable again';
    await cache.write(pattern(6, 0, 8 * S), 0);
    await cache.flush();
    await settle();
    status = cache.status();
    assert.equal(status.state, 'degraded');
    assert.ok(status.writeback.backoffMs > 0, 'writeback is sleeping in its back-off');
    // The manual clock never moves again: close must end the back-off itself.
    const closed = await Promise.race([cache.close().then(() => 'closed'), new Promise((resolve) => { setTimeout(() => { resolve('still waiting'); }, 500); })]);
    assert.equal(closed, 'closed');
  });
});

describe('garbage collection', () => {
  it('runs only at gc_percent, never passes dirty_tail, persists key_tail before freeing, and bumps generations', async () => {
    const rig = await recordingRig({ segments: 8, gcPercent: 50 });
    const { cache, events } = rig;
    const core = cache.internals;
    // Fill three data segments (and the log segment): 4 of 8 in use, the threshold.
    for (let i = 0; i < 3; i++) await cache.write(pattern(10 + i, i * MiB, MiB - 12 * 1024), i * MiB);
    await cache.flush();
    assert.equal(core.ctx.gcThresholdSegments, 4);
    assert.ok(core.ctx.segments.usedCount >= 4);
    assert.equal(await cache.gcStep(), false, 'nothing is written back yet: GC may not pass dirty_tail');
    await cache.drain();
    // Now all clean: GC waits until one segment is left free (cache_context.ts), as a
    // read cache does. New dirty data (over 5% of the cache) brings gc_percent back.
    assert.equal(core.ctx.gcThresholdSegments, 7);
    assert.equal(await cache.gcStep(), false, 'a clean cache is not full yet');
    await cache.write(pattern(13, 5 * MiB, MiB - 12 * 1024), 5 * MiB);
    await cache.flush();
    assert.equal(core.ctx.gcThresholdSegments, 4);
    const gens = Array.from(core.ctx.segments.gen);
    const usedBefore = core.ctx.segments.usedCount;
    events.length = 0;
    assert.equal(await cache.gcStep(), true);
    const keyTailWrite = events.findIndex((e) => isTailWrite(e, keyTailOffsetsBytes));
    const syncAfter = events.findIndex((e, i) => i > keyTailWrite && e.device === 'cache' && e.kind === 'sync');
    assert.ok(keyTailWrite >= 0 && syncAfter > keyTailWrite, 'key_tail is written and synced');
    assert.equal(cache.status().keyTail, cache.status().dirtyTail, 'GC stops at dirty_tail');
    assert.ok(core.ctx.segments.usedCount < usedBefore, 'segments were freed');
    const bumped = Array.from(core.ctx.segments.gen).filter((gen, segment) => gen > (gens[segment] ?? 0));
    assert.ok(bumped.length >= 2, 'freed segments get a new generation');
    // The written-back data is still readable (from the backing device now) and stale index entries are gone.
    assert.deepEqual(await readBytes(cache, 0, 8 * S), pattern(10, 0, 8 * S));
    assert.ok(cache.status().counters.staleKeysRemoved > 0);
    assert.deepEqual(await cache.check(), []);
  });

  it('sweeps stale index entries once a quarter of the segments has been freed, and reads stay right before that', async () => {
    // 32 segments of 1 MiB: a sweep every 8 freed segments. GC runs whenever it can
    // (gc_percent 0; a higher one would let a clean cache fill up first). One 4 KiB key per kset
    // (a flush after every write), so that a GC round (64 ksets) frees at most one segment.
    // A sweep leaves a subtree's stale entries while they are at most half its rows
    // (cache_index.ts), so the 1,024 keys of the first 4 MiB go once more than 512 are stale.
    const rig = await recordingRig({ segments: 32, gcPercent: 0 });
    const { cache } = rig;
    cache.setTuning({ sequentialCutoffBytes: 0 }); // sequential on purpose: every write must be cached
    const sweepEveryFreed = 32 / gcSweepSegmentsDivisor;
    const blockBytes = 4096;
    const blocks = 12 * (MiB / blockBytes);
    for (let i = 0; i < blocks; i++) {
      await cache.write(pattern(i, i * blockBytes, blockBytes), i * blockBytes);
      await cache.flush();
    }
    await cache.drain();
    const freed = (): number => cache.status().counters.gcSegmentsFreed;
    let sawUnswept = false;
    let swept = false;
    let read = false;
    while (await cache.gcStep()) {
      const keys = cache.status().indexKeys;
      if (freed() < sweepEveryFreed) {
        // Segments of 256 keys may have been freed: their index entries are stale but still
        // there (no sweep yet), and a read skips them. (The read drops the stale entry it met,
        // and its fill may take a stale neighbour's row: at most two fewer.)
        assert.ok(keys >= blocks - 2, `no sweep before ${sweepEveryFreed} segments are freed (${freed()} so far, ${keys} keys)`);
        if (freed() > 0) {
          sawUnswept = true;
          if (!read) assert.deepEqual(await readBytes(cache, 0, blockBytes), pattern(0, 0, blockBytes));
          read = true;
        }
      } else if (!swept && keys < blocks - 512) {
        swept = true;
      }
    }
    assert.ok(sawUnswept && swept, 'GC freed one segment, then more, in separate rounds, and a sweep removed stale entries');
    assert.ok(cache.status().counters.staleKeysRemoved > 512);
    for (let i = 0; i < blocks; i += 97) assert.deepEqual(await readBytes(cache, i * blockBytes, blockBytes), pattern(i, i * blockBytes, blockBytes));
    assert.deepEqual(await cache.check(), []);
  });

  it('writeback, GC and the sweep give way between every piece and still finish their work', async () => {
    // Every pace() defers: each piece of background work resumes in a later microtask, and
    // reads, writes and the check in between must see a consistent cache. The blocks go round
    // six 4 MiB subtrees, so each segment's keys are spread over all of them and a sweep that
    // stopped after its first piece would leave most of a freed segment's entries behind.
    const timers = new SlicingTimers();
    const rig = await recordingRig({ segments: 32, gcPercent: 0, timers });
    const { cache } = rig;
    cache.setTuning({ sequentialCutoffBytes: 0 });
    const blockBytes = 4096;
    const subtrees = 6;
    // Enough to free the segments a sweep waits for (a quarter of them).
    const blocks = 12 * (MiB / blockBytes);
    const offsetOf = (i: number): number => (i % subtrees) * 4 * MiB + Math.floor(i / subtrees) * blockBytes;
    for (let i = 0; i < blocks; i++) {
      await cache.write(pattern(i, offsetOf(i), blockBytes), offsetOf(i));
      await cache.flush();
    }
    await cache.drain();
    const deferredByWriteback = timers.deferrals;
    assert.ok(deferredByWriteback > blocks, `writeback gave way per kset and per write (${deferredByWriteback})`);
    const freed = (): number => cache.status().counters.gcSegmentsFreed;
    let swept = false;
    while (await cache.gcStep()) {
      const keys = cache.status().indexKeys;
      if (keys < blocks && !swept) {
        // The first sweep that removes anything: each subtree is then more than half stale
        // (cache_index.ts), more than 128 of its 256 keys; one that stopped after its first
        // subtree would have removed at most 256.
        swept = true;
        assert.ok(keys < blocks - 512, `the sweep finished within the step that started it (${keys} keys left)`);
      }
    }
    assert.ok(swept, `GC freed segments (${freed()})`);
    assert.ok(timers.deferrals > deferredByWriteback, 'GC gave way too');
    for (let i = 0; i < blocks; i += 61) assert.deepEqual(await readBytes(cache, offsetOf(i), blockBytes), pattern(i, offsetOf(i), blockBytes));
    assert.deepEqual(await cache.check(), []);
  });

  it('a full cache makes writes wait for space instead of failing them', async () => {
    const rig = await recordingRig({ segments: 6, gcPercent: 0 });
    const { cache, backingDevice } = rig;
    backingDevice.failWrites = 'backing offline';
    // Six segments: one log, one reserved for the log, four for data; fill them.
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 6; i++) writes.push(cache.write(pattern(20 + i, i * MiB, MiB - 16 * 1024), i * MiB));
    let finished = 0;
    for (const write of writes) void write.then(() => { finished++; });
    await settle();
    await cache.writebackStep(); // fails: nothing can be reclaimed
    await settle();
    assert.ok(finished < 6, 'some writes wait for space');
    assert.equal(cache.status().state, 'degraded');
    backingDevice.failWrites = undefined;
    // Writeback and GC (kicked by the waiting writers) make room.
    for (let i = 0; i < 20 && finished < 6; i++) {
      await cache.writebackStep();
      await cache.gcStep();
      await settle();
    }
    await Promise.all(writes);
    for (let i = 0; i < 6; i++) assert.deepEqual(await readBytes(cache, i * MiB, 8 * S), pattern(20 + i, i * MiB, 8 * S));
    assert.deepEqual(await cache.check(), []);
  });

  it('fails a write that waits longer than the configured space timeout with ETIMEDOUT', async () => {
    const cacheDevice = new MemoryDevice(cacheBytesFor(4));
    const backingDevice = new RecordingDevice(new MemoryDevice(32 * MiB), 'backing', [], { blocking: false });
    backingDevice.failWrites = 'offline';
    const timers = new ManualTimers();
    const cache = await Cache.open({ cacheDevice, backingDevice, timers, background: false, tuning: { spaceWaitTimeoutMs: 5000 }, formatIfBlank: { segmentSizeBytes: MiB } });
    const pending = cache.write(pattern(1, 0, 4 * MiB), 0);
    const outcome = pending.then(() => 'done', (error: unknown) => (error as { code?: string }).code);
    await settle();
    timers.advance(5001);
    await settle();
    timers.advance(1);
    assert.equal(await outcome, 'ETIMEDOUT');
  });

  it('persists gc_percent and refuses values outside 0..90', async () => {
    const rig = await openRig();
    await rig.cache.setGcPercent(25);
    await assert.rejects(() => rig.cache.setGcPercent(91), /0 to 90/);
    await assert.rejects(() => rig.cache.setGcPercent(-1), /0 to 90/);
    await rig.cache.close();
    const reopened = await rig.reopen();
    assert.equal(reopened.status().gcPercent, 25);
  });
});

describe('backing device offline', () => {
  it('serves hits, absorbs writes up to the dirty high-water mark, then holds them; drops nothing; recovers', async () => {
    const events: DeviceEvent[] = [];
    const cacheDevice = new MemoryDevice(cacheBytesFor(12));
    const backingDevice = new RecordingDevice(new MemoryDevice(64 * MiB), 'backing', events, { blocking: false });
    const timers = new ManualTimers();
    const cache = await Cache.open({
      cacheDevice, backingDevice, timers, background: true,
      formatIfBlank: { segmentSizeBytes: MiB },
      tuning: { ...eagerWriteback, dirtyHighWaterPercent: 25 },
    });
    await cache.write(pattern(1, 0, 64 * 1024), 0);
    await cache.flush();
    await settle();
    assert.equal(cache.status().dirtyBytes, 0, 'written back while online');
    backingDevice.failWrites = 'device removed';
    backingDevice.failCode = 'ENODEV';
    backingDevice.failReads = true;
    const highWater = cache.status().dirtyHighWaterBytes;
    assert.equal(highWater, Math.floor((12 * (MiB - 12 * 1024) * 25) / 100));
    // Writes are absorbed while dirty data stays below the mark.
    let written = 0;
    let offset = 1 * MiB;
    while (cache.status().state !== 'backing-offline' || cache.status().dirtyBytes < highWater) {
      await cache.write(pattern(100 + written, offset, 64 * 1024), offset);
      await cache.flush();
      await settle();
      written++;
      offset += 64 * 1024;
      assert.ok(written < 200, 'the high-water mark is reached');
    }
    const status = cache.status();
    assert.equal(status.state, 'backing-offline');
    assert.match(status.stateReason ?? '', /backing offline since 2026-01-01T.*device removed/);
    assert.ok(status.backingOfflineSince !== undefined);
    // Hits are still served; misses fail.
    assert.deepEqual(await readBytes(cache, 0, 4096), pattern(1, 0, 4096));
    await assert.rejects(() => readBytes(cache, 40 * MiB, 4096), /device removed/);
    // The next write is held, not failed.
    let heldDone = false;
    const held = cache.write(pattern(999, offset, 4096), offset).then(() => { heldDone = true; });
    const isHeldDone = (): boolean => heldDone; // read through a call: it changes behind the compiler's back
    for (let i = 0; i < 5; i++) {
      timers.advance(30_000);
      await settle();
    }
    assert.equal(isHeldDone(), false, 'the write is held while the backing device is offline');
    assert.ok(cache.status().dirtyBytes >= highWater, 'nothing was dropped');
    // The device comes back: writeback catches up and the held write goes through.
    backingDevice.failWrites = undefined;
    backingDevice.failReads = false;
    timers.advance(30_000);
    for (let i = 0; i < 20 && !isHeldDone(); i++) {
      await settle();
      timers.advance(1000);
    }
    await held;
    assert.equal(cache.status().state, 'running');
    await cache.drain();
    const backing = Buffer.from(backingDevice.inner.bytes);
    for (let i = 0; i < written; i++) {
      const at = 1 * MiB + i * 64 * 1024;
      assert.ok(backing.subarray(at, at + 64 * 1024).equals(pattern(100 + i, at, 64 * 1024)), `write ${i} reached the backing device`);
    }
    assert.ok(backing.subarray(offset, offset + 4096).equals(pattern(999, offset, 4096)));
    await cache.close();
  });

  it('marks the backing device offline after writeback has failed for backingOfflineAfterMs', async () => {
    const rig = await recordingRig({ background: true });
    rig.backingDevice.failWrites = 'timeouts';
    const cache = await Cache.open({ cacheDevice: rig.cacheDevice, backingDevice: rig.backingDevice, timers: rig.timers, background: true, tuning: { ...eagerWriteback, backingOfflineAfterMs: 5000 } });
    await rig.cache.close().catch(() => undefined);
    await cache.write(pattern(3, 0, 4096), 0);
    await cache.flush();
    await settle();
    assert.equal(cache.status().state, 'degraded');
    for (let i = 0; i < 8; i++) {
      rig.timers.advance(1000);
      await settle();
    }
    assert.equal(cache.status().state, 'backing-offline');
    assert.match(cache.status().stateReason ?? '', /failed for \d+ s: timeouts/);
  });
});

describe('cache device faults', () => {
  it('a failed data write fails that request with EIO and nothing else', async () => {
    const rig = await recordingRig();
    await rig.cache.write(pattern(1, 0, 4096), 0);
    rig.cacheDevice.failWrites = 'media error';
    await assert.rejects(() => rig.cache.write(pattern(2, 8192, 4096), 8192), (e: unknown) => (e as { code?: string }).code === 'EIO');
    rig.cacheDevice.failWrites = undefined;
    assert.equal(rig.cache.status().counters.cacheIoErrors, 1);
    assert.equal(rig.cache.status().state, 'running');
    await rig.cache.write(pattern(3, 8192, 4096), 8192);
    await rig.cache.flush();
    assert.deepEqual(await readBytes(rig.cache, 0, 4096), pattern(1, 0, 4096));
    assert.deepEqual(await readBytes(rig.cache, 8192, 4096), pattern(3, 8192, 4096));
    assert.deepEqual(await rig.cache.check(), []);
  });

  it('a failed commit makes every later flush, FUA and write fail until restart; reads go on; status says failed', async () => {
    const rig = await recordingRig();
    await rig.cache.write(pattern(1, 0, 4096), 0);
    await rig.cache.flush();
    await rig.cache.write(pattern(2, 4096, 4096), 4096);
    rig.cacheDevice.failSyncs = 'sync failed';
    await assert.rejects(() => rig.cache.flush(), /cache device failed while committing ksets.*sync failed/);
    rig.cacheDevice.failSyncs = undefined; // the device "recovers", but durability is unknown: sticky
    await assert.rejects(() => rig.cache.flush(), /restart pcache/);
    await assert.rejects(() => rig.cache.write(pattern(3, 8192, 4096), 8192, { fua: true }), /restart pcache/);
    await assert.rejects(() => rig.cache.write(pattern(3, 8192, 4096), 8192), /restart pcache/);
    const status = rig.cache.status();
    assert.equal(status.state, 'failed');
    assert.match(status.stateReason ?? '', /sync failed/);
    assert.deepEqual(await readBytes(rig.cache, 0, 4096), pattern(1, 0, 4096), 'reads go on');
    rig.cache.abandon();
    const restarted = await rig.open();
    assert.equal(restarted.status().state, 'running');
    assert.deepEqual(await readBytes(restarted, 0, 4096), pattern(1, 0, 4096), 'flushed data survived');
    await restarted.write(pattern(4, 8192, 4096), 8192);
    await restarted.flush();
    assert.deepEqual(await restarted.check(), []);
  });
});
