// A large read from many cached pieces reads them in one batch on the cache device's own thread
// (cache_read.ts, BlockDevice.readMany) when other large reads are about: when it does and when
// it does not, that every byte comes back in its place either way, and that a piece whose
// segment GC freed and reused while the batch was out comes from the backing device instead.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockDevice } from '../../src/device/block_device.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache } from '../../src/cache/cache.js';
import type { CacheTuning } from '../../src/cache/cache_tuning.js';
import { PcacheError } from '../../src/lib/errors.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { KiB, MiB } from '../../src/lib/units.js';
import { cacheBytesFor, pattern, settle, ThreadedMemoryDevice } from '../helpers/cache_fixture.js';

const piece = 4 * KiB;
const pieces = 32; // a 128 KiB read of 32 pieces
const readBytesTotal = pieces * piece;
const backingTag = 0xb0;
const firstTag = 0xa1;

/** Piece numbers in a scrambled order, so no two neighbours lie side by side in the cache. */
function scrambled(): number[] {
  return Array.from({ length: pieces }, (_, i) => (i * 7) % pieces);
}

/** Time in the caches these tests open: it moves only when a test says. */
const timers = new ManualTimers();

async function openCache(cacheDevice: BlockDevice, backing: BlockDevice, tuning: Partial<CacheTuning> = {}, dataCrc = false): Promise<Cache> {
  return Cache.open({
    cacheDevice, backingDevice: backing, background: false, timers,
    // The filler writes are sequential and must go into the cache; no rewrite changes what is read.
    tuning: { sequentialCutoffBytes: 0, fragmentedRewritePieces: 0, ...tuning },
    formatIfBlank: { segmentSizeBytes: MiB, cacheUuid: new Uint8Array(16).fill(7), formatTimeMs: 0, gcPercent: 0, dataCrc },
  });
}

/** Writes every piece of [0, 128 KiB) with `tag`, one 4 KiB write each, in scrambled order; left dirty. */
async function layDown(cache: Cache, tag: number): Promise<void> {
  for (const i of scrambled()) await cache.write(pattern(tag, i * piece, piece), i * piece);
}

function shared(lengthBytes: number): Uint8Array {
  return new Uint8Array(new SharedArrayBuffer(lengthBytes)).fill(0xee);
}

/**
 * Reads `target` at `offsetBytes` right after another large read in the same macrotask, as
 * requests queued behind each other come (the other one, alone, is read on the event loop:
 * nothing pending, no other read in the last 100 ms). Nothing may be pending.
 */
function readQueued(cache: Cache, target: Uint8Array, offsetBytes: number): Promise<void> {
  timers.advance(101); // past the time other reads were last about
  const first = cache.read(shared(readBytesTotal), 0);
  assert.equal(first, undefined, 'the first read, alone, completes on the event loop');
  return Promise.resolve(cache.read(target, offsetBytes));
}

describe('fragmented reads on the cache device\'s thread', () => {
  it('reads a large read\'s pieces in one batch when they are many and the target is shared memory, else each on the event loop', async () => {
    const device = new ThreadedMemoryDevice(cacheBytesFor(8));
    const cache = await openCache(device, new MemoryDevice(pattern(backingTag, 0, 64 * MiB)));
    await layDown(cache, firstTag);
    const truth = pattern(firstTag, 0, readBytesTotal);
    const batches = (): number => cache.status().counters.threadReadBatches;
    const check = async (target: Uint8Array, offsetBytes: number, batched: boolean, what: string): Promise<void> => {
      const before = batches();
      const sent = device.batches.length;
      await readQueued(cache, target, offsetBytes);
      assert.ok(Buffer.from(target).equals(truth.subarray(offsetBytes, offsetBytes + target.length)), `${what}: every byte in its place`);
      assert.equal(batches() - before, batched ? 1 : 0, `${what}: ${batched ? 'one batch' : 'no batch'}`);
      assert.equal(device.batches.length - sent, batched ? 1 : 0);
    };

    await check(shared(readBytesTotal), 0, true, 'the whole range');
    assert.equal(device.batches.at(-1), pieces, 'one read per piece, all in the batch');
    // A read that starts and ends inside pieces: the first and last are parts of keys.
    await check(shared(readBytesTotal - 4 * KiB), 2 * KiB, true, 'from inside a piece to inside another');
    assert.equal(device.batches.at(-1), pieces);
    await check(new Uint8Array(readBytesTotal), 0, false, 'a target of ordinary memory (no thread can fill it)');
    await check(shared(32 * KiB), 0, false, 'a read under 64 KiB');
    cache.setTuning({ fragmentedThreadPieces: pieces + 1 });
    await check(shared(readBytesTotal), 0, false, 'fewer pieces than fragmented_thread_pieces');
    cache.setTuning({ fragmentedThreadPieces: pieces });
    await check(shared(readBytesTotal), 0, true, 'exactly fragmented_thread_pieces pieces');
    cache.setTuning({ fragmentedThreadPieces: 0 });
    await check(shared(readBytesTotal), 0, false, 'turned off');
    cache.setTuning({ fragmentedThreadPieces: 16 });
    await check(shared(readBytesTotal), 0, true, 'turned on again');

    // Within 100 ms of the last read that came with others, a read alone still goes to the
    // thread (a queue depth above 1 lately); after that it stays on the event loop, where a
    // thread would only add two hand-offs to it.
    await settle();
    timers.advance(100);
    const soon = shared(readBytesTotal);
    const soonIo = cache.read(soon, 0);
    assert.notEqual(soonIo, undefined, 'a read 100 ms after others were about goes to the thread');
    await soonIo;
    assert.ok(Buffer.from(soon).equals(truth));
    timers.advance(101);
    const alone = shared(readBytesTotal);
    assert.equal(cache.read(alone, 0), undefined, 'a read alone completes on the event loop');
    assert.ok(Buffer.from(alone).equals(truth));
    await settle();
    // A read while another is pending goes to the thread, even in a later turn.
    let open: () => void = () => undefined;
    device.gate = new Promise<void>((resolve) => { open = resolve; });
    const pending = readQueued(cache, shared(readBytesTotal), 0);
    await settle();
    const sent = device.batches.length;
    const later = shared(readBytesTotal);
    const io = cache.read(later, 0);
    assert.notEqual(io, undefined, 'with a read pending, the next one goes to the thread');
    assert.equal(device.batches.length, sent + 1);
    device.gate = undefined;
    open();
    await pending;
    await io;
    assert.ok(Buffer.from(later).equals(truth));
    await cache.close();
  });

  it('reads a range partly cached, partly a miss, partly zeroes: the misses from the backing device, the rest in the batch', async () => {
    const device = new ThreadedMemoryDevice(cacheBytesFor(8));
    const cache = await openCache(device, new MemoryDevice(pattern(backingTag, 0, 64 * MiB)));
    await layDown(cache, firstTag);
    await cache.writeZeroes(5 * piece, piece);
    const out = shared(readBytesTotal + 64 * KiB); // 64 KiB past the range: never written, a miss
    await readQueued(cache, out, 0);
    const truth = Buffer.concat([pattern(firstTag, 0, readBytesTotal), pattern(backingTag, readBytesTotal, 64 * KiB)]);
    truth.fill(0, 5 * piece, 6 * piece);
    assert.ok(Buffer.from(out).equals(truth), 'cached pieces, zeroes and the miss, each in its place');
    assert.equal(device.batches.at(-1), pieces - 1, 'the data pieces went in the batch, the ZERO piece read nothing');
    await cache.close();
  });

  it('a failed batch fails the read as the cache device\'s error, never the backing device\'s', async () => {
    const device = new ThreadedMemoryDevice(cacheBytesFor(8));
    const cache = await openCache(device, new MemoryDevice(pattern(backingTag, 0, 64 * MiB)));
    await layDown(cache, firstTag);
    for (const code of ['EIO', 'ENODEV'] as const) {
      device.failure = new PcacheError(code, `injected ${code} reading the cache device`);
      await assert.rejects(() => readQueued(cache, shared(readBytesTotal), 0), (error: unknown) => error === device.failure);
    }
    const status = cache.status();
    assert.equal(status.counters.cacheIoErrors, 2);
    assert.equal(status.counters.backingReadErrors, 0);
    assert.equal(cache.internals.ctx.backingOfflineSinceMs, undefined, 'the backing device is not taken for offline');
    device.failure = undefined;
    const out = shared(readBytesTotal);
    await readQueued(cache, out, 0);
    assert.ok(Buffer.from(out).equals(pattern(firstTag, 0, readBytesTotal)), 'the next read is served');
    await cache.close();
  });

  it('leaves a cache with data CRCs to read and check every piece on the event loop', async () => {
    const device = new ThreadedMemoryDevice(cacheBytesFor(8));
    const cache = await openCache(device, new MemoryDevice(pattern(backingTag, 0, 64 * MiB)), {}, true);
    await layDown(cache, firstTag);
    const out = shared(readBytesTotal);
    await readQueued(cache, out, 0);
    assert.ok(Buffer.from(out).equals(pattern(firstTag, 0, readBytesTotal)));
    assert.equal(device.batches.length, 0);
    await cache.close();
  });

  it('a piece whose segment is written back, freed and reused while the batch is out comes from the backing device', async () => {
    const device = new ThreadedMemoryDevice(cacheBytesFor(8));
    const cache = await openCache(device, new MemoryDevice(pattern(backingTag, 0, 64 * MiB)));
    await layDown(cache, firstTag);
    const core = cache.internals;
    const subtree = core.ctx.index.subtree(0, false);
    assert.ok(subtree !== undefined);
    const segment = subtree.segment(subtree.seek(0));
    // Move the data head past the pieces' segment, so GC may take it.
    await cache.write(Buffer.alloc(MiB, 0x77), 32 * MiB);
    assert.notEqual(core.head.segment, segment);
    const genBefore = core.ctx.segments.genLow32(segment);

    let open: () => void = () => undefined;
    device.gate = new Promise<void>((resolve) => { open = resolve; });
    const out = shared(readBytesTotal);
    let done = false;
    const reading = readQueued(cache, out, 0).then(() => { done = true; });
    await settle();
    assert.equal(device.batches.length, 1, 'the pieces are out in one batch');
    assert.equal(done, false, 'the read waits for it');
    // Meanwhile: everything is written back, GC frees the segment, and new data reuses it.
    await cache.drain();
    while (await core.gc.step()) { /* until GC has nothing left */ }
    assert.notEqual(core.ctx.segments.genLow32(segment), genBefore, 'the segment was freed');
    let reused = false;
    for (let at = 48 * MiB; !(reused && core.head.segment !== segment); at += 256 * KiB) {
      assert.ok(at < 62 * MiB, 'the freed segment is handed out again');
      await cache.write(Buffer.alloc(256 * KiB, 0x55), at);
      if (core.head.segment === segment) reused = true;
      await cache.drain();
      while (await core.gc.step()) { /* free what was written back */ }
    }
    device.gate = undefined;
    open();
    await reading;
    assert.ok(Buffer.from(out).equals(pattern(firstTag, 0, readBytesTotal)), 'the written-back data, not what reused the segment');
    await cache.close();
  });
});
