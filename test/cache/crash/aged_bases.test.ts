// The aged bases the crash suites start from (aged_bases.ts) hold the history they promise:
// a log about to wrap, the state a crash left with a stranded kset and generation copies that
// differ, dirty_tail copies that differ, a full cache whose next commit takes the segment GC
// frees; each one a cache that recovers cleanly.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { checkCacheDevice } from '../../../src/cache/cache_check.js';
import { sectorSizeBytes } from '../../../src/lib/units.js';
import { decodeCachePos } from '../../../src/ondisk/cache_pos.js';
import { decodeKset, ksetCrcSeed, ksetExtendedHeaderBytes, keyBytes, ksetBytesMax } from '../../../src/ondisk/kset.js';
import { formatVersionLatest, layoutFor, segmentDataOffsetBytes, segmentDataSizeBytes, segmentOffsetBytes } from '../../../src/ondisk/layout.js';
import { decodeSegmentGen } from '../../../src/ondisk/segment_gen.js';
import { SimDevice } from '../../../sim/sim_device.js';
import type { SystemImages } from '../../../sim/harness.js';
import { agedBase, type BaseName } from './aged_bases.js';
import { crashSegmentBytes, openCache } from './cache_target.js';
import { exhaustiveShape } from './crash_suite.js';

const layout = layoutFor(formatVersionLatest);
const shape = { ...exhaustiveShape, workloadSectors: (exhaustiveShape.blockCount * 4096) / sectorSizeBytes };
const dataSize = segmentDataSizeBytes(crashSegmentBytes);
const segmentCount = 4;

function build(name: BaseName): Promise<SystemImages> {
  return agedBase(name, shape, {}).build();
}

function device(images: SystemImages, which: 'cache' | 'backing'): SimDevice {
  return new SimDevice(images[which].fork(), { name: which });
}

function read(dev: SimDevice, offsetBytes: number, lengthBytes: number): Uint8Array {
  const bytes = new Uint8Array(lengthBytes);
  dev.readDurable(bytes, offsetBytes);
  return bytes;
}

/** Both copies of a segment's generation, in layout order. */
function genCopies(dev: SimDevice, segment: number): number[] {
  return layout.segmentGenOffsetsBytes.map((at, index) => {
    const decoded = decodeSegmentGen(read(dev, segmentOffsetBytes(segment, crashSegmentBytes) + at, 16), `gen copy ${index}`, layout.version);
    assert.ok(decoded.ok, `segment ${segment} generation copy ${index} is valid`);
    return decoded.value;
  });
}

/** The cache recovered on the base: check finds nothing; returns its status and closes it. */
async function recovered(images: SystemImages): Promise<{ keyHead: string }> {
  const cache = await openCache(device(images, 'cache'), device(images, 'backing'));
  try {
    assert.deepEqual(await cache.check(), []);
    return { keyHead: cache.status().keyHead };
  } finally {
    await cache.close();
  }
}

function position(text: string): { segment: number; offsetBytes: number } {
  const [segment, offsetBytes] = text.split(':').map(Number);
  assert.ok(segment !== undefined && offsetBytes !== undefined);
  return { segment, offsetBytes };
}

describe('aged bases', () => {
  it('log-end: the head of the log is so close to its segment\'s end that no kset fits any more', async () => {
    const images = await build('log-end');
    const head = position((await recovered(images)).keyHead);
    const smallest = 2 * ksetExtendedHeaderBytes + keyBytes;
    assert.ok(dataSize - head.offsetBytes < smallest, `${dataSize - head.offsetBytes} bytes left at ${head.segment}:${head.offsetBytes}`);
  });

  it('stranded: a free segment holds a kset with the next seq of the log, and its generation copies differ', async () => {
    const images = await build('stranded');
    const head = position((await recovered(images)).keyHead);
    const cache = device(images, 'cache');
    const metadata = await checkCacheDevice(cache);
    assert.deepEqual(metadata.problems, []);
    const ctx = metadata.rebuilt;
    assert.ok(ctx !== undefined);
    const stranded: number[] = [];
    for (let segment = 0; segment < segmentCount; segment += 1) {
      const bytes = read(cache, segmentOffsetBytes(segment, crashSegmentBytes) + segmentDataOffsetBytes, ksetBytesMax);
      const kset = decodeKset(bytes, {
        extended: true,
        crcSeed: ksetCrcSeed(new Uint8Array(16).fill(0x5c)),
        logGen: ctx.segments.gen[segment] ?? 0,
        roomBytes: dataSize,
        segmentCount,
        dataSizeBytes: dataSize,
        backingSizeBytes: shape.backingSizeBytes,
      });
      if (segment === head.segment || !kset.ok || kset.kind !== 'keys') continue;
      stranded.push(segment);
      assert.equal(kset.keys.length, 16, 'sixteen keys: two sectors');
      assert.equal(kset.seq, metadata.replay?.keyHead.seq, 'the seq the log expects next (a LAST kset takes none)');
      const [first, second] = genCopies(cache, segment);
      assert.notEqual(first, second, 'the mirror of the new generation was lost');
      assert.equal(Math.max(first ?? 0, second ?? 0), ctx.segments.gen[segment], 'recovery reads the newest copy');
    }
    assert.equal(stranded.length, 1, 'exactly one segment holds the stranded kset');
  });

  it('log-full: every segment in use and key_tail in the oldest log segment; a commit waits, GC frees that segment and the log takes it', async () => {
    const images = await build('log-full');
    await recovered(images);
    const cache = await openCache(device(images, 'cache'), device(images, 'backing'));
    try {
      const before = cache.status();
      assert.equal(before.segsUsed, before.segTotal, 'no segment is free');
      assert.equal(before.dirtyTail, before.keyHead, 'everything is written back');
      const oldest = position(before.keyTail).segment;
      assert.notEqual(position(before.keyHead).segment, oldest, 'the log spans more than one segment');
      await cache.trim(0, 4096, { fua: true });
      const after = cache.status();
      assert.equal(position(after.keyHead).segment, oldest, 'the commit went into the segment GC freed');
      assert.notEqual(position(after.keyTail).segment, oldest, 'key_tail left that segment');
      assert.deepEqual(await cache.check(), []);
    } finally {
      await cache.close();
    }
  });

  it('divergent-tails: the two copies of dirty_tail hold its last two values', async () => {
    const images = await build('divergent-tails');
    await recovered(images);
    const cache = device(images, 'cache');
    const limits = { segmentCount, dataSizeBytes: dataSize, ksetHeaderBytes: ksetExtendedHeaderBytes };
    const copies = layout.dirtyTailOffsetsBytes.map((at, index) => {
      const decoded = decodeCachePos(read(cache, at, 32), limits, `dirty_tail copy ${index}`, layout.version);
      assert.ok(decoded.ok, `dirty_tail copy ${index} is valid`);
      return decoded.value;
    });
    assert.notDeepEqual(copies[0], copies[1]);
  });
});
