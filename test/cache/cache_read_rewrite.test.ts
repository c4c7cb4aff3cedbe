// Fragmented dirty reads stored again as one piece (cache_read_rewrite.ts). Each test lays a
// range down in scrambled 4 KiB writes, so it lies in 32 pieces over the log, and checks when a
// rewrite happens (the second fragmented read at an offset) and what it publishes against what
// the index held, whatever landed while it was being written.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockDevice } from '../../src/device/block_device.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache } from '../../src/cache/cache.js';
import type { CacheTuning } from '../../src/cache/cache_tuning.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { KiB, MiB } from '../../src/lib/units.js';
import { RecentFragmentedReads, recentFragmentedReadsMax } from '../../src/cache/cache_read_rewrite.js';
import { cacheBytesFor, GatedDevice, pattern, readBytes, settle } from '../helpers/cache_fixture.js';

const piece = 4 * KiB;
const pieces = 32;
const rangeBytes = pieces * piece;
const firstTag = 0xa1;
const newerTag = 0xa2;

/** A cache of 32 segments of 1 MiB over a 64 MiB backing device, no background work. */
async function open(cacheDevice: BlockDevice, backing: MemoryDevice, tuning: Partial<CacheTuning> = {}, dataCrc = false): Promise<Cache> {
  return Cache.open({
    cacheDevice, backingDevice: backing, background: false, timers: new ManualTimers(), tuning,
    formatIfBlank: { segmentSizeBytes: MiB, cacheUuid: new Uint8Array(16).fill(7), formatTimeMs: 0, gcPercent: 0, dataCrc },
  });
}

/** Writes every piece of [0, 128 KiB) with `tag`, one 4 KiB write each, no two neighbours one after the other. */
async function layDown(cache: Cache, tag: number): Promise<void> {
  for (let i = 0; i < pieces; i++) {
    const at = ((i * 7) % pieces) * piece;
    await cache.write(pattern(tag, at, piece), at);
  }
}

/** What the range must read as: `firstTag` but where `exceptions` say otherwise. */
function expected(exceptions: Map<number, number | 'zero'> = new Map()): Buffer {
  const out = Buffer.alloc(rangeBytes);
  for (let i = 0; i < pieces; i++) {
    const tag = exceptions.get(i) ?? firstTag;
    if (tag !== 'zero') out.set(pattern(tag, i * piece, piece), i * piece);
  }
  return out;
}

/** The index entries over the range, as [start, length] pairs in KiB. */
function entries(cache: Cache): number[][] {
  const subtree = cache.internals.ctx.index.subtree(0, false);
  assert.ok(subtree !== undefined);
  const out: number[][] = [];
  for (let index = subtree.seek(0); index < subtree.count && subtree.start(index) < rangeBytes; index++) {
    out.push([subtree.start(index) / KiB, subtree.length(index) / KiB]);
  }
  return out;
}

function counters(cache: Cache): { fragmentRewrites: number; fragmentRewriteBytes: number } {
  return cache.status().counters;
}

describe('fragmented dirty reads rewritten', () => {
  for (const dataCrc of [false, true]) {
    it(`the second read of 32 dirty pieces stores them again as one piece; the device reads the same before and after a restart, and after writeback${dataCrc ? ' (data CRC)' : ''}`, async () => {
      const cacheDevice = new MemoryDevice(cacheBytesFor(32));
      const backing = new MemoryDevice(64 * MiB);
      let cache = await open(cacheDevice, backing, {}, dataCrc);
      await layDown(cache, firstTag);
      assert.equal(entries(cache).length, pieces);
      assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
      assert.equal(counters(cache).fragmentRewrites, 0, 'a first read is not rewritten');
      assert.equal(entries(cache).length, pieces);
      assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
      assert.deepEqual(counters(cache), { ...counters(cache), fragmentRewrites: 1, fragmentRewriteBytes: rangeBytes });
      // One key over the whole range; with data CRC, keys of at most keyMaxBytes (32 KiB) each.
      const keyKiB = Math.min(rangeBytes, cache.internals.ctx.keyMaxBytes) / KiB;
      const rewritten = Array.from({ length: rangeBytes / KiB / keyKiB }, (_, i) => [i * keyKiB, keyKiB]);
      assert.deepEqual(entries(cache), rewritten, 'the range in as few keys as keys may be long');
      assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
      assert.equal(counters(cache).fragmentRewrites, 1, 'one piece is not rewritten again');
      // The rewrite is in the log like a write: after an unclean stop, replay finds it.
      await cache.flush();
      cache.abandon();
      cache = await open(cacheDevice, backing, {}, dataCrc);
      assert.deepEqual(entries(cache), rewritten);
      assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
      assert.deepEqual(await cache.check(), [], 'the structural checker agrees with the running cache');
      await cache.drain();
      const onBacking = Buffer.alloc(rangeBytes);
      await backing.read(onBacking, 0);
      assert.ok(onBacking.equals(expected()), 'writeback wrote the range');
      await cache.close();
    });
  }

  it('writes and trims that land while the rewrite is written keep their data; the rewrite fills around them', async () => {
    const device = new GatedDevice(new MemoryDevice(cacheBytesFor(32)));
    const backing = new MemoryDevice(64 * MiB);
    const cache = await open(device, backing);
    await layDown(cache, firstTag);
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    device.holdWrites = true;
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    await settle();
    assert.equal(device.heldWrites.length, 1, 'the rewrite\'s data write is out');
    // A write of piece 5 and of pieces 20-21 that publish before the rewrite does, a trim of piece 9.
    const written = cache.write(pattern(newerTag, 5 * piece, piece), 5 * piece);
    const writtenTwo = cache.write(pattern(newerTag, 20 * piece, 2 * piece), 20 * piece);
    await settle();
    device.releaseWrite(piece);
    device.releaseWrite(2 * piece);
    await Promise.all([written, writtenTwo]);
    await cache.trim(9 * piece, piece);
    // A write queued after the rewrite that publishes after it: it wins as any newer write does.
    const late = cache.write(pattern(newerTag, 30 * piece, piece), 30 * piece);
    await settle();
    device.releaseWrite(rangeBytes);
    await settle();
    device.releaseWrites();
    await late;
    await settle();
    const want = expected(new Map<number, number | 'zero'>([[5, newerTag], [9, 'zero'], [20, newerTag], [21, newerTag], [30, newerTag]]));
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(want));
    assert.equal(counters(cache).fragmentRewrites, 1);
    assert.equal(counters(cache).fragmentRewriteBytes, rangeBytes - 4 * piece, 'everything but the pieces written or trimmed before it published');
    assert.deepEqual(entries(cache), [[0, 20], [20, 4], [24, 12], [36, 4], [40, 40], [80, 8], [88, 32], [120, 4], [124, 4]]);
    await cache.drain();
    const onBacking = Buffer.alloc(rangeBytes);
    await backing.read(onBacking, 0);
    assert.ok(onBacking.equals(want));
    await cache.close();
  });

  it('reads at other offsets do not count; the oldest offsets are forgotten beyond the bound', async () => {
    const cache = await open(new MemoryDevice(cacheBytesFor(32)), new MemoryDevice(64 * MiB));
    await layDown(cache, firstTag);
    assert.ok((await readBytes(cache, 0, rangeBytes - piece)).equals(expected().subarray(0, rangeBytes - piece)));
    assert.ok((await readBytes(cache, piece, rangeBytes - piece)).equals(expected().subarray(piece)));
    assert.equal(counters(cache).fragmentRewrites, 0, 'two reads at two offsets');
    assert.ok((await readBytes(cache, piece, rangeBytes - piece)).equals(expected().subarray(piece)));
    assert.equal(counters(cache).fragmentRewrites, 1, 'the second at the same offset');
    await cache.close();

    const recent = new RecentFragmentedReads();
    for (let i = 0; i <= recentFragmentedReadsMax; i++) assert.equal(recent.seenBefore(i * MiB), false);
    assert.equal(recent.seenBefore(0), false, 'the oldest went when the table was full');
    assert.equal(recent.seenBefore(recentFragmentedReadsMax * MiB), true, 'the newest is still there');
    assert.equal(recent.seenBefore(recentFragmentedReadsMax * MiB), false, 'and is forgotten once it counted');
  });

  it('no rewrite: turned off, too few dirty pieces, written back already, a part not cached, outside writeback mode, or no room', async () => {
    const cases: { what: string; prepare: (cache: Cache) => Promise<void>; tuning?: Partial<CacheTuning>; readBytes?: number }[] = [
      { what: 'turned off', prepare: () => Promise.resolve(), tuning: { fragmentedRewritePieces: 0 } },
      { what: 'fewer dirty pieces than the setting', prepare: () => Promise.resolve(), tuning: { fragmentedRewritePieces: pieces + 1 } },
      { what: 'written back (gathering off, so the walk serves it)', prepare: async (cache) => { await cache.drain(); }, tuning: { fragmentedReadPieces: 0 } },
      { what: 'a part not cached', prepare: () => Promise.resolve(), readBytes: rangeBytes + piece },
      { what: 'writethrough mode', prepare: async (cache) => { await cache.setMode('writethrough'); } },
      { what: 'dirty data near writeback\'s band', prepare: () => Promise.resolve(), tuning: { writebackStopPercent: 0, writebackStartPercent: 0 } },
    ];
    for (const { what, prepare, tuning, readBytes: length } of cases) {
      const cache = await open(new MemoryDevice(cacheBytesFor(32)), new MemoryDevice(64 * MiB), tuning);
      await layDown(cache, firstTag);
      await prepare(cache);
      for (let read = 0; read < 2; read++) {
        const bytes = await readBytes(cache, 0, length ?? rangeBytes);
        assert.ok(bytes.subarray(0, rangeBytes).equals(expected()), what);
      }
      assert.equal(counters(cache).fragmentRewrites, 0, what);
      assert.equal(entries(cache).length, pieces, what);
      await cache.close();
    }
  });
});
