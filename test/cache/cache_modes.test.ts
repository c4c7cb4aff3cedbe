// Write modes and the sequential cutoff on the engine (cache_policy.ts, cache_direct.ts): where
// each mode's writes land, what reads fill, what survives a crash, switches with dirty data,
// the ordering of direct writes against cached ones and against reads, bad input, counters.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Cache, cacheModes } from '../../src/cache/cache.js';
import type { BlockDevice } from '../../src/device/block_device.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { KiB, MiB } from '../../src/lib/units.js';
import { StreamTable, streamClientsMax } from '../../src/cache/cache_streams.js';
import { cacheBytesFor, GatedDevice, openRig, pattern, readBytes, RecordingDevice, settle, type DeviceEvent } from '../helpers/cache_fixture.js';
import { isCode } from '../helpers/errors.js';

const block = 4 * KiB;

function backingHolds(backing: MemoryDevice, offsetBytes: number, expected: Uint8Array): boolean {
  const bytes = new Uint8Array(expected.length);
  backing.readSync(bytes, offsetBytes);
  return Buffer.from(bytes).equals(Buffer.from(expected));
}

async function writebackAll(cache: Cache): Promise<void> {
  await cache.flush();
  while (cache.status().dirtyBytes > 0) assert.ok(await cache.writebackStep(), 'writeback made no progress');
}

/** A memory device whose writes wait until released, and whose syncs are counted. */
class WriteGatedDevice implements BlockDevice {
  readonly inner: MemoryDevice;
  readonly sizeBytes: number;
  readonly identity = undefined;
  readonly blocking = undefined;
  gated = false;
  syncs = 0;
  private held: (() => void)[] = [];

  constructor(inner: MemoryDevice) {
    this.inner = inner;
    this.sizeBytes = inner.sizeBytes;
  }

  get heldWrites(): number {
    return this.held.length;
  }

  read(target: Uint8Array, offsetBytes: number): Promise<void> {
    return this.inner.read(target, offsetBytes);
  }

  async write(source: Uint8Array, offsetBytes: number): Promise<void> {
    const copy = source.slice();
    if (this.gated) await new Promise<void>((resolve) => { this.held.push(resolve); });
    this.inner.writeSync(copy, offsetBytes);
  }

  sync(): Promise<void> {
    this.syncs++;
    return Promise.resolve();
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  release(): void {
    const held = this.held;
    this.held = [];
    for (const resolve of held) resolve();
  }
}

async function openOn(cacheDevice: MemoryDevice, backingDevice: BlockDevice): Promise<Cache> {
  return Cache.open({
    cacheDevice,
    backingDevice,
    formatIfBlank: { segmentSizeBytes: MiB, cacheUuid: new Uint8Array(16).fill(7), formatTimeMs: 0 },
    background: false,
    timers: new ManualTimers(),
  });
}

describe('write modes', () => {
  it('writeback is the default and keeps writes in the cache', async () => {
    const rig = await openRig();
    assert.equal(rig.cache.mode, 'writeback');
    assert.equal(rig.cache.status().mode, 'writeback');
    const data = pattern(1, 0, block);
    await rig.cache.write(data, 0);
    assert.ok(!backingHolds(rig.backingDevice, 0, data));
    assert.equal(rig.cache.status().dirtyBytes, block);
  });

  it('writethrough: the backing device holds a write when it is acknowledged, and the cache serves it as a hit', async () => {
    const rig = await openRig();
    await rig.cache.setMode('writethrough');
    const data = pattern(2, 8 * block, 2 * block);
    await rig.cache.write(data, 8 * block);
    assert.ok(backingHolds(rig.backingDevice, 8 * block, data));
    const status = rig.cache.status();
    assert.equal(status.dirtyBytes, 0);
    assert.equal(status.counters.fillsStored, 1);
    assert.equal(status.counters.bypassModeRequests, 1);
    const hits = status.counters.readHitRequests;
    assert.deepEqual(await readBytes(rig.cache, 8 * block, 2 * block), data);
    assert.equal(rig.cache.status().counters.readHitRequests, hits + 1);
  });

  it('writearound: writes go to the backing device only; reads still fill', async () => {
    const rig = await openRig();
    await rig.cache.setMode('writearound');
    const data = pattern(3, 0, block);
    await rig.cache.write(data, 0);
    assert.ok(backingHolds(rig.backingDevice, 0, data));
    assert.equal(rig.cache.status().counters.fillsStored, 0);
    assert.deepEqual(await readBytes(rig.cache, 0, block), data);
    assert.equal(rig.cache.status().counters.readMissRequests, 1);
    assert.equal(rig.cache.status().counters.fillsStored, 1);
    assert.deepEqual(await readBytes(rig.cache, 0, block), data);
    assert.equal(rig.cache.status().counters.readHitRequests, 1);
  });

  it('passthrough: nothing new enters the cache, reads are not admitted', async () => {
    const rig = await openRig();
    await rig.cache.setMode('passthrough');
    const data = pattern(4, 0, block);
    await rig.cache.write(data, 0);
    await rig.cache.writeZeroes(block, block);
    assert.ok(backingHolds(rig.backingDevice, 0, data));
    assert.deepEqual(await readBytes(rig.cache, 0, block), data);
    assert.deepEqual(await readBytes(rig.cache, 0, block), data);
    await rig.cache.cache(0, 2 * block);
    const status = rig.cache.status();
    assert.equal(status.counters.fillsStored, 0);
    assert.equal(status.counters.fillsNotAdmitted, 2);
    assert.equal(status.counters.readHitRequests, 0);
    assert.equal(status.counters.bypassModeRequests, 4); // two writes, two reads
    assert.equal(rig.cache.internals.ctx.index.keyCount, 0);
  });

  it('a write past the cache drops the cached copy durably: a crash never brings the old copy back', async () => {
    for (const mode of ['writethrough', 'writearound', 'passthrough'] as const) {
      const rig = await openRig();
      const old = pattern(5, 0, 2 * block);
      rig.backingDevice.writeSync(old, 0);
      assert.deepEqual(await readBytes(rig.cache, 0, 2 * block), old); // filled: a clean copy
      await rig.cache.flush();
      await rig.cache.setMode(mode);
      const data = pattern(6, block, block);
      await rig.cache.write(data, block);
      assert.deepEqual(await readBytes(rig.cache, block, block), data, mode);
      rig.cache.abandon(); // a crash, nothing more written
      const reopened = await rig.reopen();
      assert.equal(reopened.mode, mode);
      assert.deepEqual(await readBytes(reopened, 0, block), old.subarray(0, block), mode);
      assert.deepEqual(await readBytes(reopened, block, block), data, mode);
      assert.deepEqual(await reopened.check(), []);
    }
  });

  it('the mode survives a restart; an unknown mode changes nothing', async () => {
    const rig = await openRig();
    await rig.cache.setMode('writearound');
    await assert.rejects(rig.cache.setMode('writeforward'), isCode('EINVAL', /unknown mode "writeforward" \(modes: writeback, writethrough, writearound, passthrough\)/));
    assert.equal(rig.cache.mode, 'writearound');
    await rig.cache.close();
    assert.equal((await rig.reopen()).mode, 'writearound');
    for (const mode of cacheModes) await rig.cache.setMode(mode);
    await rig.cache.close();
    assert.equal((await rig.reopen()).mode, 'passthrough');
  });

  it('a cache of format version 1 refuses every mode but writeback', async () => {
    const rig = await openRig({ format: { formatVersion: 1 } });
    await assert.rejects(rig.cache.setMode('writethrough'), isCode('ENOTSUP', /format version 2/));
    await rig.cache.setMode('writeback');
    assert.equal(rig.cache.mode, 'writeback');
  });

  it('leaving writeback with dirty data: reads are served from the cache, overlapping writes stay ordered, and after the drain writes bypass', async () => {
    const rig = await openRig();
    const cache = rig.cache;
    const dirty = pattern(7, 0, 4 * block);
    await cache.write(dirty, 0);
    await cache.setMode('passthrough');
    assert.deepEqual(await readBytes(cache, 0, 4 * block), dirty);
    // Overlaps dirty data: the cache keeps it (writeback would otherwise copy the older data over it).
    const newer = pattern(8, block, block);
    await cache.write(newer, block);
    assert.equal(cache.status().counters.bypassFallbacks, 1);
    // Does not overlap: goes to the backing device at once.
    const apart = pattern(9, 16 * block, block);
    await cache.write(apart, 16 * block);
    assert.ok(backingHolds(rig.backingDevice, 16 * block, apart));
    const expected = Buffer.from(dirty);
    expected.set(newer, block);
    assert.deepEqual(await readBytes(cache, 0, 4 * block), expected);
    await writebackAll(cache);
    assert.ok(backingHolds(rig.backingDevice, 0, expected));
    // Everything written back: the next overlapping write passes the cache and drops its copy.
    const last = pattern(10, 0, 2 * block);
    await cache.write(last, 0);
    assert.equal(cache.status().counters.bypassFallbacks, 1);
    assert.ok(backingHolds(rig.backingDevice, 0, last));
    expected.set(last, 0);
    assert.deepEqual(await readBytes(cache, 0, 4 * block), expected);
    await cache.close();
    assert.deepEqual(await readBytes(await rig.reopen(), 0, 4 * block), expected);
  });

  /** Background work on, default watermarks: 64 KiB of flushed dirty data that writeback leaves alone for a while. */
  async function dirtyBelowWatermark(seed: number): Promise<{ rig: Awaited<ReturnType<typeof openRig>>; data: Uint8Array }> {
    const rig = await openRig({ background: true });
    const data = pattern(seed, 0, 64 * KiB);
    await rig.cache.write(data, 0);
    await rig.cache.flush();
    await settle();
    await rig.cache.internals.writeback.idle();
    assert.equal(rig.cache.status().dirtyBytes, 64 * KiB, 'writeback waits below its start watermark');
    return { rig, data };
  }

  it('leaving writeback drains the dirty data in the background, at once', async () => {
    const { rig, data } = await dirtyBelowWatermark(19);
    const cache = rig.cache;
    await cache.setMode('writethrough');
    for (let round = 0; round < 100 && cache.status().dirtyBytes > 0; round++) {
      await settle();
      await cache.internals.writeback.idle();
    }
    assert.equal(cache.status().dirtyBytes, 0);
    assert.ok(backingHolds(rig.backingDevice, 0, data));
    await cache.close();
  });

  it('check() waits for the drain a switch started: it never compares while that drain still moves dirty_tail', async () => {
    // Below its start watermark writeback runs only for the drain's urgent kicks. The drain's
    // first pass writes back what was durable when it began; the FUA write over dirty data is
    // cached (dirty) and committed meanwhile, so once that pass ends writeback stops (nobody
    // waits) and the drain goes round again: flush, kick, a second round. A check() that waited
    // for writeback and GC only compared in between, and the device (read before the second
    // round persisted dirty_tail) was one round behind the running cache (model test, seed 1).
    const { rig, data } = await dirtyBelowWatermark(20);
    const cache = rig.cache;
    await cache.setMode('writethrough');
    const newer = pattern(21, block, block);
    await cache.write(newer, block, { fua: true });
    assert.equal(cache.status().counters.bypassFallbacks, 1, 'the write over dirty data was cached');
    assert.deepEqual(await cache.check(), []);
    assert.equal(cache.status().dirtyBytes, 0, 'check() returned after the drain ended');
    const expected = Buffer.from(data);
    expected.set(newer, block);
    assert.ok(backingHolds(rig.backingDevice, 0, expected));
    await cache.close();
  });

  it('a switch back to writeback while a direct write is in flight: an overlapping cached write waits for it', async () => {
    const cacheDevice = new MemoryDevice(cacheBytesFor(8));
    const backing = new WriteGatedDevice(new MemoryDevice(64 * MiB));
    const cache = await openOn(cacheDevice, backing);
    await cache.setMode('writearound');
    backing.gated = true;
    const first = pattern(11, 0, block);
    const done = { first: false, second: false };
    const direct = cache.write(first, 0).then(() => { done.first = true; });
    await settle();
    assert.equal(backing.heldWrites, 1);
    await cache.setMode('writeback');
    const second = pattern(12, 0, block);
    const cached = cache.write(second, 0).then(() => { done.second = true; });
    await settle();
    assert.deepEqual(done, { first: false, second: false }, 'the cached write waits for the direct one');
    backing.gated = false;
    backing.release();
    await Promise.all([direct, cached]);
    assert.deepEqual(await readBytes(cache, 0, block), second);
    await writebackAll(cache);
    assert.ok(backingHolds(backing.inner, 0, second));
  });

  it('a direct write waits for a cached write begun before it that still waits for space', async () => {
    const backing = new RecordingDevice(new MemoryDevice(64 * MiB), 'backing', [], { blocking: false });
    const cache = await openOn(new MemoryDevice(cacheBytesFor(6)), backing);
    cache.setTuning({ sequentialCutoffBytes: 0 });
    backing.failWrites = 'the backing device refuses writes, so nothing can be written back';
    // Fill the data segments with dirty data, until a write has to wait for space.
    const pending: Promise<void>[] = [];
    for (let at = 0; at < 8 * MiB; at += 64 * KiB) {
      const state = { finished: false };
      const write = cache.write(pattern(30, at, 64 * KiB), at).then(() => { state.finished = true; });
      await settle();
      if (!state.finished) {
        pending.push(write);
        break;
      }
    }
    assert.equal(pending.length, 1, 'a write waits for space');
    const target = 32 * MiB;
    const done = { cached: false, direct: false };
    const cached = cache.write(pattern(31, target, 64 * KiB), target).then(() => { done.cached = true; });
    await settle();
    await cache.setMode('writearound');
    const newer = pattern(32, target, 64 * KiB);
    let directError: unknown;
    const direct = cache.write(newer, target).then(() => { done.direct = true; }, (error: unknown) => { directError = error; });
    await settle();
    assert.equal(directError, undefined, 'the direct write did not go to the refusing backing device');
    assert.deepEqual(done, { cached: false, direct: false }, 'the direct write waits for the cached one');
    backing.failWrites = undefined;
    cache.retryBackingNow();
    for (let round = 0; round < 1000 && (!done.cached || !done.direct); round++) {
      await cache.writebackStep();
      await cache.gcStep();
      await settle();
    }
    await Promise.all([cached, direct, ...pending]);
    assert.equal(cache.status().counters.bypassFallbacks, 1, 'it met the cached write\'s data not yet written back');
    assert.deepEqual(await readBytes(cache, target, 64 * KiB), newer);
    await cache.drain();
    assert.ok(backingHolds(backing.inner, target, newer));
  });

  it('a read that missed before a direct write landed never stores what it read', async () => {
    const cacheDevice = new MemoryDevice(cacheBytesFor(8));
    const backing = new GatedDevice(new MemoryDevice(64 * MiB));
    const cache = await openOn(cacheDevice, backing);
    await cache.setMode('writearound');
    const old = pattern(13, 0, block);
    backing.inner.writeSync(old, 0);
    backing.gated = true;
    const early = Buffer.alloc(block);
    const read = cache.read(early, 0);
    await settle();
    assert.equal(backing.heldReads, 1);
    const data = pattern(14, 0, block);
    await cache.write(data, 0);
    backing.gated = false;
    backing.release();
    await read;
    assert.ok(early.equals(old) || early.equals(data), 'a read racing with a write returns one of the two');
    assert.equal(cache.status().counters.fillsStored, 0);
    assert.deepEqual(await readBytes(cache, 0, block), data);
  });

  it('FLUSH and FUA sync the backing device after direct writes, and only then', async () => {
    const cacheDevice = new MemoryDevice(cacheBytesFor(8));
    const backing = new WriteGatedDevice(new MemoryDevice(64 * MiB));
    const cache = await openOn(cacheDevice, backing);
    await cache.flush();
    assert.equal(backing.syncs, 0);
    await cache.setMode('writearound');
    await cache.write(pattern(15, 0, block), 0);
    assert.equal(backing.syncs, 0);
    await cache.flush();
    assert.equal(backing.syncs, 1);
    await cache.flush();
    assert.equal(backing.syncs, 1);
    await cache.write(pattern(16, 0, block), 0, { fua: true });
    assert.equal(backing.syncs, 2);
    await cache.setMode('writethrough');
    await cache.write(pattern(17, 0, block), 0);
    assert.equal(backing.syncs, 3, 'writethrough syncs before it keeps a clean copy');
  });

  it('TRIM and WRITE_ZEROES outside writeback zero the backing device and drop cached copies', async () => {
    const rig = await openRig();
    const data = pattern(18, 0, 2 * block);
    await rig.cache.setMode('writethrough');
    await rig.cache.write(data, 0);
    await rig.cache.trim(0, block);
    await rig.cache.writeZeroes(block, block);
    assert.ok(backingHolds(rig.backingDevice, 0, new Uint8Array(2 * block)));
    assert.deepEqual(await readBytes(rig.cache, 0, 2 * block), Buffer.alloc(2 * block));
    rig.cache.abandon();
    assert.deepEqual(await readBytes(await rig.reopen(), 0, 2 * block), Buffer.alloc(2 * block));
  });
});

describe('sequential cutoff', () => {
  it('a stream past sequential_cutoff_bytes bypasses the cache: writes go to the backing device, reads are not admitted', async () => {
    const rig = await openRig({ segments: 16 });
    const cache = rig.cache;
    assert.equal(cache.tuning.sequentialCutoffBytes, 4 * MiB);
    // Relaxed ordering: writes past the cutoff go to the backing device even with dirty data
    // in the cache (under strict they wait for a clean cache: the next test).
    cache.setTuning({ sequentialCutoffBytes: 256 * KiB, writebackOrdering: 'relaxed' });
    const chunk = 64 * KiB;
    for (let at = 0; at < MiB; at += chunk) await cache.write(pattern(20, at, chunk), at);
    const status = cache.status();
    assert.equal(status.dirtyBytes, 256 * KiB, 'the first 256 KiB of the stream were cached');
    assert.equal(status.counters.bypassCutoffRequests, 12);
    assert.equal(status.counters.bypassCutoffBytes, 768 * KiB);
    assert.ok(backingHolds(rig.backingDevice, 256 * KiB, pattern(20, 256 * KiB, chunk)));
    // A second client's requests start their own streams.
    await cache.write(pattern(21, 8 * MiB, chunk), 8 * MiB, { fua: false }, 2);
    assert.equal(cache.status().dirtyBytes, 256 * KiB + chunk);
    for (let at = 0; at < MiB; at += chunk) assert.deepEqual(await readBytes(cache, at, chunk), pattern(20, at, chunk));
    const readStatus = cache.status();
    assert.equal(readStatus.counters.fillsStored, 0);
    assert.equal(readStatus.counters.fillsNotAdmitted, 12);
    // Random reads are admitted.
    rig.backingDevice.writeSync(pattern(22, 32 * MiB, chunk), 32 * MiB);
    await readBytes(cache, 32 * MiB, block);
    assert.equal(cache.status().counters.fillsStored, 1);
  });

  it('under strict ordering (the default), writes past the cutoff go to the backing device only while nothing is dirty', async () => {
    const rig = await openRig({ segments: 16 });
    const cache = rig.cache;
    assert.equal(cache.tuning.writebackOrdering, 'strict');
    cache.setTuning({ sequentialCutoffBytes: 256 * KiB });
    const chunk = 64 * KiB;
    for (let at = 0; at < MiB; at += chunk) await cache.write(pattern(28, at, chunk), at);
    assert.equal(cache.status().counters.bypassCutoffRequests, 0, "the stream's first 256 KiB are dirty: the rest is cached too");
    assert.equal(cache.status().dirtyBytes, MiB);
    assert.ok(!backingHolds(rig.backingDevice, 512 * KiB, pattern(28, 512 * KiB, chunk)), 'nothing reached the backing device ahead of older dirty data');
    await writebackAll(cache);
    assert.equal(cache.status().dirtyBytes, 0);
    // A clean cache: the stream, continuing past its cutoff, goes to the backing device.
    for (let at = MiB; at < 2 * MiB; at += chunk) await cache.write(pattern(29, at, chunk), at);
    assert.equal(cache.status().counters.bypassCutoffRequests, 16);
    assert.ok(backingHolds(rig.backingDevice, MiB, pattern(29, MiB, MiB)));
    assert.equal(cache.status().dirtyBytes, 0);
  });

  it('0 turns it off, and a bad value changes nothing', async () => {
    const rig = await openRig({ segments: 16 });
    assert.throws(() => rig.cache.setTuning({ sequentialCutoffBytes: -1 }), isCode('EINVAL', /sequentialCutoffBytes/));
    assert.throws(() => rig.cache.setTuning({ sequentialCutoffBytes: 1.5 }), isCode('EINVAL', /sequentialCutoffBytes/));
    assert.equal(rig.cache.tuning.sequentialCutoffBytes, 4 * MiB);
    rig.cache.setTuning({ sequentialCutoffBytes: 0 });
    for (let at = 0; at < 8 * MiB; at += MiB) await rig.cache.write(pattern(23, at, MiB), at);
    assert.equal(rig.cache.status().counters.bypassCutoffRequests, 0);
    assert.equal(rig.cache.status().dirtyBytes, 8 * MiB);
  });

  it('a sequential write over dirty data stays in order with it', async () => {
    const rig = await openRig({ segments: 16 });
    const cache = rig.cache;
    cache.setTuning({ sequentialCutoffBytes: 8 * KiB });
    await cache.write(pattern(24, 16 * KiB, block), 16 * KiB, { fua: false }, 9);
    for (let at = 0; at < 32 * KiB; at += block) await cache.write(pattern(25, at, block), at);
    assert.deepEqual(await readBytes(cache, 0, 32 * KiB), pattern(25, 0, 32 * KiB));
    await writebackAll(cache);
    assert.ok(backingHolds(rig.backingDevice, 0, pattern(25, 0, 32 * KiB)));
  });

  it('in writeback, a stream past the cutoff that the backing device refuses is absorbed by the cache, never failed', async () => {
    const events: DeviceEvent[] = [];
    const backing = new RecordingDevice(new MemoryDevice(64 * MiB), 'backing', events, { blocking: false });
    const cache = await openOn(new MemoryDevice(cacheBytesFor(8)), backing);
    cache.setTuning({ sequentialCutoffBytes: 8 * KiB, writebackOrdering: 'relaxed' });
    backing.failWrites = 'the backing device refuses writes';
    for (let at = 0; at < 64 * KiB; at += block) await cache.write(pattern(26, at, block), at);
    assert.equal(cache.status().counters.bypassFallbacks, 14);
    assert.equal(cache.status().dirtyBytes, 64 * KiB);
    assert.deepEqual(await readBytes(cache, 0, 64 * KiB), pattern(26, 0, 64 * KiB));
    // The backing device offline: the cutoff is off, writes are absorbed without trying it.
    cache.internals.ctx.backingOffline('gone');
    const cutoffBefore = cache.status().counters.bypassCutoffRequests;
    for (let at = 64 * KiB; at < 128 * KiB; at += block) await cache.write(pattern(27, at, block), at);
    assert.equal(cache.status().counters.bypassFallbacks, 14);
    assert.equal(cache.status().counters.bypassCutoffRequests, cutoffBefore);
    backing.failWrites = undefined;
    await cache.drain();
    assert.ok(backingHolds(backing.inner, 0, pattern(26, 0, 64 * KiB)));
    assert.ok(backingHolds(backing.inner, 64 * KiB, pattern(27, 64 * KiB, 64 * KiB)));
  });

  it('the stream table stays bounded', () => {
    const table = new StreamTable();
    for (let client = 0; client < 3 * streamClientsMax; client++) table.note(client, 0, block);
    assert.equal(table.clientCount, streamClientsMax);
    assert.equal(table.note(1, 0, block), block);
    assert.equal(table.note(1, block, block), 2 * block);
    // Nine interleaved streams of one client: the least recently used one is forgotten.
    for (let stream = 0; stream < 9; stream++) table.note(7, stream * MiB, block);
    assert.equal(table.note(7, 8 * MiB + block, block), 2 * block);
    assert.equal(table.note(7, block, block), block);
  });

  it('the stream table keeps clients apart, also when the last request\'s client is forgotten', () => {
    const table = new StreamTable();
    // Two clients alternating, each with its own run at the same offsets: neither continues the other's.
    assert.equal(table.note(1, 0, block), block);
    assert.equal(table.note(2, 0, block), block);
    assert.equal(table.note(1, block, block), 2 * block);
    assert.equal(table.note(2, block, block), 2 * block);
    assert.equal(table.note(2, 2 * block, block), 3 * block);
    // Client 1 (the oldest) is forgotten while client 1 sent the last request: its next request
    // starts a new run instead of continuing through a table entry that no longer exists.
    const full = new StreamTable();
    for (let client = 0; client < streamClientsMax; client++) full.note(client, 0, block);
    assert.equal(full.note(0, block, block), 2 * block, 'client 0 continues its run');
    assert.equal(full.note(streamClientsMax, 0, block), block, 'a new client evicts the oldest, client 0');
    assert.equal(full.note(0, 2 * block, block), block, 'client 0 starts afresh');
    assert.equal(full.clientCount, streamClientsMax);
  });
});
