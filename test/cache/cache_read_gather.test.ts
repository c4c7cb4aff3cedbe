// Fragmented reads (cache_read_gather.ts): a large read whose cached pieces are many and written
// back is one backing read with the pieces not yet written back copied over it. Each test makes
// the backing device and the cache disagree where it matters, so a read that took the wrong
// source for any piece shows.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockDevice } from '../../src/device/block_device.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache } from '../../src/cache/cache.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { KiB, MiB } from '../../src/lib/units.js';
import { cacheBytesFor, GatedDevice, openRig, pattern, readBytes, RecordingDevice, settle, type Rig } from '../helpers/cache_fixture.js';

const piece = 4 * KiB;
const pieces = 32; // a 128 KiB read of 32 pieces
const readBytesTotal = pieces * piece;
const backingTag = 0xb0;
const firstTag = 0xa1;
const newerTag = 0xa2;

/** Piece numbers in a scrambled order, so no two neighbours are written one after the other. */
function scrambled(): number[] {
  return Array.from({ length: pieces }, (_, i) => (i * 7) % pieces);
}

/** Writes every piece of [0, 128 KiB) with `tag`, one 4 KiB write each, in scrambled order. */
async function layDown(rig: Rig, tag: number): Promise<void> {
  for (const i of scrambled()) await rig.cache.write(pattern(tag, i * piece, piece), i * piece);
}

/** Moves the data head past the segment written so far (1 MiB segments), far from the range read. */
async function moveHeadOn(rig: Rig, at: number): Promise<void> {
  await rig.cache.write(Buffer.alloc(MiB, 0x77), at);
}

/** What the read must return: `tag` per piece, from a map of exceptions over the first tag. */
function expected(exceptions: Map<number, number | 'zero'>, base = firstTag): Buffer {
  const out = Buffer.alloc(readBytesTotal);
  for (let i = 0; i < pieces; i++) {
    const tag = exceptions.get(i) ?? base;
    if (tag !== 'zero') out.set(pattern(tag, i * piece, piece), i * piece);
  }
  return out;
}

function gathers(rig: Rig): number {
  return rig.cache.status().counters.readGathers;
}

/** The segment holding piece `i`'s cached data. */
function segmentOf(rig: Rig, i: number): number {
  const subtree = rig.cache.internals.ctx.index.subtree(i * piece, false);
  assert.ok(subtree !== undefined);
  return subtree.segment(subtree.seek(i * piece));
}

async function rigOverBacking(): Promise<Rig> {
  return openRig({ backing: new MemoryDevice(pattern(backingTag, 0, 64 * MiB)), format: { gcPercent: 0 } });
}

/** A cache of eight 1 MiB segments (GC at any fill) on `cacheDevice` over `backing`, no background work; as much of a Rig as these tests use. */
async function openOver(backing: BlockDevice, cacheDevice: BlockDevice = new MemoryDevice(cacheBytesFor(8))): Promise<Rig> {
  const timers = new ManualTimers();
  const cache = await Cache.open({
    cacheDevice, backingDevice: backing, background: false, timers,
    tuning: { sequentialCutoffBytes: 0 }, // the filler writes are sequential and must go into the cache
    formatIfBlank: { segmentSizeBytes: MiB, cacheUuid: new Uint8Array(16).fill(7), formatTimeMs: 0, gcPercent: 0 },
  });
  return { cache } as Rig;
}

describe('fragmented reads', () => {
  it('written back: one backing read, the newer pieces and a ZERO range copied over it', async () => {
    const rig = await rigOverBacking();
    await layDown(rig, firstTag);
    await moveHeadOn(rig, 32 * MiB);
    await rig.cache.drain();
    await rig.cache.write(pattern(newerTag, 3 * piece, piece), 3 * piece);
    await rig.cache.write(pattern(newerTag, 17 * piece, 2 * piece), 17 * piece);
    await rig.cache.writeZeroes(9 * piece, piece);
    const before = gathers(rig);
    const bytes = await readBytes(rig.cache, 0, readBytesTotal);
    assert.equal(gathers(rig) - before, 1, 'served by one backing read');
    assert.ok(bytes.equals(expected(new Map<number, number | 'zero'>([[3, newerTag], [17, newerTag], [18, newerTag], [9, 'zero']]))), 'the newest data of every piece');
    // The backing device still holds the older data there: the overlay is what made it right.
    const backing = Buffer.alloc(piece);
    await rig.backingDevice.read(backing, 3 * piece);
    assert.ok(backing.equals(pattern(firstTag, 3 * piece, piece)));
    await rig.cache.close();
  });

  it('not written back, turned off, or too few pieces: the read is served piece by piece from the cache', async () => {
    const rig = await rigOverBacking();
    await layDown(rig, firstTag);
    await moveHeadOn(rig, 32 * MiB);
    assert.ok((await readBytes(rig.cache, 0, readBytesTotal)).equals(expected(new Map())));
    assert.equal(gathers(rig), 0, 'dirty pieces are never read from the backing device');
    await rig.cache.drain();
    rig.cache.setTuning({ fragmentedReadPieces: 0 });
    assert.ok((await readBytes(rig.cache, 0, readBytesTotal)).equals(expected(new Map())));
    assert.equal(gathers(rig), 0, 'turned off');
    rig.cache.setTuning({ fragmentedReadPieces: pieces + 1 });
    assert.ok((await readBytes(rig.cache, 0, readBytesTotal)).equals(expected(new Map())));
    assert.equal(gathers(rig), 0, 'fewer written-back pieces than the setting');
    rig.cache.setTuning({ fragmentedReadPieces: pieces });
    assert.ok((await readBytes(rig.cache, 0, readBytesTotal)).equals(expected(new Map())));
    assert.equal(gathers(rig), 1, 'as many as the setting');
    await rig.cache.close();
  });

  it('a read with a part not cached takes the ordinary walk (and fills it)', async () => {
    const rig = await rigOverBacking();
    await layDown(rig, firstTag);
    await moveHeadOn(rig, 32 * MiB);
    await rig.cache.drain();
    const bytes = await readBytes(rig.cache, 0, readBytesTotal + piece);
    assert.equal(gathers(rig), 0);
    assert.ok(bytes.subarray(0, readBytesTotal).equals(expected(new Map())));
    assert.ok(bytes.subarray(readBytesTotal).equals(pattern(backingTag, 0, 64 * MiB).subarray(readBytesTotal, readBytesTotal + piece)));
    assert.equal(rig.cache.status().counters.fillsStored, 1);
    await rig.cache.close();
  });

  it('after an unclean stop, pieces not yet written back are dirty again (replay notes them)', async () => {
    const rig = await rigOverBacking();
    await layDown(rig, firstTag);
    await moveHeadOn(rig, 32 * MiB);
    await rig.cache.drain();
    await layDown(rig, newerTag);
    await moveHeadOn(rig, 40 * MiB);
    await rig.cache.flush();
    rig.cache.abandon();
    await rig.reopen();
    assert.ok((await readBytes(rig.cache, 0, readBytesTotal)).equals(expected(new Map(), newerTag)), 'the newer data, not the backing device\'s older copy');
    assert.equal(gathers(rig), 0);
    await rig.cache.drain();
    assert.ok((await readBytes(rig.cache, 0, readBytesTotal)).equals(expected(new Map(), newerTag)));
    assert.equal(gathers(rig), 1, 'once written back, gathered');
    await rig.cache.close();
  });

  it('a failed backing read: the read is served from the cache alone', async () => {
    const events: never[] = [];
    const backing = new RecordingDevice(new MemoryDevice(pattern(backingTag, 0, 64 * MiB)), 'backing', events, { blocking: false });
    const rig = await openOver(backing);
    const cache = rig.cache;
    await layDown(rig, firstTag);
    await moveHeadOn(rig, 32 * MiB);
    await cache.drain();
    backing.failReads = true;
    assert.ok((await readBytes(cache, 0, readBytesTotal)).equals(expected(new Map())));
    assert.equal(gathers(rig), 0);
    assert.equal(cache.status().counters.backingReadErrors, 1);
    backing.failReads = false;
    await cache.close();
  });

  it('a read at an offset, starting and ending inside keys, on a cache device that completes later', async () => {
    // Where an overlay piece lies in its segment and in the reply is computed from the key it
    // starts inside and from the request's offset; on an asynchronous cache device its data
    // arrives after the backing read's and must still land on top of it (the cache device holds
    // the overlay's reads until the backing read is done). The pieces here start at 8 MiB, and
    // the read starts inside a newer 8 KiB key and ends inside a piece.
    const cacheDevice = new GatedDevice(new MemoryDevice(cacheBytesFor(8)));
    const { cache } = await openOver(new MemoryDevice(pattern(backingTag, 0, 64 * MiB)), cacheDevice);
    assert.equal(cache.internals.ctx.dev.synchronous, false, 'the cache device completes its I/O later');
    const base = 8 * MiB;
    const truth = Buffer.alloc(readBytesTotal);
    for (const i of scrambled()) {
      const data = pattern(firstTag, base + i * piece, piece);
      await cache.write(data, base + i * piece);
      truth.set(data, i * piece);
    }
    await cache.write(Buffer.alloc(MiB, 0x77), 32 * MiB);
    await cache.drain();
    const newer = async (at: number, length: number): Promise<void> => {
      const data = pattern(newerTag, base + at, length);
      await cache.write(data, base + at);
      truth.set(data, at);
    };
    await newer(4 * KiB, 8 * KiB); // the read starts in its second half
    await newer(40 * KiB, 8 * KiB);
    await cache.writeZeroes(base + 64 * KiB, piece);
    truth.fill(0, 64 * KiB, 64 * KiB + piece);
    const from = 8 * KiB;
    const to = 118 * KiB; // inside piece 29
    const before = cache.status().counters.readGathers;
    const out = Buffer.alloc(to - from);
    cacheDevice.gated = true;
    let done = false;
    const reading = Promise.resolve(cache.read(out, base + from)).then(() => { done = true; });
    await settle();
    assert.equal(cacheDevice.heldReads, 2, 'the overlay\'s two data pieces wait on the cache device (the ZERO piece reads nothing)');
    assert.equal(done, false, 'the read waits for them');
    cacheDevice.gated = false;
    cacheDevice.release();
    await reading;
    assert.equal(cache.status().counters.readGathers - before, 1, 'served by one backing read');
    assert.ok(out.equals(truth.subarray(from, to)), 'the newest data of every byte, each in its place');
    await cache.close();
  });

  it('an overlay piece whose segment is freed and reused during the backing read comes from the backing device', async () => {
    const gated = new GatedDevice(new MemoryDevice(pattern(backingTag, 0, 64 * MiB)));
    const rig = await openOver(gated);
    const cache = rig.cache;
    await layDown(rig, firstTag);
    await moveHeadOn(rig, 32 * MiB);
    await cache.drain();
    await cache.write(pattern(newerTag, 5 * piece, piece), 5 * piece);
    const newer = segmentOf(rig, 5);
    await moveHeadOn(rig, 34 * MiB);
    const core = cache.internals;
    assert.notEqual(core.head.segment, newer);
    const genBefore = core.ctx.segments.genLow32(newer);

    gated.gated = true;
    const out = Buffer.alloc(readBytesTotal);
    const reading = cache.read(out, 0);
    await settle();
    assert.equal(gated.heldReads, 1, 'one backing read for the whole request');
    // Meanwhile: the newer piece is written back, GC frees its segment, and new data reuses it.
    await cache.drain();
    while (await core.gc.step()) { /* until GC has nothing left */ }
    assert.notEqual(core.ctx.segments.genLow32(newer), genBefore, 'the segment was freed');
    // Fill until the data head has taken that segment again and moved past it: its bytes are new now.
    let reused = false;
    for (let at = 48 * MiB; !(reused && core.head.segment !== newer); at += 256 * KiB) {
      assert.ok(at < 62 * MiB, `the freed segment is handed out again (head ${core.head.segment}, segment ${newer}, kinds ${Array.from(core.ctx.segments.kind).join('')}, refs ${Array.from(core.ctx.segments.refs).join(',')})`);
      await cache.write(Buffer.alloc(256 * KiB, 0x55), at);
      if (core.head.segment === newer) reused = true;
      await cache.drain();
      while (await core.gc.step()) { /* free what was written back */ }
    }
    gated.gated = false;
    gated.release();
    await reading;
    assert.equal(gathers(rig), 1);
    assert.ok(out.equals(expected(new Map([[5, newerTag]]))), 'the written-back piece, not what reused its segment');
    await cache.close();
  });
});
