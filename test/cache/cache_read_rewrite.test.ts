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
async function open(cacheDevice: BlockDevice, backing: MemoryDevice, tuning: Partial<CacheTuning> = {}, dataCrc = false, more: { gcPercent?: number; readOnly?: boolean } = {}): Promise<Cache> {
  return Cache.open({
    cacheDevice, backingDevice: backing, background: false, timers: new ManualTimers(), tuning, readOnly: more.readOnly === true,
    formatIfBlank: { segmentSizeBytes: MiB, cacheUuid: new Uint8Array(16).fill(7), formatTimeMs: 0, gcPercent: more.gcPercent ?? 0, dataCrc },
  });
}

/** Writes `count` pieces from `start` with `tag`, one 4 KiB write each, no two neighbours one after the other (7 is prime to every count used). */
async function layDownAt(cache: Cache, tag: number, start: number, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const at = start + ((i * 7) % count) * piece;
    await cache.write(pattern(tag, at, piece), at);
  }
}

/** Writes every piece of [0, 128 KiB) with `tag`, as layDownAt does. */
async function layDown(cache: Cache, tag: number): Promise<void> {
  await layDownAt(cache, tag, 0, pieces);
}

/** What `count` pieces from `start` laid down with `tag` read as. */
function patternRun(tag: number, start: number, count: number): Buffer {
  const out = Buffer.alloc(count * piece);
  for (let i = 0; i < count; i++) out.set(pattern(tag, start + i * piece, piece), i * piece);
  return out;
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

/** The index entries over [start, end) (one subtree; the first range by default), as [start, length] pairs in KiB. */
function entries(cache: Cache, start = 0, end = rangeBytes): number[][] {
  const subtree = cache.internals.ctx.index.subtree(start, false);
  assert.ok(subtree !== undefined);
  const out: number[][] = [];
  for (let index = subtree.seek(start); index < subtree.count && subtree.start(index) < end; index++) {
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

  for (const dataCrc of [false, true]) {
    it(`writes and trims that land while the rewrite is written keep their data; the rewrite fills around them${dataCrc ? ' (data CRC: 32 KiB keys, each run its own CRC)' : ''}`, async () => {
      const device = new GatedDevice(new MemoryDevice(cacheBytesFor(32)));
      const backing = new MemoryDevice(64 * MiB);
      const cache = await open(device, backing, {}, dataCrc);
      const partBytes = Math.min(rangeBytes, cache.internals.ctx.keyMaxBytes);
      await layDown(cache, firstTag);
      assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
      device.holdWrites = true;
      assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
      await settle();
      assert.equal(device.heldWrites.length, rangeBytes / partBytes, 'the rewrite\'s data writes are out');
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
      for (let part = 0; part < rangeBytes / partBytes; part++) device.releaseWrite(partBytes);
      await settle();
      device.releaseWrites();
      await late;
      await settle();
      const want = expected(new Map<number, number | 'zero'>([[5, newerTag], [9, 'zero'], [20, newerTag], [21, newerTag], [30, newerTag]]));
      assert.ok((await readBytes(cache, 0, rangeBytes)).equals(want));
      assert.equal(counters(cache).fragmentRewrites, 1);
      assert.equal(counters(cache).fragmentRewriteBytes, rangeBytes - 4 * piece, 'everything but the pieces written or trimmed before it published');
      if (!dataCrc) assert.deepEqual(entries(cache), [[0, 20], [20, 4], [24, 12], [36, 4], [40, 40], [80, 8], [88, 32], [120, 4], [124, 4]]);
      assert.deepEqual(await cache.check(), [], 'segment references and the log agree with the device');
      await cache.drain();
      const onBacking = Buffer.alloc(rangeBytes);
      await backing.read(onBacking, 0);
      assert.ok(onBacking.equals(want));
      await cache.close();
    });
  }

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

describe('fragmented dirty reads rewritten: the edges', () => {
  it('a 4 MiB read of 1,024 dirty pieces is rewritten (its piece table outgrows its first size); one of 4 MiB + 4 KiB is not', async () => {
    const count = (4 * MiB) / piece;
    // A cache device that completes later: then every read records into a table of its own, so
    // the table of the read that is rewritten grows while it records (a blocking device's reads
    // share one table, which the first read grew already).
    const cache = await open(new GatedDevice(new MemoryDevice(cacheBytesFor(32))), new MemoryDevice(64 * MiB));
    await layDownAt(cache, firstTag, 0, count);
    for (let read = 0; read < 2; read++) assert.ok((await readBytes(cache, 0, 4 * MiB)).equals(patternRun(firstTag, 0, count)));
    await settle();
    assert.equal(counters(cache).fragmentRewrites, 1);
    assert.equal(counters(cache).fragmentRewriteBytes, 4 * MiB, 'every piece of the table matched');
    // One key per segment the rewrite's data went to (a segment holds less than 1 MiB of data).
    const keys = entries(cache, 0, 4 * MiB);
    assert.ok(keys.length <= Math.ceil((4 * MiB) / cache.internals.ctx.dev.dataSizeBytes) + 1, `${keys.length} keys`);
    assert.deepEqual(keys.map(([start]) => start), keys.map((_, i) => keys.slice(0, i).reduce((sum, [, length]) => sum + (length ?? 0), 0)), 'back to back');
    assert.equal(keys.reduce((sum, [, length]) => sum + (length ?? 0), 0), 4096);
    assert.ok((await readBytes(cache, 0, 4 * MiB)).equals(patternRun(firstTag, 0, count)));
    assert.deepEqual(await cache.check(), []);
    await cache.close();

    const larger = await open(new MemoryDevice(cacheBytesFor(32)), new MemoryDevice(64 * MiB));
    await layDownAt(larger, firstTag, 8 * MiB, count + 1);
    for (let read = 0; read < 2; read++) assert.ok((await readBytes(larger, 8 * MiB, 4 * MiB + piece)).equals(patternRun(firstTag, 8 * MiB, count + 1)));
    assert.equal(counters(larger).fragmentRewrites, 0, 'past rewriteRequestBytesMax');
    await larger.close();
  });

  it('exactly fragmented_rewrite_pieces dirty pieces are enough', async () => {
    const cache = await open(new MemoryDevice(cacheBytesFor(32)), new MemoryDevice(64 * MiB), { fragmentedRewritePieces: pieces });
    await layDown(cache, firstTag);
    for (let read = 0; read < 2; read++) assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    assert.equal(counters(cache).fragmentRewrites, 1);
    await cache.close();
  });

  it('a range across a 4 MiB subtree boundary is rewritten as one key on each side', async () => {
    const start = 4 * MiB - rangeBytes / 2;
    const cache = await open(new MemoryDevice(cacheBytesFor(32)), new MemoryDevice(64 * MiB));
    await layDownAt(cache, firstTag, start, pieces);
    for (let read = 0; read < 2; read++) assert.ok((await readBytes(cache, start, rangeBytes)).equals(patternRun(firstTag, start, pieces)));
    assert.equal(counters(cache).fragmentRewriteBytes, rangeBytes);
    assert.deepEqual(entries(cache, start, 4 * MiB), [[start / KiB, rangeBytes / 2 / KiB]]);
    assert.deepEqual(entries(cache, 4 * MiB, start + rangeBytes), [[4 * 1024, rangeBytes / 2 / KiB]]);
    assert.deepEqual(await cache.check(), []);
    await cache.close();
  });

  it('a ZERO piece is rewritten as zeroes while it stays ZERO, and keeps data written over it meanwhile', async () => {
    // Still ZERO when the rewrite publishes: the whole range becomes one key.
    let cache = await open(new MemoryDevice(cacheBytesFor(32)), new MemoryDevice(64 * MiB));
    await layDown(cache, firstTag);
    await cache.trim(9 * piece, piece);
    const zeroed = expected(new Map<number, number | 'zero'>([[9, 'zero']]));
    for (let read = 0; read < 2; read++) assert.ok((await readBytes(cache, 0, rangeBytes)).equals(zeroed));
    assert.equal(counters(cache).fragmentRewriteBytes, rangeBytes);
    assert.deepEqual(entries(cache), [[0, rangeBytes / KiB]]);
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(zeroed));
    assert.deepEqual(await cache.check(), []);
    await cache.close();

    // Written while the rewrite's data is on its way: the newer data stays.
    const device = new GatedDevice(new MemoryDevice(cacheBytesFor(32)));
    cache = await open(device, new MemoryDevice(64 * MiB));
    await layDown(cache, firstTag);
    await cache.trim(9 * piece, piece);
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(zeroed));
    device.holdWrites = true;
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(zeroed));
    await settle();
    const written = cache.write(pattern(newerTag, 9 * piece, piece), 9 * piece);
    await settle();
    device.releaseWrite(piece);
    await written;
    device.releaseWrites();
    await settle();
    const want = expected(new Map<number, number | 'zero'>([[9, newerTag]]));
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(want));
    assert.equal(counters(cache).fragmentRewriteBytes, rangeBytes - piece);
    assert.deepEqual(await cache.check(), []);
    await cache.close();
  });

  it('a rewrite keeps its own copy of the data and of the piece table: the reader reuses its buffer and another rewrite starts meanwhile', async () => {
    const device = new GatedDevice(new MemoryDevice(cacheBytesFor(32)));
    const cache = await open(device, new MemoryDevice(64 * MiB));
    const other = 2 * MiB;
    await layDown(cache, firstTag);
    await layDownAt(cache, newerTag, other, pieces);
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    assert.ok((await readBytes(cache, other, rangeBytes)).equals(patternRun(newerTag, other, pieces)));
    device.holdWrites = true;
    const buffer = Buffer.alloc(rangeBytes);
    await cache.read(buffer, 0);
    assert.ok(buffer.equals(expected()));
    buffer.fill(0xee); // the client's buffer, reused once its read has returned
    // The second rewrite's read records its pieces into the read path's table.
    assert.ok((await readBytes(cache, other, rangeBytes)).equals(patternRun(newerTag, other, pieces)));
    await settle();
    assert.equal(device.heldWrites.length, 2, 'both rewrites\' data writes are out');
    device.releaseWrites();
    await settle();
    assert.equal(counters(cache).fragmentRewrites, 2);
    assert.equal(counters(cache).fragmentRewriteBytes, 2 * rangeBytes, 'each rewrite matched its own pieces');
    assert.deepEqual(entries(cache), [[0, rangeBytes / KiB]]);
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()), 'the rewrite stored what the read returned');
    assert.ok((await readBytes(cache, other, rangeBytes)).equals(patternRun(newerTag, other, pieces)));
    assert.deepEqual(await cache.check(), []);
    await cache.close();
  });

  it('a rewrite whose pieces were all overwritten meanwhile publishes nothing and returns its space', async () => {
    const device = new GatedDevice(new MemoryDevice(cacheBytesFor(32)));
    const cache = await open(device, new MemoryDevice(64 * MiB));
    await layDown(cache, firstTag);
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    device.holdWrites = true;
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    await settle();
    const written = cache.write(pattern(newerTag, 0, rangeBytes), 0);
    await settle();
    // The write's data first (the rewrite's, of the same length, went out before it).
    assert.equal(device.heldWrites.length, 2);
    device.heldWrites.splice(1, 1)[0]?.release();
    await written;
    device.releaseWrites();
    await settle();
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(patternRun(newerTag, 0, pieces)));
    assert.equal(counters(cache).fragmentRewrites, 0, 'nothing published is no rewrite');
    assert.equal(counters(cache).fragmentRewriteBytes, 0);
    assert.deepEqual(await cache.check(), [], 'the allocation\'s segment reference was returned');
    await cache.close();
  });

  it('a rewrite whose data write fails changes nothing: the read is served, the error counted, the space returned', async () => {
    const device = new GatedDevice(new MemoryDevice(cacheBytesFor(32)));
    device.failWritesOfBytes = rangeBytes; // the rewrite's data write, and nothing else this test does
    const cache = await open(device, new MemoryDevice(64 * MiB));
    await layDown(cache, firstTag);
    for (let read = 0; read < 2; read++) assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    await settle();
    assert.equal(cache.status().counters.cacheIoErrors, 1);
    assert.equal(counters(cache).fragmentRewrites, 0);
    assert.equal(entries(cache).length, pieces);
    assert.deepEqual(await cache.check(), []);
    await cache.close();
  });

  it('a rewrite that opens a new segment publishes only once that segment\'s generation is written', async () => {
    const device = new GatedDevice(new MemoryDevice(cacheBytesFor(32)));
    const cache = await open(device, new MemoryDevice(64 * MiB));
    await layDown(cache, firstTag);
    // The head's segment holds the 32 pieces (in order of writing, from its start); fill it
    // with other writes up to half a range before its end, so the rewrite spans two segments.
    const filler = 8 * MiB;
    const fillerBytes = cache.internals.ctx.dev.dataSizeBytes - rangeBytes - rangeBytes / 2;
    for (let written = 0; written < fillerBytes;) {
      const length = Math.min(64 * KiB, fillerBytes - written);
      await cache.write(pattern(0x33, filler + written, length), filler + written);
      written += length;
    }
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    device.holdWrites = true;
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    await settle();
    // The data of both parts, and the new segment's generation.
    assert.equal(device.heldWrites.length, 3);
    device.releaseWrite(rangeBytes / 2);
    device.releaseWrite(rangeBytes / 2);
    await settle();
    assert.equal(counters(cache).fragmentRewrites, 0, 'not published before the generation is written');
    assert.equal(entries(cache).length, pieces);
    device.releaseWrites();
    await settle();
    assert.equal(counters(cache).fragmentRewriteBytes, rangeBytes);
    assert.deepEqual(entries(cache), [[0, rangeBytes / KiB / 2], [rangeBytes / KiB / 2, rangeBytes / KiB / 2]]);
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    assert.deepEqual(await cache.check(), []);
    await cache.close();
  });

  it('no rewrite that would reach GC\'s threshold or leave fewer than two segments free; a rewrite up to either is made', async () => {
    /** A cache with the range laid down, then other dirty data until `used` segments are in use. */
    const cacheUsing = async (segments: number, gcPercent: number, used: number): Promise<Cache> => {
      const cache = await open(new MemoryDevice(cacheBytesFor(segments)), new MemoryDevice(64 * MiB), {}, false, { gcPercent });
      await layDown(cache, firstTag);
      for (let at = 8 * MiB; cache.internals.ctx.segments.usedCount < used; at += 64 * KiB) await cache.write(pattern(0x33, at, 64 * KiB), at);
      assert.equal(cache.internals.ctx.segments.usedCount, used);
      return cache;
    };
    const cases = [
      // 25% of 32 segments: GC's threshold is 8 segments in use (the cache is not mostly clean); 30 free at most.
      { segments: 32, gcPercent: 25, threshold: 8, used: 6, rewritten: true },
      { segments: 32, gcPercent: 25, threshold: 8, used: 7, rewritten: false },
      // No GC threshold: 8 segments, the rewrite's one and two more must stay free.
      { segments: 8, gcPercent: 0, threshold: 0, used: 5, rewritten: true },
      { segments: 8, gcPercent: 0, threshold: 0, used: 6, rewritten: false },
    ];
    for (const { segments, gcPercent, threshold, used, rewritten } of cases) {
      const what = `${segments} segments, gc_percent ${gcPercent}, ${used} in use`;
      const cache = await cacheUsing(segments, gcPercent, used);
      assert.equal(cache.internals.ctx.gcThresholdSegments, threshold, what);
      for (let read = 0; read < 2; read++) assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()), what);
      assert.equal(counters(cache).fragmentRewrites, rewritten ? 1 : 0, what);
      await cache.close();
    }
  });

  it('no rewrite that would take dirty data past writeback_stop_percent; one that stays under it is made', async () => {
    // 8 segments hold 7.9 MiB of data: the range and its rewrite (256 KiB dirty) are 3.2% of it.
    for (const [stopPercent, rewrites] of [[3, 0], [4, 1]] as const) {
      const tuning = { writebackStartPercent: stopPercent, writebackStopPercent: stopPercent };
      const cache = await open(new MemoryDevice(cacheBytesFor(8)), new MemoryDevice(64 * MiB), tuning);
      await layDown(cache, firstTag);
      for (let read = 0; read < 2; read++) assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
      assert.equal(counters(cache).fragmentRewrites, rewrites, `writeback_stop_percent ${stopPercent}`);
      await cache.close();
    }
  });

  it('no rewrite in a cache opened read-only, nor by one abandoned while the rewrite\'s data was written', async () => {
    const memory = new MemoryDevice(cacheBytesFor(32));
    const backing = new MemoryDevice(64 * MiB);
    const writer = await open(memory, backing);
    await layDown(writer, firstTag);
    await writer.close();
    const reader = await open(memory, backing, {}, false, { readOnly: true });
    for (let read = 0; read < 2; read++) assert.ok((await readBytes(reader, 0, rangeBytes)).equals(expected()));
    assert.equal(counters(reader).fragmentRewrites, 0, 'read-only');
    await reader.close();

    const device = new GatedDevice(memory);
    const cache = await open(device, backing);
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    device.holdWrites = true;
    assert.ok((await readBytes(cache, 0, rangeBytes)).equals(expected()));
    await settle();
    assert.equal(device.heldWrites.length, 2, 'the rewrite\'s data, and the generation of the segment a reopened cache writes to first');
    cache.abandon();
    device.releaseWrites();
    await settle();
    assert.equal(counters(cache).fragmentRewrites, 0, 'abandoned');
    assert.equal(entries(cache).length, pieces);
  });
});
