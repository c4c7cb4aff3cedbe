// Opening and recovering a cache: unclean stops, idempotent replay, refusing devices that are
// not this backing device's cache, damaged logs, data CRC, and the golden images of each format version.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache } from '../../src/cache/cache.js';
import { checkCacheDevice } from '../../src/cache/cache_check.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { crc32c } from '../../src/lib/crc32c.js';
import { MiB, writeU32LE } from '../../src/lib/units.js';
import { encodeLastKset, ksetCrcSeed, ksetExtendedHeaderBytes } from '../../src/ondisk/kset.js';
import { lastBlockOffsetBytes, segmentDataOffsetBytes, segmentsOffsetBytes, superblockOffsetBytes } from '../../src/ondisk/layout.js';
import { cacheBytesFor, flipBits, openRig, pattern, readBytes } from '../helpers/cache_fixture.js';
import { goldenBackingBytes, goldenCacheBytes, goldenData, goldenExpected, goldenImagePath, goldenVersions } from '../fixtures/golden_image.js';
import { goldenPoolBytes, goldenPoolPath, silverLengthBytes, silverOffsetBytes } from '../fixtures/golden_pool.js';
import { CachePool } from '../../src/cache/cache_pool.js';
import { checkPoolDevice } from '../../src/cache/cache_pool_check.js';

const S = 512;
const code = (expected: string) => (error: unknown): boolean => (error as { code?: string }).code === expected;
/** Absolute offset of byte `offset` of segment `segment`'s data area (1 MiB segments). */
const dataAt = (segment: number, offset: number): number => segmentsOffsetBytes + segment * MiB + segmentDataOffsetBytes + offset;

describe('unclean stop', () => {
  it('everything flushed is present after the in-memory state is dropped', async () => {
    const rig = await openRig();
    for (let i = 0; i < 50; i++) await rig.cache.write(pattern(i, i * 8 * S, 8 * S), i * 8 * S);
    await rig.cache.trim(10 * 8 * S, 8 * S);
    await rig.cache.flush();
    await rig.cache.write(pattern(999, 0, 8 * S), 0, { fua: true }); // FUA: durable on its own
    await rig.cache.write(pattern(1000, 8 * S, 8 * S), 8 * S); // neither flushed nor FUA
    rig.cache.abandon();
    const cache = await rig.reopen();
    assert.deepEqual(await readBytes(cache, 0, 8 * S), pattern(999, 0, 8 * S));
    for (let i = 2; i < 50; i++) {
      const expected = i === 10 ? Buffer.alloc(8 * S) : pattern(i, i * 8 * S, 8 * S);
      assert.deepEqual(await readBytes(cache, i * 8 * S, 8 * S), expected, `extent ${i}`);
    }
    assert.deepEqual(await cache.check(), []);
  });

  it('replay is idempotent: recovering twice gives the same log, index and data', async () => {
    const rig = await openRig();
    for (let i = 0; i < 300; i++) await rig.cache.write(pattern(i, (i % 97) * 4096, 4096), (i % 97) * 4096);
    await rig.cache.flush();
    rig.cache.abandon();
    const first = await rig.reopen();
    const firstData = await readBytes(first, 0, 97 * 4096);
    const firstStatus = first.status();
    first.abandon();
    const second = await rig.reopen();
    assert.deepEqual(second.replayResult, first.replayResult);
    assert.deepEqual(await readBytes(second, 0, 97 * 4096), firstData);
    const secondStatus = second.status();
    assert.deepEqual([secondStatus.keyHead, secondStatus.dirtyTail, secondStatus.keyTail, secondStatus.segsUsed], [firstStatus.keyHead, firstStatus.dirtyTail, firstStatus.keyTail, firstStatus.segsUsed]);
  });
});

describe('refusals', () => {
  it('a blank device is formatted only when asked', async () => {
    const cacheDevice = new MemoryDevice(cacheBytesFor(4));
    const backingDevice = new MemoryDevice(8 * MiB);
    await assert.rejects(() => Cache.open({ cacheDevice, backingDevice, background: false }), code('FOREIGN'));
    assert.ok(cacheDevice.bytes.every((b) => b === 0), 'nothing was written');
  });

  it('a device holding something else is refused without a byte written to it', async () => {
    const cacheDevice = new MemoryDevice(cacheBytesFor(4));
    cacheDevice.bytes.set(Buffer.from('an ext4 superblock, say'), 1024);
    const before = Buffer.from(cacheDevice.bytes);
    await assert.rejects(
      () => Cache.open({ cacheDevice, backingDevice: new MemoryDevice(8 * MiB), formatIfBlank: true, background: false }),
      (e: unknown) => code('FOREIGN')(e) && /not a pcache cache/.test(String(e)),
    );
    assert.ok(before.equals(cacheDevice.bytes));
  });

  it('a cache is refused against a backing device of another identity, or one that shrank below its data', async () => {
    const backing = new MemoryDevice(8 * MiB, { identity: 'file:ino=42' });
    const rig = await openRig({ backing });
    await rig.cache.write(pattern(1, 0, 4096), 0);
    await rig.cache.write(pattern(2, 6 * MiB, 4096), 6 * MiB);
    await rig.cache.close();
    const before = Buffer.from(rig.cacheDevice.bytes);
    await assert.rejects(
      () => Cache.open({ cacheDevice: rig.cacheDevice, backingDevice: new MemoryDevice(4 * MiB, { identity: 'file:ino=42' }), background: false }),
      (e: unknown) => code('FOREIGN')(e) && /shrank from 8388608 to 4194304 bytes, but the cache holds ranges up to byte 6295552/.test(String(e)),
    );
    const stranger = new MemoryDevice(8 * MiB, { identity: 'file:ino=43' });
    await assert.rejects(() => Cache.open({ cacheDevice: rig.cacheDevice, backingDevice: stranger, background: false }), /file:ino=42/);
    assert.ok(before.equals(rig.cacheDevice.bytes), 'refusals write nothing');
    // Forcing the identity keeps the dirty data.
    const forced = await Cache.open({ cacheDevice: rig.cacheDevice, backingDevice: stranger, background: false, acceptOtherBackingIdentity: true, timers: new ManualTimers() });
    assert.deepEqual(await readBytes(forced, 0, 4096), pattern(1, 0, 4096));
    assert.equal(forced.status().dirtyBytes, 8192);
  });

  it('a backing device that grew is served at its new size, keeping the cached data', async () => {
    const backing = new MemoryDevice(8 * MiB, { identity: 'file:ino=42' });
    const rig = await openRig({ backing });
    await rig.cache.write(pattern(1, 0, 4096), 0);
    await rig.cache.close();
    const grown = new MemoryDevice(16 * MiB, { identity: 'file:ino=42' });
    grown.bytes.set(backing.bytes);
    const cache = await Cache.open({ cacheDevice: rig.cacheDevice, backingDevice: grown, background: false, timers: new ManualTimers() });
    assert.equal(cache.sizeBytes, 16 * MiB);
    assert.deepEqual(await readBytes(cache, 0, 4096), pattern(1, 0, 4096));
    await cache.write(pattern(3, 12 * MiB, 4096), 12 * MiB);
    await cache.close();
    const again = await Cache.open({ cacheDevice: rig.cacheDevice, backingDevice: grown, background: false, timers: new ManualTimers() });
    assert.deepEqual(await readBytes(again, 12 * MiB, 4096), pattern(3, 12 * MiB, 4096));
    assert.deepEqual(await again.check(), []);
  });

  it('a damaged superblock copy is replaced by the other; both damaged is corrupt', async () => {
    const rig = await openRig();
    await rig.cache.write(pattern(1, 0, 4096), 0);
    await rig.cache.close();
    flipBits(rig.cacheDevice.bytes, superblockOffsetBytes + 40);
    const cache = await rig.reopen();
    assert.deepEqual(await readBytes(cache, 0, 4096), pattern(1, 0, 4096));
    await cache.close();
    const report = await checkCacheDevice(rig.cacheDevice);
    assert.ok(report.warnings.some((w) => /superblock copy 0: .*CRC mismatch/.test(w)), report.warnings.join('; '));
    flipBits(rig.cacheDevice.bytes, lastBlockOffsetBytes(rig.cacheDevice.sizeBytes) + 40);
    await assert.rejects(() => rig.reopen(), (e: unknown) => code('CORRUPT')(e) && /CRC mismatch/.test(String(e)));
  });
});

describe('damaged logs', () => {
  it('stops replay at a torn kset and keeps everything before it', async () => {
    const rig = await openRig();
    await rig.cache.write(pattern(1, 0, 4096), 0);
    await rig.cache.flush();
    const tornAt = rig.cache.internals.log.keyHead.offsetBytes;
    await rig.cache.write(pattern(2, 4096, 4096), 4096);
    await rig.cache.flush();
    rig.cache.abandon();
    flipBits(rig.cacheDevice.bytes, dataAt(0, tornAt + 30), 0xff); // inside the second kset
    const cache = await rig.reopen();
    assert.match(cache.replayResult.stopReason, /CRC mismatch/);
    assert.equal(cache.replayResult.stopDamage, false);
    assert.deepEqual(await readBytes(cache, 0, 4096), pattern(1, 0, 4096));
    assert.deepEqual(await readBytes(cache, 4096, 4096), Buffer.alloc(4096), 'the torn kset is gone');
    assert.deepEqual(await cache.check(), []);
  });

  it('detects a cycle in the LAST-kset chain', async () => {
    const rig = await openRig();
    await rig.cache.write(pattern(1, 0, 4096), 0);
    await rig.cache.flush();
    const head = rig.cache.internals.log.keyHead;
    rig.cache.abandon();
    // Forge a LAST kset at key_head that points back at the log segment itself.
    const last = encodeLastKset(head.segment, 1, ksetCrcSeed(new Uint8Array(16).fill(7)), { seq: head.seq, durableSeq: head.seq - 1 });
    rig.cacheDevice.bytes.set(last, dataAt(head.segment, head.offsetBytes));
    const cache = await rig.reopen({ readOnly: true });
    assert.match(cache.replayResult.stopReason, /cycle/);
    assert.equal(cache.replayResult.stopDamage, true);
    const report = await checkCacheDevice(rig.cacheDevice);
    assert.ok(report.problems.some((p) => /cycle/.test(p)), report.problems.join('; '));
    assert.deepEqual(await readBytes(cache, 0, 4096), pattern(1, 0, 4096));
  });

  it('reports a forged key (valid CRC, out-of-bounds field) as damage', async () => {
    const rig = await openRig();
    await rig.cache.write(pattern(1, 0, 4096), 0);
    await rig.cache.flush();
    rig.cache.abandon();
    const kset = dataAt(0, 0);
    writeU32LE(rig.cacheDevice.bytes, kset + ksetExtendedHeaderBytes + 8, 1000); // key 0 length: not whole sectors
    const size = ksetExtendedHeaderBytes + 40;
    writeU32LE(rig.cacheDevice.bytes, kset, crc32c(rig.cacheDevice.bytes.subarray(kset + 4, kset + size), ksetCrcSeed(new Uint8Array(16).fill(7))));
    const report = await checkCacheDevice(rig.cacheDevice);
    assert.ok(report.problems.some((p) => /damage.*multiple of 512/.test(p)), report.problems.join('; '));
  });

  it('reports a segment whose generation went back behind a kset it holds', async () => {
    const rig = await openRig();
    await rig.cache.write(pattern(1, 0, 4096), 0);
    await rig.cache.flush();
    await rig.cache.close();
    const free = 7; // never handed out: generation 0
    const seed = ksetCrcSeed(new Uint8Array(16).fill(7));
    // A kset of the segment's own generation, left from an earlier use: normal.
    rig.cacheDevice.bytes.set(encodeLastKset(0, 0, seed, { seq: 1, durableSeq: 0 }), dataAt(free, 0));
    assert.deepEqual((await checkCacheDevice(rig.cacheDevice)).problems, []);
    // One of a newer generation than the segment's: its generation record went back.
    rig.cacheDevice.bytes.set(encodeLastKset(0, 3, seed, { seq: 1, durableSeq: 0 }), dataAt(free, 0));
    const report = await checkCacheDevice(rig.cacheDevice);
    assert.deepEqual(report.problems, [`segment ${free} holds a kset of generation 3, newer than its own generation 0: a generation record went back`]);
  });
});

describe('data CRC', () => {
  it('a corrupted cached extent fails reads with EIO, is counted, and is reported by replay, check and writeback', async () => {
    const rig = await openRig({ format: { dataCrc: true } });
    await rig.cache.write(pattern(1, 0, 8192), 0);
    await rig.cache.write(pattern(2, 8192, 4096), 8192);
    await rig.cache.write(pattern(3, 2048, 1024), 2048); // cuts the first key in two
    await rig.cache.flush();
    assert.deepEqual(await readBytes(rig.cache, 0, 12288), Buffer.concat([pattern(1, 0, 2048), pattern(3, 2048, 1024), pattern(1, 3072, 5120), pattern(2, 8192, 4096)]));
    // Flip one byte of the first write's data, inside the part that is still live after the cut.
    const segment = rig.cache.internals.ctx.index.subtree(0, true).segment(0);
    flipBits(rig.cacheDevice.bytes, dataAt(segment, 6000));
    await assert.rejects(() => readBytes(rig.cache, 4096, 512), code('EIO'));
    // The cut front piece shares the CRC of the whole original extent, so it fails too.
    await assert.rejects(() => readBytes(rig.cache, 0, 512), code('EIO'));
    assert.deepEqual(await readBytes(rig.cache, 8192, 4096), pattern(2, 8192, 4096), 'other extents still read');
    assert.equal(rig.cache.status().counters.dataCrcErrors, 2);
    assert.equal(await rig.cache.writebackStep(), false, 'writeback refuses to copy corrupt data');
    assert.match(rig.cache.status().stateReason ?? '', /CRC mismatch/);
    rig.cache.abandon();
    const cache = await rig.reopen();
    assert.equal(cache.replayResult.dataCrcErrors.length, 1);
    const report = await checkCacheDevice(rig.cacheDevice);
    assert.ok(report.problems.some((p) => /data CRC mismatch/.test(p)));
  });
});

describe('golden images of every format version', () => {
  for (const version of goldenVersions) it(`version ${version}: opens, checks clean and reads back exactly what was written`, async () => {
    const cacheDevice = new MemoryDevice(new Uint8Array(gunzipSync(readFileSync(goldenImagePath(version, 'cache')))));
    const backingDevice = new MemoryDevice(new Uint8Array(gunzipSync(readFileSync(goldenImagePath(version, 'backing')))));
    assert.equal(cacheDevice.sizeBytes, goldenCacheBytes(version));
    assert.equal(backingDevice.sizeBytes, goldenBackingBytes);
    const report = await checkCacheDevice(cacheDevice);
    assert.deepEqual(report.problems, []);
    const summary = report.summary;
    assert.ok(summary !== undefined);
    assert.equal(summary.dataCrc, true);
    assert.equal(summary.gcPercent, 60);
    assert.equal(summary.cacheUuid, '00112233-4455-6677-8899-aabbccddeeff');
    assert.equal(summary.formatVersion, version);
    assert.ok(summary.dirtyBytes > 0, 'the image holds dirty data');
    const cache = await Cache.open({ cacheDevice, backingDevice, background: false, timers: new ManualTimers() });
    const expected = goldenExpected();
    assert.deepEqual(await readBytes(cache, 0, goldenBackingBytes), expected);
    await cache.drain();
    assert.ok(Buffer.from(backingDevice.bytes).equals(expected), 'writeback of the old image produces the same backing device');
  });
});

describe('the golden image of format version 3 (a cache device of volumes)', () => {
  it('opens, checks clean, and every volume reads back exactly what was written', async () => {
    const load = (name: 'cache' | 'gold' | 'silver'): MemoryDevice => new MemoryDevice(new Uint8Array(gunzipSync(readFileSync(goldenPoolPath(name)))));
    const device = load('cache');
    assert.equal(device.sizeBytes, goldenPoolBytes);
    const report = await checkPoolDevice(device);
    assert.deepEqual(report.problems, []);
    assert.deepEqual(report.warnings, []);
    assert.deepEqual(report.volumes.map((volume) => [volume.name, volume.segments, volume.report.summary?.dataCrc, volume.report.summary?.gcPercent]), [['gold', 5, true, 60], ['silver', 4, false, 70]]);
    const pool = await CachePool.open(device);
    assert.equal(pool.table.generation, 5);
    assert.equal(pool.table.nextVolumeId, 4);
    assert.deepEqual(pool.volume('silver')?.extents, [{ firstUnit: 5, unitCount: 4 }], 'silver took the removed volume\'s units');
    const open = (name: string, backing: MemoryDevice): Promise<Cache> => {
      const entry = pool.volume(name);
      assert.ok(entry !== undefined);
      return Cache.open({ cacheDevice: pool.volumeDevice(entry), backingDevice: backing, background: false, timers: new ManualTimers() });
    };
    const gold = load('gold');
    const goldCache = await open('gold', gold);
    const expected = goldenExpected();
    assert.deepEqual(await readBytes(goldCache, 0, goldenBackingBytes), expected);
    await goldCache.drain();
    assert.ok(Buffer.from(gold.bytes).equals(expected), 'writeback of gold produces the expected backing device');
    await goldCache.close();
    const silver = load('silver');
    const silverCache = await open('silver', silver);
    assert.ok(silverCache.status().dirtyBytes >= silverLengthBytes);
    assert.deepEqual(await readBytes(silverCache, silverOffsetBytes, silverLengthBytes), goldenData(100, silverLengthBytes));
    await silverCache.close();
  });
});

