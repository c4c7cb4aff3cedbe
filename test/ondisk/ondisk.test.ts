// On-disk records: round trip, CRC failure, torn copies, sequence wrap-around, and fields
// that are rejected even though their CRC is valid (a forged or damaged image).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { crc32c } from '../../src/lib/crc32c.js';
import { MiB, writeU32LE } from '../../src/lib/units.js';
import { cacheModes, decodeCacheInfo, encodeCacheInfo, noFingerprint, type CacheInfo } from '../../src/ondisk/cache_info.js';
import { decodeCachePos, encodeCachePos } from '../../src/ondisk/cache_pos.js';
import {
  crcCheckedKsetLogGen, decodeKset, encodeKey, encodeLastKset, isDropKey, keyBytes, keyFlagClean, keyFlagsDrop, keyFlagZero, ksetBytes, ksetBytesMax, ksetCrcSeed, ksetExtendedHeaderBytes,
  ksetHeaderBytes, ksetKeysMax, sealKset, validateKey, type KeyRecord, type KsetContext,
} from '../../src/ondisk/kset.js';
import { segmentCountFor, segmentCountTarget, segmentSizeDefaultBytes, segmentSizeDefaultFor, segmentSizeProblem, layoutFor, formatVersionLatest } from '../../src/ondisk/layout.js';
import { chooseLatest, DualCopyWriter, seqAfter, type Decoded } from '../../src/ondisk/meta_header.js';
import { decodeSegmentGen, encodeSegmentGen } from '../../src/ondisk/segment_gen.js';
import { decodeSegmentInfo, encodeSegmentInfo } from '../../src/ondisk/segment_info.js';
import { decodeSuperblock, encodeSuperblock, type Superblock } from '../../src/ondisk/superblock.js';


/** Re-seals a meta record after a field was changed, so only the bounds check can reject it. */
function reseal(record: Uint8Array): Uint8Array {
  writeU32LE(record, 0, crc32c(record.subarray(4)));
  return record;
}

function flipByte(record: Uint8Array, at: number): Uint8Array {
  const copy = record.slice();
  copy[at] = (copy[at] ?? 0) ^ 0x40;
  return copy;
}

function expectProblem<T>(decoded: Decoded<T>, pattern: RegExp): void {
  assert.equal(decoded.ok, false);
  assert.match(decoded.problem, pattern);
}

const sb: Superblock = {
  formatVersion: 1,
  segmentSizeBytes: 16 * MiB,
  segmentCount: 31,
  cacheUuid: Uint8Array.from({ length: 16 }, (_, i) => i * 7 + 1),
  backingSizeBytes: 8 * 1024 * MiB,
  backingIdentity: 'file:ino=1234',
  formatTimeMs: 1_700_000_000_000,
};
const sbDeviceBytes = 20 * 1024 + 31 * 16 * MiB;

describe('default segment size', () => {
  it('is the device size over the segment count target, rounded down to a power of two, from 1 MiB to 16 MiB', () => {
    const GiB = 1024 * MiB;
    assert.equal(segmentSizeDefaultFor(64 * GiB), segmentSizeDefaultBytes, 'dm-pcache\'s 16 MiB for large caches');
    assert.equal(segmentSizeDefaultFor(4 * GiB), 16 * MiB);
    assert.equal(segmentSizeDefaultFor(4 * GiB - MiB), 8 * MiB);
    assert.equal(segmentSizeDefaultFor(GiB), 4 * MiB);
    assert.equal(segmentSizeDefaultFor(512 * MiB), 2 * MiB);
    assert.equal(segmentSizeDefaultFor(300 * MiB), MiB);
    assert.equal(segmentSizeDefaultFor(256 * MiB), MiB);
    assert.equal(segmentSizeDefaultFor(100 * MiB), MiB);
    assert.equal(segmentSizeDefaultFor(8 * MiB), MiB, 'never below the minimum');
    const layout = layoutFor(formatVersionLatest);
    for (const deviceBytes of [16 * MiB, 100 * MiB, 256 * MiB, 700 * MiB, 3 * GiB, 6 * GiB]) {
      const size = segmentSizeDefaultFor(deviceBytes);
      assert.equal(segmentSizeProblem(size), undefined);
      // About the target count (the device's metadata may take one): never far fewer, never twice as many.
      const count = segmentCountFor(deviceBytes, size, layout);
      assert.ok(size === MiB || size === segmentSizeDefaultBytes || (count >= segmentCountTarget - 1 && count < 2 * segmentCountTarget), `${count} segments of ${size} in ${deviceBytes}`);
    }
  });
});

describe('superblock', () => {
  it('round-trips', () => {
    const decoded = decodeSuperblock(encodeSuperblock(sb), sbDeviceBytes);
    assert.ok(decoded.ok);
    assert.deepEqual({ ...decoded.value, cacheUuid: [...decoded.value.cacheUuid] }, { ...sb, cacheUuid: [...sb.cacheUuid] });
  });
  it('rejects a CRC mismatch', () => {
    expectProblem(decodeSuperblock(flipByte(encodeSuperblock(sb), 30), sbDeviceBytes), /CRC mismatch/);
  });
  it('rejects a record without the magic as foreign', () => {
    expectProblem(decodeSuperblock(flipByte(encodeSuperblock(sb), 9), sbDeviceBytes), /no pcache magic/);
  });
  it('rejects out-of-bounds fields even with a valid CRC', () => {
    const cases: [string, (r: Uint8Array) => void, RegExp][] = [
      ['segments past the device end', (r) => { writeU32LE(r, 24, 32); }, /past the device end/],
      ['segment size below 1 MiB', (r) => { writeU32LE(r, 20, 512 * 1024); }, /below the minimum/],
      ['segment size not a multiple of 1 MiB', (r) => { writeU32LE(r, 20, 16 * MiB + 4096); }, /multiple of 1 MiB/],
      ['too few segments', (r) => { writeU32LE(r, 24, 2); }, /below the minimum/],
      ['identity longer than its field', (r) => { r[56] = 200; r[57] = 0; }, /identity length/],
      ['unknown flags', (r) => { writeU32LE(r, 16, 1); }, /unknown flags/],
      ['backing size not whole sectors', (r) => { writeU32LE(r, 48, 1000); writeU32LE(r, 52, 0); }, /multiple of 512/],
      ['backing size beyond 2^53', (r) => { writeU32LE(r, 52, 0xffffffff); }, /backing size/],
    ];
    for (const [name, mutate, pattern] of cases) {
      const record = encodeSuperblock(sb);
      mutate(record);
      const decoded = decodeSuperblock(reseal(record), sbDeviceBytes);
      assert.equal(decoded.ok, false, name);
      assert.match(decoded.problem, pattern, name);
    }
  });
  it('rejects a format version it does not know, naming it', () => {
    const record = encodeSuperblock(sb);
    record[5] = 4;
    expectProblem(decodeSuperblock(reseal(record), sbDeviceBytes), /format version 4, which this pcache does not know.*newer pcache/);
  });
  it('rejects format version 3 (a cache device of volumes) as a cache of one backing device, saying what to do', () => {
    const record = encodeSuperblock(sb);
    record[5] = 3;
    expectProblem(decodeSuperblock(reseal(record), sbDeviceBytes), /holds volumes \(format version 3\): serve it without --backing/);
  });
  it('version 2 keeps the device\'s last 4 KiB block out of the segments', () => {
    const v2: Superblock = { ...sb, formatVersion: 2 };
    const decoded = decodeSuperblock(encodeSuperblock(v2), sbDeviceBytes + 4096);
    assert.ok(decoded.ok);
    assert.equal(decoded.value.formatVersion, 2);
    expectProblem(decodeSuperblock(encodeSuperblock(v2), sbDeviceBytes), /past the device end/);
  });
});

describe('dual-copy records', () => {
  const info: CacheInfo = { dataCrc: true, initDone: true, gcPercent: 70, segmentCount: 31, firstSegment: 0, backingState: 'unknown', backingFingerprint: noFingerprint, mode: 'writeback' };

  it('cache_info round-trips', () => {
    const decoded = decodeCacheInfo(encodeCacheInfo(info, 9, 1), 31, 'cache_info', 1);
    assert.ok(decoded.ok);
    assert.deepEqual(decoded.value, info);
    assert.equal(decoded.seq, 9);
  });
  it('cache_info of version 2 keeps the write mode and refuses an unknown one', () => {
    for (const mode of cacheModes) {
      const decoded = decodeCacheInfo(encodeCacheInfo({ ...info, mode }, 3, 2), 31, 'cache_info', 2);
      assert.ok(decoded.ok);
      assert.equal(decoded.value.mode, mode);
    }
    const record = encodeCacheInfo({ ...info, mode: 'passthrough' }, 3, 2);
    assert.equal(record[28], 3);
    writeU32LE(record, 28, 4);
    expectProblem(decodeCacheInfo(reseal(record), 31, 'cache_info', 2), /unknown cache mode 4/);
    // Version 1 records no mode: always writeback.
    const v1 = decodeCacheInfo(encodeCacheInfo({ ...info, mode: 'writearound' }, 3, 1), 31, 'cache_info', 1);
    assert.ok(v1.ok && v1.value.mode === 'writeback');
  });
  it('cache_info rejects out-of-bounds fields after a valid CRC', () => {
    const cases: [(r: Uint8Array) => void, RegExp][] = [
      [(r) => { writeU32LE(r, 12, 91); }, /gc_percent 91/],
      [(r) => { writeU32LE(r, 16, 30); }, /differs from the superblock/],
      [(r) => { writeU32LE(r, 8, 0x10); }, /unknown flags/],
      [(r) => { writeU32LE(r, 20, 3); }, /first segment/],
    ];
    for (const [mutate, pattern] of cases) {
      const record = encodeCacheInfo(info, 1, 1);
      mutate(record);
      expectProblem(decodeCacheInfo(reseal(record), 31, 'cache_info', 1), pattern);
    }
  });
  it('positions round-trip and reject out-of-range segments and offsets', () => {
    const limits = { segmentCount: 31, dataSizeBytes: 16 * MiB - 12 * 1024, ksetHeaderBytes };
    const decoded = decodeCachePos(encodeCachePos({ segment: 30, offsetBytes: 5144, seq: 0, durableSeq: 0 }, 3, 1), limits, 'key_tail', 1);
    assert.ok(decoded.ok);
    assert.deepEqual(decoded.value, { segment: 30, offsetBytes: 5144, seq: 0, durableSeq: 0 });
    expectProblem(decodeCachePos(encodeCachePos({ segment: 31, offsetBytes: 0, seq: 0, durableSeq: 0 }, 3, 1), limits, 'key_tail', 1), /out of range/);
    expectProblem(decodeCachePos(encodeCachePos({ segment: 1, offsetBytes: limits.dataSizeBytes, seq: 0, durableSeq: 0 }, 3, 1), limits, 'key_tail', 1), /past the data area/);
    expectProblem(decodeCachePos(encodeCachePos({ segment: 1, offsetBytes: 12, seq: 0, durableSeq: 0 }, 3, 1), limits, 'key_tail', 1), /multiple of 8/);
    // Version 2 carries the seq of the kset at the position; read as version 1 (a shorter record) it fails its CRC.
    const v2 = decodeCachePos(encodeCachePos({ segment: 30, offsetBytes: 5160, seq: 2 ** 40, durableSeq: 2 ** 40 - 1 }, 3, 2), { ...limits, ksetHeaderBytes: 40 }, 'key_tail', 2);
    assert.ok(v2.ok);
    assert.deepEqual(v2.value, { segment: 30, offsetBytes: 5160, seq: 2 ** 40, durableSeq: 2 ** 40 - 1 });
    expectProblem(decodeCachePos(encodeCachePos({ segment: 1, offsetBytes: 0, seq: 0, durableSeq: 0 }, 3, 2), { ...limits, ksetHeaderBytes: 40 }, 'key_tail', 2), /seq 0 out of range/);
    expectProblem(decodeCachePos(encodeCachePos({ segment: 1, offsetBytes: 0, seq: 1, durableSeq: 0 }, 3, 2), limits, 'key_tail', 1), /CRC mismatch/);
    const v1Read = encodeCachePos({ segment: 1, offsetBytes: 0, seq: 0, durableSeq: 0 }, 3, 1);
    expectProblem(decodeCachePos(v1Read, { ...limits, ksetHeaderBytes: 40 }, 'key_tail', 2), /./);
  });
  it('segment info and generation round-trip; generation rejects values beyond 2^53', () => {
    const info0 = decodeSegmentInfo(encodeSegmentInfo({ next: 5 }, 1, 1), 31, 'seg_info', 1);
    assert.ok(info0.ok);
    assert.equal(info0.value.next, 5);
    const last = decodeSegmentInfo(encodeSegmentInfo({ next: undefined }, 1, 1), 31, 'seg_info', 1);
    assert.ok(last.ok);
    assert.equal(last.value.next, undefined);
    expectProblem(decodeSegmentInfo(encodeSegmentInfo({ next: 31 }, 1, 1), 31, 'seg_info', 1), /out of range/);
    const gen = decodeSegmentGen(encodeSegmentGen(2 ** 40 + 3, 200, 1), 'gen', 1);
    assert.ok(gen.ok);
    assert.equal(gen.value, 2 ** 40 + 3);
    const huge = encodeSegmentGen(0, 1, 1);
    writeU32LE(huge, 12, 0xffffffff);
    expectProblem(decodeSegmentGen(reseal(huge), 'gen', 1), /out of range/);
  });
  it('a torn copy is ignored and the other copy wins, whichever slot it is in', () => {
    const older = decodeCacheInfo(encodeCacheInfo({ ...info, gcPercent: 10 }, 4, 1), 31, 'cache_info', 1);
    const newerTorn = decodeCacheInfo(flipByte(encodeCacheInfo({ ...info, gcPercent: 20 }, 5, 1), 13), 31, 'cache_info', 1);
    for (const pair of [[older, newerTorn], [newerTorn, older]] as const) {
      const choice = chooseLatest(pair);
      assert.equal(choice.value?.gcPercent, 10);
      assert.equal(choice.problems.length, 1);
      assert.match(choice.problems[0] ?? '', /CRC mismatch/);
    }
    const none = chooseLatest([newerTorn, newerTorn]);
    assert.equal(none.value, undefined);
  });
  it('sequence numbers compare with 8-bit wrap-around', () => {
    assert.ok(seqAfter(1, 0));
    assert.ok(seqAfter(0, 255));
    assert.ok(seqAfter(5, 250));
    assert.ok(!seqAfter(250, 5));
    assert.ok(!seqAfter(7, 7));
    const a = decodeCacheInfo(encodeCacheInfo({ ...info, gcPercent: 30 }, 255, 1), 31, 'cache_info', 1);
    const b = decodeCacheInfo(encodeCacheInfo({ ...info, gcPercent: 40 }, 0, 1), 31, 'cache_info', 1);
    assert.equal(chooseLatest([a, b]).value?.gcPercent, 40);
    assert.equal(chooseLatest([b, a]).value?.gcPercent, 40);
  });
  it('the writer always overwrites the older copy and only advances after a successful write', () => {
    const writer = new DualCopyWriter({ latestIndex: 1, latestSeq: 255 });
    const first = writer.target();
    assert.deepEqual(first, { index: 0, seq: 0 });
    assert.deepEqual(writer.target(), first, 'a failed write is retried into the same slot');
    writer.written(first);
    assert.deepEqual(writer.target(), { index: 1, seq: 1 });
    const fresh = new DualCopyWriter({ latestIndex: undefined, latestSeq: 0 });
    assert.deepEqual(fresh.target(), { index: 0, seq: 1 });
  });
});

describe('keys and ksets', () => {
  const uuid = Uint8Array.from({ length: 16 }, (_, i) => 255 - i);
  const crcSeed = ksetCrcSeed(uuid);
  const dataSizeBytes = MiB - 12 * 1024;
  const context: KsetContext = { crcSeed, logGen: 7, roomBytes: dataSizeBytes, segmentCount: 8, dataSizeBytes, backingSizeBytes: 64 * MiB, extended: false };
  const key = (overrides: Partial<KeyRecord> = {}): KeyRecord => ({
    offsetBytes: 4 * MiB + 8192, lengthBytes: 4096, flags: 0, segment: 3, segmentOffsetBytes: 65536, gen: 7, dataCrc: 0xdeadbeef, ...overrides,
  });
  const build = (keys: KeyRecord[], options: { epochEnd?: boolean; logGen?: number } = {}): Uint8Array => {
    const buffer = new Uint8Array(ksetBytes(ksetKeysMax, false) + ksetHeaderBytes);
    keys.forEach((k, i) => { encodeKey(buffer, ksetHeaderBytes + i * keyBytes, k); });
    const size = sealKset(buffer, { keyCount: keys.length, epochEnd: options.epochEnd ?? false, logGen: options.logGen ?? 7, crcSeed, seqs: undefined });
    return buffer.subarray(0, size);
  };

  it('round-trips a full kset of 128 keys', () => {
    const keys = Array.from({ length: ksetKeysMax }, (_, i) => key({ offsetBytes: i * 4096, flags: i % 3 === 0 ? keyFlagClean : 0 }));
    const decoded = decodeKset(build(keys, { epochEnd: true }), context);
    assert.ok(decoded.ok && decoded.kind === 'keys');
    assert.equal(decoded.sizeBytes, 24 + 128 * 40);
    assert.equal(decoded.epochEnd, true);
    assert.deepEqual(decoded.keys, keys);
  });
  it('round-trips a LAST kset', () => {
    const decoded = decodeKset(encodeLastKset(5, 7, crcSeed, undefined), context);
    assert.ok(decoded.ok && decoded.kind === 'last');
    assert.equal(decoded.next, 5);
  });
  it('ends the log (not damage) at a torn kset, a zeroed header, and a kset from an earlier lap', () => {
    const kset = build([key(), key({ offsetBytes: 0 })]);
    for (let at = 0; at < kset.length; at += 11) {
      if (at >= 8 && at < 16) continue; // the magic: covered by the next case
      const torn = decodeKset(flipByte(kset, at), context);
      assert.equal(torn.ok, false, `byte ${at}`);
      assert.equal(torn.damage, false, `byte ${at}: ${torn.problem}`);
    }
    const zeroed = decodeKset(new Uint8Array(64), context);
    assert.ok(!zeroed.ok && !zeroed.damage && /no kset magic/.test(zeroed.problem));
    const earlierLap = decodeKset(build([key()], { logGen: 6 }), context);
    assert.ok(!earlierLap.ok && !earlierLap.damage && /earlier use/.test(earlierLap.problem));
    const otherFormat = decodeKset(build([key()]), { ...context, crcSeed: crcSeed ^ 1 });
    assert.ok(!otherFormat.ok && /CRC mismatch/.test(otherFormat.problem));
  });
  it('reads a log_gen only where the header and CRC pass, as decodeKset does before the rest', () => {
    assert.equal(crcCheckedKsetLogGen(build([key()], { logGen: 6 }), context), 6, 'an earlier lap');
    assert.equal(crcCheckedKsetLogGen(build([key(), key({ offsetBytes: 100 })]), context), 7, 'keys are not its business');
    assert.equal(crcCheckedKsetLogGen(encodeLastKset(5, 9, crcSeed, undefined), context), 9);
    const kset = build([key(), key({ offsetBytes: 0 })], { logGen: 6 });
    for (let at = 0; at < kset.length; at += 11) {
      // Wherever decodeKset still reads the other lap's log_gen, this reads it too.
      const torn = flipByte(kset, at);
      const decoded = decodeKset(torn, context);
      assert.equal(crcCheckedKsetLogGen(torn, context), decoded.ok ? 7 : decoded.otherLogGen, `byte ${at}`);
    }
    assert.equal(crcCheckedKsetLogGen(new Uint8Array(64), context), undefined);
    assert.equal(crcCheckedKsetLogGen(build([key()]), { ...context, crcSeed: crcSeed ^ 1 }), undefined);
    assert.equal(crcCheckedKsetLogGen(build([key(), key()]), { ...context, roomBytes: ksetBytes(1, false) }), undefined);
    const tooMany = build([key()]).slice();
    writeU32LE(tooMany, 4, 129);
    assert.equal(crcCheckedKsetLogGen(tooMany, context), undefined);
  });
  it('refuses a key count above 128 and a kset that overruns its segment', () => {
    const kset = build([key()]).slice();
    writeU32LE(kset, 4, 129);
    const decoded = decodeKset(kset, context);
    assert.ok(!decoded.ok && /exceeds 128/.test(decoded.problem));
    const near = decodeKset(build([key(), key()]), { ...context, roomBytes: ksetBytes(1, false) });
    assert.ok(!near.ok && /overrun/.test(near.problem));
  });
  it('reports damage for out-of-bounds keys under a valid CRC', () => {
    const cases: [Partial<KeyRecord>, RegExp][] = [
      [{ offsetBytes: 100 }, /not sector-aligned/],
      [{ lengthBytes: 0 }, /positive multiple/],
      [{ lengthBytes: 1000 }, /positive multiple/],
      [{ offsetBytes: 64 * MiB - 512, lengthBytes: 4096 }, /past the backing device/],
      [{ offsetBytes: 4 * MiB - 512, lengthBytes: 1024 }, /subtree boundary/],
      [{ flags: 1 }, /unknown key flags/],
      [{ flags: keyFlagZero | keyFlagClean, segment: 0, segmentOffsetBytes: 0, gen: 0, dataCrc: 0 }, /both ZERO and CLEAN/],
      [{ flags: keyFlagZero }, /must not point at data/],
      [{ segment: 8 }, /segment 8 out of range/],
      [{ segmentOffsetBytes: 100 }, /segment offset/],
      [{ segmentOffsetBytes: dataSizeBytes - 2048 }, /runs past the segment/],
    ];
    for (const [overrides, pattern] of cases) {
      const decoded = decodeKset(build([key(), key(overrides)]), context);
      assert.equal(decoded.ok, false, JSON.stringify(overrides));
      assert.equal(decoded.damage, true);
      assert.match(decoded.problem, pattern);
      assert.match(validateKey(key(overrides), context) ?? '', pattern);
    }
    const emptyNoEpoch = decodeKset(build([]), context);
    assert.ok(!emptyNoEpoch.ok && emptyNoEpoch.damage);
    const emptyMarker = decodeKset(build([], { epochEnd: true }), context);
    assert.ok(emptyMarker.ok && emptyMarker.kind === 'keys' && emptyMarker.keys.length === 0);
    const lastOutOfRange = decodeKset(encodeLastKset(8, 7, crcSeed, undefined), context);
    assert.ok(!lastOutOfRange.ok && lastOutOfRange.damage);
  });
  it('accepts a ZERO key that points at no data', () => {
    const zero = key({ flags: keyFlagZero, segment: 0, segmentOffsetBytes: 0, gen: 0, dataCrc: 0, lengthBytes: 4 * MiB, offsetBytes: 0 });
    assert.equal(validateKey(zero, context), undefined);
  });
});

describe('extended ksets (format version 2)', () => {
  const crcSeed = ksetCrcSeed(Uint8Array.from({ length: 16 }, (_, i) => i + 1));
  const dataSizeBytes = MiB - 12 * 1024;
  const context: KsetContext = { crcSeed, logGen: 3, roomBytes: dataSizeBytes, segmentCount: 8, dataSizeBytes, backingSizeBytes: 64 * MiB, extended: true };
  const key: KeyRecord = { offsetBytes: 8192, lengthBytes: 4096, flags: 0, segment: 2, segmentOffsetBytes: 0, gen: 3, dataCrc: 0 };
  const build = (seqs: { seq: number; durableSeq: number } | undefined, keyCount = 2, epochEnd = false): Uint8Array => {
    const header = seqs === undefined ? ksetHeaderBytes : ksetExtendedHeaderBytes;
    const buffer = new Uint8Array(ksetBytesMax + ksetExtendedHeaderBytes);
    for (let i = 0; i < keyCount; i++) encodeKey(buffer, header + i * keyBytes, { ...key, offsetBytes: key.offsetBytes + i * 4096 });
    return buffer.subarray(0, sealKset(buffer, { keyCount, epochEnd, logGen: 3, crcSeed, seqs }));
  };

  it('round-trips seq and durable_seq, in ksets with keys and in LAST ksets', () => {
    const decoded = decodeKset(build({ seq: 2 ** 40, durableSeq: 2 ** 40 - 9 }), context);
    assert.ok(decoded.ok && decoded.kind === 'keys');
    assert.equal(decoded.sizeBytes, 40 + 2 * 40);
    assert.equal(decoded.seq, 2 ** 40);
    assert.equal(decoded.durableSeq, 2 ** 40 - 9);
    assert.equal(decoded.keys[1]?.offsetBytes, 12288);
    const last = decodeKset(encodeLastKset(6, 3, crcSeed, { seq: 17, durableSeq: 16 }), context);
    assert.ok(last.ok && last.kind === 'last');
    assert.deepEqual([last.next, last.seq, last.durableSeq, last.sizeBytes], [6, 17, 16, 40]);
  });
  it('never takes a kset of the other version for part of the log, and refuses impossible seqs as damage', () => {
    assert.equal(decodeKset(build(undefined), context).ok, false);
    assert.equal(decodeKset(build({ seq: 5, durableSeq: 4 }), { ...context, extended: false }).ok, false);
    // Where the sizes happen to agree (a v1 LAST kset is 24 bytes, read in a 40-byte window), the flag decides.
    const v1Last = new Uint8Array(40);
    v1Last.set(encodeLastKset(6, 3, crcSeed, undefined));
    const lastWithoutExtended = decodeKset(v1Last, context);
    assert.equal(lastWithoutExtended.ok, false);
    for (const seqs of [{ seq: 0, durableSeq: 0 }, { seq: 5, durableSeq: 5 }, { seq: 5, durableSeq: 9 }]) {
      const decoded = decodeKset(build(seqs), context);
      assert.ok(!decoded.ok && decoded.damage && /impossible/.test(decoded.problem), JSON.stringify(seqs));
    }
  });
  it('accepts a DROP key (CLEAN and ZERO, no data) and nothing else of that shape', () => {
    const drop: KeyRecord = { offsetBytes: 8192, lengthBytes: 4 * MiB - 8192, flags: keyFlagsDrop, segment: 0, segmentOffsetBytes: 0, gen: 0, dataCrc: 0 };
    assert.equal(validateKey(drop, context), undefined);
    assert.ok(isDropKey(drop.flags) && !isDropKey(keyFlagZero) && !isDropKey(keyFlagClean));
    assert.match(validateKey({ ...drop, segment: 2 }, context) ?? '', /must not point at data/);
    assert.match(validateKey(drop, { ...context, extended: false }) ?? '', /before format version 2/);
  });
  it('a full extended kset fits ksetBytesMax', () => {
    const decoded = decodeKset(build({ seq: 1, durableSeq: 0 }, ksetKeysMax, true), context);
    assert.ok(decoded.ok && decoded.kind === 'keys');
    assert.equal(decoded.sizeBytes, ksetBytesMax);
  });
});
