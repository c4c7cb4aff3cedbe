// The read path: the five overlap cases and the tail, placeholders for misses, fills stored
// as CLEAN keys, and a write that lands while a miss is in flight winning over the fill.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache } from '../../src/cache/cache.js';
import { keyFlagClean, keyFlagEmpty } from '../../src/ondisk/kset.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { PcacheError } from '../../src/lib/errors.js';
import { MiB } from '../../src/lib/units.js';
import { cacheBytesFor, GatedDevice, openRig, pattern, readBytes, settle } from '../helpers/cache_fixture.js';

const S = 512;
const backingTag = 0xb0;
const cachedTag = 0xc1;

/** A rig whose backing device holds pattern(backingTag) and whose cache holds one key [8, 16) sectors. */
async function rigWithKey() {
  const backing = new MemoryDevice(pattern(backingTag, 0, 16 * MiB));
  const rig = await openRig({ backing });
  await rig.cache.write(pattern(cachedTag, 8 * S, 8 * S), 8 * S);
  return rig;
}

function expectSectors(bytes: Buffer, startSector: number, cachedFrom: number, cachedTo: number): void {
  for (let s = 0; s < bytes.length / S; s++) {
    const sector = startSector + s;
    const tag = sector >= cachedFrom && sector < cachedTo ? cachedTag : backingTag;
    assert.equal(bytes.readUInt32LE(s * S), tag, `sector ${sector} tag`);
    assert.equal(bytes.readUInt32LE(s * S + 4), sector, `sector ${sector} offset`);
  }
}

function keysOf(cache: Cache): [number, number, string][] {
  const subtree = cache.internals.ctx.index.subtree(0, false);
  const out: [number, number, string][] = [];
  if (subtree === undefined) return out;
  for (let i = 0; i < subtree.count; i++) {
    const flags = subtree.flags(i);
    out.push([subtree.start(i) / S, subtree.length(i) / S, (flags & keyFlagEmpty) !== 0 ? 'empty' : (flags & keyFlagClean) !== 0 ? 'clean' : 'dirty']);
  }
  return out;
}

describe('read overlap cases (key T at sectors [8, 16))', () => {
  const cases: { name: string; start: number; length: number; missSectors: number; keys: [number, number, string][] }[] = [
    { name: 'before: request entirely before T', start: 0, length: 8, missSectors: 8, keys: [[0, 8, 'clean'], [8, 8, 'dirty']] },
    { name: 'overlap tail: T covers the end of the request', start: 4, length: 8, missSectors: 4, keys: [[4, 4, 'clean'], [8, 8, 'dirty']] },
    { name: 'contain: T strictly inside the request, then the tail', start: 4, length: 16, missSectors: 8, keys: [[4, 4, 'clean'], [8, 8, 'dirty'], [16, 4, 'clean']] },
    { name: 'contained: request strictly inside T', start: 10, length: 4, missSectors: 0, keys: [[8, 8, 'dirty']] },
    { name: 'overlap head: T covers the start of the request, then the tail', start: 12, length: 8, missSectors: 4, keys: [[8, 8, 'dirty'], [16, 4, 'clean']] },
    { name: 'exactly T', start: 8, length: 8, missSectors: 0, keys: [[8, 8, 'dirty']] },
    { name: 'tail only: request after T', start: 20, length: 4, missSectors: 4, keys: [[8, 8, 'dirty'], [20, 4, 'clean']] },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const rig = await rigWithKey();
      const before = rig.cache.status().counters;
      expectSectors(await readBytes(rig.cache, c.start * S, c.length * S), c.start, 8, 16);
      const after = rig.cache.status().counters;
      assert.equal(after.readMissBytes - before.readMissBytes, c.missSectors * S, 'miss bytes');
      assert.equal(after.readHitBytes - before.readHitBytes, (c.length - c.missSectors) * S, 'hit bytes');
      assert.deepEqual(keysOf(rig.cache), c.keys, 'misses were stored as CLEAN keys');
      // The same read again is a full hit and returns the same bytes.
      expectSectors(await readBytes(rig.cache, c.start * S, c.length * S), c.start, 8, 16);
      assert.equal(rig.cache.status().counters.readMissBytes, after.readMissBytes, 'second read is all hits');
    });
  }

  it('ZERO keys read as zeroes and stale keys become misses', async () => {
    const rig = await rigWithKey();
    await rig.cache.writeZeroes(10 * S, 2 * S);
    const bytes = await readBytes(rig.cache, 8 * S, 8 * S);
    assert.ok(bytes.subarray(2 * S, 4 * S).every((b) => b === 0));
    assert.equal(bytes.readUInt32LE(0), cachedTag);
    // Make the dirty key's segment generation move on, as GC would after writing it back.
    const core = rig.cache.internals;
    const subtree = core.ctx.index.subtree(0, true);
    const segment = subtree.segment(0);
    core.ctx.segments.gen[segment] = (core.ctx.segments.gen[segment] ?? 0) + 5;
    const misses = rig.cache.status().counters.readMissBytes;
    const reread = await readBytes(rig.cache, 8 * S, 2 * S);
    assert.equal(reread.readUInt32LE(0), backingTag, 'the stale key was not used');
    assert.equal(rig.cache.status().counters.readMissBytes - misses, 2 * S);
    assert.ok(rig.cache.status().counters.staleKeysRemoved >= 1);
  });
});

describe('misses in flight', () => {
  async function gatedRig() {
    const inner = new MemoryDevice(pattern(backingTag, 0, 16 * MiB));
    const backing = new GatedDevice(inner);
    const cache = await Cache.open({
      cacheDevice: new MemoryDevice(cacheBytesFor(8)),
      backingDevice: backing,
      formatIfBlank: { segmentSizeBytes: MiB },
      background: false,
      timers: new ManualTimers(),
    });
    backing.gated = true;
    return { cache, backing };
  }

  it('a write that lands while a miss is in flight wins over the miss fill', async () => {
    const { cache, backing } = await gatedRig();
    const out = Buffer.alloc(16 * S);
    const reading = cache.read(out, 0);
    await settle();
    assert.equal(backing.heldReads, 1);
    assert.deepEqual(keysOf(cache), [[0, 16, 'empty']]);
    await cache.write(pattern(cachedTag, 4 * S, 4 * S), 4 * S);
    assert.deepEqual(keysOf(cache), [[0, 4, 'empty'], [4, 4, 'dirty'], [8, 8, 'empty']]);
    backing.release();
    await reading;
    expectSectors(out, 0, 0, 0); // the read itself was issued before the write: backing data
    assert.deepEqual(keysOf(cache), [[0, 4, 'clean'], [4, 4, 'dirty'], [8, 8, 'clean']]);
    expectSectors(await readBytes(cache, 0, 16 * S), 0, 4, 8);
  });

  it('a write covering the whole placeholder leaves nothing to fill', async () => {
    const { cache, backing } = await gatedRig();
    const reading = cache.read(Buffer.alloc(8 * S), 0);
    await settle();
    await cache.write(pattern(cachedTag, 0, 8 * S), 0);
    backing.release();
    await reading;
    assert.deepEqual(keysOf(cache), [[0, 8, 'dirty']]);
    expectSectors(await readBytes(cache, 0, 8 * S), 0, 0, 8);
    assert.equal(cache.status().counters.fillsStored, 0);
  });

  it('a second read of an in-flight miss reads the backing device without a new placeholder', async () => {
    const { cache, backing } = await gatedRig();
    const first = Buffer.alloc(8 * S);
    const second = Buffer.alloc(4 * S);
    const reads = [cache.read(first, 0), cache.read(second, 2 * S)];
    await settle();
    assert.equal(backing.heldReads, 2);
    assert.deepEqual(keysOf(cache), [[0, 8, 'empty']]);
    backing.release();
    await Promise.all(reads.map((read) => read ?? Promise.resolve()));
    expectSectors(first, 0, 0, 0);
    expectSectors(second, 2, 0, 0);
    assert.deepEqual(keysOf(cache), [[0, 8, 'clean']]);
  });

  it('a cache-device read error during the walk fails the read and leaves no placeholder behind', async () => {
    // The read misses [0, 8) (a placeholder and a backing read, which fails too), then hits the
    // cached key [8, 16) on a cache device whose reads fail.
    const inner = new MemoryDevice(pattern(backingTag, 0, 16 * MiB));
    const backing = new GatedDevice(inner);
    let backingFails = true;
    backing.read = async (target, offset) => {
      await Promise.resolve();
      if (backingFails) throw new PcacheError('EIO', 'injected backing read error');
      inner.readSync(target, offset);
    };
    let cacheFails = false;
    const cacheDevice = new MemoryDevice(cacheBytesFor(8));
    const readSync = cacheDevice.readSync.bind(cacheDevice);
    cacheDevice.readSync = (target, offset) => {
      if (cacheFails) throw new PcacheError('EIO', 'injected cache read error');
      readSync(target, offset);
    };
    const cache = await Cache.open({ cacheDevice, backingDevice: backing, formatIfBlank: { segmentSizeBytes: MiB }, background: false, timers: new ManualTimers() });
    await cache.write(pattern(cachedTag, 8 * S, 8 * S), 8 * S);
    cacheFails = true;
    const before = cache.status().counters;
    assert.throws(() => cache.read(Buffer.alloc(16 * S), 0), /injected cache read error/);
    assert.deepEqual(keysOf(cache), [[8, 8, 'dirty']], 'the miss left no placeholder');
    await settle(); // the abandoned backing read fails with nobody listening: no unhandled rejection
    const after = cache.status().counters;
    assert.equal(after.cacheIoErrors - before.cacheIoErrors, 1, 'counted as the cache device\'s error');
    assert.equal(after.backingReadErrors, before.backingReadErrors, 'the abandoned backing read is not counted');
    cacheFails = false;
    backingFails = false;
    const out = Buffer.alloc(16 * S);
    await cache.read(out, 0);
    expectSectors(out, 0, 8, 16);
    assert.deepEqual(keysOf(cache), [[0, 8, 'clean'], [8, 8, 'dirty']], 'the range is stored once it reads');
    await cache.close();
  });

  it('a backing read error fails that read with EIO and caches nothing', async () => {
    const inner = new MemoryDevice(16 * MiB);
    let fail = true;
    const backing = new GatedDevice(inner);
    backing.read = async (target, offset) => {
      await Promise.resolve();
      if (fail) throw new (await import('../../src/lib/errors.js')).PcacheError('EIO', 'injected read error');
      inner.readSync(target, offset);
    };
    const cache = await Cache.open({ cacheDevice: new MemoryDevice(cacheBytesFor(8)), backingDevice: backing, formatIfBlank: { segmentSizeBytes: MiB }, background: false, timers: new ManualTimers() });
    await assert.rejects(() => readBytes(cache, 0, 8 * S), (e: unknown) => (e as { code?: string }).code === 'EIO');
    assert.deepEqual(keysOf(cache), []);
    assert.equal(cache.status().counters.backingReadErrors, 1);
    fail = false;
    await readBytes(cache, 0, 8 * S);
    assert.deepEqual(keysOf(cache), [[0, 8, 'clean']]);
  });
});
