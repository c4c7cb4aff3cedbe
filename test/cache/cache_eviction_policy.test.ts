// Admission and eviction beyond FIFO: the ghost memory of recent misses, the admission rule,
// and, through the real engine, a hot set that survives a scan larger than the cache and data
// that GC's second chance re-logs instead of evicting (cache_admission.ts,
// cache_second_chance.ts). Each engine test fails with plain FIFO eviction and every miss
// admitted: the scan or the cold data pushes the hot set out.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache } from '../../src/cache/cache.js';
import { admitAllFreeSegments, MissGhosts, ReadAdmission } from '../../src/cache/cache_admission.js';
import { gcCleanReserveSegments } from '../../src/cache/cache_context.js';
import { Prng } from '../../sim/prng.js';
import { ksetCloseDelayMs } from '../../src/cache/cache_kset.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { MiB } from '../../src/lib/units.js';
import { cacheBytesFor, settle } from '../helpers/cache_fixture.js';

const blockBytes = 4096;
const segments = 16;

describe('ghost memory of misses', () => {
  it('recalls a block missed within its window, forgets it after two windows, and rarely recalls a block never seen', () => {
    const entries = 4096;
    const ghosts = new MissGhosts(entries);
    assert.equal(ghosts.recall(7), false, 'a first miss is not recalled');
    assert.equal(ghosts.recall(7), true, 'a second one is');
    // Blocks past 2^32 (backing devices over 16 TiB) are told apart from their low halves.
    assert.equal(ghosts.recall(7 + 2 ** 32), false);
    for (let block = 1_000_000; block < 1_000_000 + entries - 10; block++) ghosts.recall(block);
    assert.equal(ghosts.recall(7), true, 'remembered across one window of other misses');
    for (let block = 2_000_000; block < 2_000_000 + 2 * entries; block++) ghosts.recall(block);
    assert.equal(ghosts.recall(7), false, 'forgotten after two windows');
    let falsePositives = 0;
    for (let block = 3_000_000; block < 3_000_000 + entries; block++) if (ghosts.recall(block)) falsePositives++;
    assert.ok(falsePositives < entries * 0.15, `${falsePositives} of ${entries} fresh blocks recalled`);
  });

  it('admits every miss while segments are free or the cache is not a read cache, then only a recurring one', () => {
    const admission = new ReadAdmission(64 * MiB);
    assert.equal(admission.admit(0, admitAllFreeSegments + 1, true), 'stored');
    assert.equal(admission.admit(blockBytes, admitAllFreeSegments, true), 'rejected', 'a first miss in a full cache');
    assert.equal(admission.admit(blockBytes, admitAllFreeSegments, true), 'stored', 'the same block again');
    assert.equal(admission.admit(2 * blockBytes + 512, admitAllFreeSegments, true), 'rejected');
    assert.equal(admission.admit(2 * blockBytes, admitAllFreeSegments, true), 'stored', 'remembered by its 4 KiB block');
    assert.equal(admission.admit(9 * blockBytes, 0, false), 'stored', 'much dirty data, or gc_percent 0: every miss');
  });
});

/** A read cache of 16 segments of 1 MiB over 256 MiB, background work on with a manual clock, no sequential cutoff. */
async function readRig(): Promise<{ cache: Cache; timers: ManualTimers; backingDevice: MemoryDevice }> {
  const backingDevice = new MemoryDevice(256 * MiB);
  const fill = new Uint8Array(blockBytes);
  // Every block of the backing device names itself, so a wrong block shows.
  for (let block = 0; block < (256 * MiB) / blockBytes; block++) {
    new DataView(fill.buffer).setUint32(0, block, true);
    await backingDevice.write(fill, block * blockBytes);
  }
  const timers = new ManualTimers();
  const cache = await Cache.open({
    cacheDevice: new MemoryDevice(cacheBytesFor(segments)),
    backingDevice,
    timers,
    background: true,
    formatIfBlank: { segmentSizeBytes: MiB, gcPercent: 70 },
    // The idle and age rules are an hour away: only GC's need moves writeback on.
    tuning: { sequentialCutoffBytes: 0, writebackIdleMs: 3_600_000, writebackMaxAgeMs: 3_600_000 },
  });
  return { cache, timers, backingDevice };
}

/** Reads the blocks one at a time and lets the log commit, writeback and GC run after every 64; returns the hit bytes and checks each block's contents. */
async function readBlocks(rig: { cache: Cache; timers: ManualTimers }, blocks: readonly number[], prefetch = false): Promise<number> {
  const { cache, timers } = rig;
  const before = cache.status().counters.readHitBytes;
  const buffer = new Uint8Array(blockBytes);
  for (let i = 0; i < blocks.length; i++) {
    const block = blocks[i] ?? 0;
    if (prefetch) {
      await cache.cache(block * blockBytes, blockBytes);
    } else {
      const io = cache.read(buffer, block * blockBytes);
      if (io !== undefined) await io;
      assert.equal(new DataView(buffer.buffer).getUint32(0, true), block, `block ${block} read right`);
    }
    if (i % 64 === 63 || i === blocks.length - 1) {
      await settle();
      timers.advance(ksetCloseDelayMs);
      await settle();
      await cache.internals.writeback.idle();
      await cache.internals.gc.idle();
      await settle();
    }
  }
  return cache.status().counters.readHitBytes - before;
}

function range(start: number, count: number): number[] {
  return Array.from({ length: count }, (_, i) => start + i);
}

describe('admission and eviction through the engine', () => {
  it('keeps a hot set through a scan of three times the cache: a full cache stores a miss only when it recurs', async () => {
    const rig = await readRig();
    const hot = range(0, 1024); // 4 MiB, a quarter of the cache
    await readBlocks(rig, hot);
    assert.equal(await readBlocks(rig, hot), hot.length * blockBytes, 'the hot set is cached');
    // One pass over 48 MiB of cold blocks, in an order the sequential cutoff could not see either.
    const cold = range(4096, 12 * 1024).reverse();
    await readBlocks(rig, cold);
    const counters = rig.cache.status().counters;
    assert.ok(counters.fillsNotRecurring > 0, 'first misses of a full cache were not stored');
    assert.equal(await readBlocks(rig, hot), hot.length * blockBytes, 'every block of the hot set still hits');
    assert.deepEqual(await rig.cache.check(), []);
    await rig.cache.close();
  });

  it('stores a moved hot set at its first miss once moving sets have been seen (the admission shadows)', async () => {
    const rig = await readRig();
    // Fill the cache, then let the hot set (a quarter of the cache) move twice.
    await readBlocks(rig, range(0, 16 * 256));
    const hotBlocks = 1024;
    for (let move = 1; move <= 2; move++) {
      const hot = range(move * 8192, hotBlocks);
      for (let pass = 0; pass < 3; pass++) await readBlocks(rig, hot);
    }
    // The next move: its first pass stores what it misses, so its second pass hits. With the
    // recurrence rule alone, the first pass stores nothing and the second misses again.
    const before = rig.cache.status().counters;
    const hot = range(3 * 8192, hotBlocks);
    assert.equal(await readBlocks(rig, hot), 0, 'the first pass misses');
    const hits = await readBlocks(rig, hot);
    assert.ok(hits >= 0.9 * hotBlocks * blockBytes, `${hits / blockBytes} of ${hotBlocks} hit on the second pass`);
    const counters = rig.cache.status().counters;
    assert.equal(counters.fillsNotRecurring, before.fillsNotRecurring, 'no first miss was turned away');
    assert.ok(counters.fillsFirstMissStored > before.fillsFirstMissStored, 'first misses were stored for the shadows\' choice');
    assert.equal(rig.cache.internals.reads.admission.shadow?.storeEveryMiss, true, 'the shadows found that storing every miss pays');
    assert.deepEqual(await rig.cache.check(), []);
    await rig.cache.close();
  });

  it('re-logs hit data at GC instead of evicting it (second chance), while cold data is evicted', async () => {
    const rig = await readRig();
    const hot = range(0, 1024);
    await readBlocks(rig, hot);
    // Prefetched data is always stored: here cold data does go into the cache, half a cache of
    // it between two reads of the hot set, so that FIFO evicts the hot set every other lap
    // (about 13 MiB of the 16 hold data) and only GC's second chance keeps it cached.
    const laps = 8;
    let hotHits = 0;
    for (let lap = 0; lap < laps; lap++) {
      const hits = await readBlocks(rig, hot);
      if (lap > 0) hotHits += hits;
      await readBlocks(rig, range(8192 + lap * 2048, 2048), true);
    }
    const counters = rig.cache.status().counters;
    assert.ok(counters.gcSegmentsFreed >= 8, `GC evicted (${counters.gcSegmentsFreed} segments freed)`);
    assert.ok(counters.secondChanceBytes > 0, `the hot set was re-logged (${counters.secondChanceBytes} bytes)`);
    // FIFO hits about half of these (the hot set is evicted every other lap). Not all: copies
    // need room at the data head as the round frees segments, and fills compete for it
    // (measured: 5,432 of 7,168 hit; 2,300 when GC copied before freeing anything).
    const hotReads = (laps - 1) * hot.length * blockBytes;
    assert.ok(hotHits > 0.65 * hotReads, `${hotHits / blockBytes} of ${hotReads / blockBytes} hot reads hit`);
    assert.deepEqual(await rig.cache.check(), []);
    // What a restart replays holds the re-logged copies too.
    await rig.cache.close();
    const reopened = await Cache.open({ cacheDevice: rig.cache.internals.ctx.dev.device, backingDevice: rig.backingDevice, timers: rig.timers, background: false });
    const buffer = new Uint8Array(blockBytes);
    let hitsAfter = 0;
    for (const block of hot) {
      const before = reopened.status().counters.readHitBytes;
      const io = reopened.read(buffer, block * blockBytes);
      if (io !== undefined) await io;
      assert.equal(new DataView(buffer.buffer).getUint32(0, true), block);
      hitsAfter += reopened.status().counters.readHitBytes - before;
    }
    assert.ok(hitsAfter > 0, `after a restart ${hitsAfter / blockBytes} hot blocks hit, read right`);
    await reopened.close();
  });

  it('frees in a GC round of a read cache what fills need, not a whole round of ksets', async () => {
    const rig = await readRig();
    const segmentTable = rig.cache.internals.ctx.segments;
    // Three caches' worth of blocks, prefetched (always stored), GC running after every 64.
    let mostFree = 0;
    for (let chunk = 0; chunk < (3 * segments * 253) / 64; chunk++) {
      await readBlocks(rig, range(chunk * 64, 64), true);
      if (rig.cache.status().counters.gcSegmentsFreed > 0) mostFree = Math.max(mostFree, segmentTable.freeCount);
    }
    const counters = rig.cache.status().counters;
    assert.ok(counters.gcSegmentsFreed >= 2 * segments, `GC evicted two caches' worth (${counters.gcSegmentsFreed} segments freed)`);
    // A round of 64 ksets (here of 64 keys each: 16 MiB) would free most of the cache at once;
    // a read cache's round stops at the log's reserve and one segment more, give or take the
    // kset it stopped after and the log segment it left.
    assert.ok(mostFree <= gcCleanReserveSegments + 3, `at most ${mostFree} segments free after GC`);
    assert.deepEqual(await rig.cache.check(), []);
    await rig.cache.close();
  });

  it('re-logs at GC only data hit in the last half lap while the shadows find that recent hits alone pay', async () => {
    /** Hits of [0, 100) read early and of [100, 200) read later, after GC passed the segment holding both. */
    async function oldAndRecentHits(moving: boolean): Promise<{ old: number; recent: number; recentOnly: boolean }> {
      const rig = await readRig();
      const admission = rig.cache.internals.reads.admission;
      const shadow = admission.shadow;
      assert.ok(shadow !== undefined);
      if (moving) {
        // The shadows see a popular set that moves (half of it, with a new order, every four
        // shadows' worth of reads), of blocks far from the ones read below.
        const prng = new Prng(5);
        const where = new Uint32Array(2 * shadow.capacity);
        // Zipf 0.9 ranks over `where`, by bisecting the cumulative sums.
        const cdf = new Float64Array(where.length);
        let sum = 0;
        for (let k = 0; k < cdf.length; k++) cdf[k] = sum += 1 / Math.pow(k + 1, 0.9);
        const zipf = (from: Prng): number => {
          const u = from.nextFloat() * sum;
          let lo = 0;
          let hi = cdf.length - 1;
          while (lo < hi) {
            const mid = (lo + hi) >>> 1;
            if ((cdf[mid] ?? sum) < u) lo = mid + 1;
            else hi = mid;
          }
          return lo;
        };
        for (let phase = 1; phase <= 8; phase++) {
          for (let i = 0; i < where.length; i++) where[i] = 50_000 + phase * shadow.capacity + i;
          for (let i = where.length - 1; i > 0; i--) {
            const j = prng.nextInt(i + 1);
            const held = where[i] ?? 0;
            where[i] = where[j] ?? 0;
            where[j] = held;
          }
          for (let i = 0; i < 4 * shadow.capacity; i++) admission.observe((where[zipf(prng)] ?? 0) * blockBytes);
        }
      }
      const old = range(0, 100);
      const recent = range(100, 100);
      await readBlocks(rig, range(0, 200), true); // both in the oldest segment
      await readBlocks(rig, old); // hit now: an eighth of a lap's allocation in
      await readBlocks(rig, range(10_000, 1800), true); // half a cache later,
      await readBlocks(rig, recent); // hit again
      // Cold data until GC has passed the oldest segment.
      for (let chunk = 0; rig.cache.status().counters.gcSegmentsFreed === 0; chunk++) await readBlocks(rig, range(20_000 + chunk * 64, 64), true);
      const recentOnly = admission.relogRecentOnly;
      const hits = { old: (await readBlocks(rig, old)) / blockBytes, recent: (await readBlocks(rig, recent)) / blockBytes, recentOnly };
      assert.deepEqual(await rig.cache.check(), []);
      await rig.cache.close();
      return hits;
    }
    const clock = await oldAndRecentHits(false);
    assert.deepEqual(clock, { old: 100, recent: 100, recentOnly: false }, 'plain CLOCK: every hit data re-logged');
    const moving = await oldAndRecentHits(true);
    assert.equal(moving.recentOnly, true, 'the shadows chose recent hits only');
    assert.equal(moving.recent, 100, 'data hit in the last half lap re-logged');
    assert.ok(moving.old <= 10, `${moving.old} of 100 blocks hit long ago still cached`);
  });
});
