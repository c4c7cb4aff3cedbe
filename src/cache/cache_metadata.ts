// A cache device's metadata as a whole: formatting a device, telling what a device holds
// (blank, a cache, damaged records of one, something else), reading and validating every
// metadata record, and the one rewrite of the superblock (a backing device's new size).
// CacheDev (cache_dev.ts) does the writes of a running cache.

import { randomUUID } from 'node:crypto';
import { crc32c } from '../lib/crc32c.js';
import { PcacheError } from '../lib/errors.js';
import { isAllZero, readU32LE } from '../lib/units.js';
import type { BlockDevice } from '../device/block_device.js';
import { cacheInfoRecordBytes, cacheInfoRecordBytesMax, encodeCacheInfo, decodeCacheInfo, noFingerprint, type CacheInfo } from '../ondisk/cache_info.js';
import { cachePosRecordBytes, cachePosRecordBytesMax, decodeCachePos, encodeCachePos, type CachePos } from '../ondisk/cache_pos.js';
import { ksetHeaderBytesFor } from '../ondisk/kset.js';
import {
  blankProbeBytes, blockBytes, cacheInfoOffsetsBytes, formatVersionLatest, formatVersionsSupported, gcPercentDefault, gcPercentMax,
  lastBlockOffsetBytes, layoutFor, segmentCountFor, segmentCountMax, segmentCountMin, segmentDataOffsetBytes, segmentDataSizeBytes,
  segmentInfoOffsetsBytes, segmentOffsetBytes, segmentsOffsetBytes, segmentSizeDefaultFor, segmentSizeMinBytes, segmentSizeProblem,
  superblockOffsetBytes, type FormatVersion,
} from '../ondisk/layout.js';
import { chooseLatest, metaRecordVersion, type Decoded, type DualCopyChoice } from '../ondisk/meta_header.js';
import { decodeSegmentGen, encodeSegmentGen } from '../ondisk/segment_gen.js';
import { decodeSegmentInfo, encodeSegmentInfo, segmentInfoRecordBytes, type SegmentInfo } from '../ondisk/segment_info.js';
import { decodeSuperblock, encodeSuperblock, hasSuperblockMagic, superblockRecordBytes, type Superblock } from '../ondisk/superblock.js';

export interface FormatOptions {
  /** Bytes per segment; default by the device's size (segmentSizeDefaultFor: 16 MiB from 4 GiB on), smallest 1 MiB. */
  segmentSizeBytes?: number;
  /** Protect every data extent with a CRC32C (fixed at format). Default false. */
  dataCrc?: boolean;
  /** GC threshold in percent of segments in use, 0..90. Default 70. */
  gcPercent?: number;
  /** The cache's uuid (tests pass one for reproducible images); default random. */
  cacheUuid?: Uint8Array;
  /** Format time to record (tests); default now. */
  formatTimeMs?: number;
  /** The format version to write; default the latest. Older ones only for tests of what old releases left behind. */
  formatVersion?: FormatVersion;
}

/** Everything read from the metadata areas of a cache device, validated. */
export interface CacheMetadata {
  readonly sb: Superblock;
  /** Why a superblock copy is unusable (the other one is used); empty when all are fine. */
  readonly superblockDamage: string[];
  /** The indices of the superblock copies that are unusable (version 2 has copies 0 and 1). */
  readonly superblockBadCopies: number[];
  readonly cacheInfo: DualCopyChoice<CacheInfo> & { value: CacheInfo };
  readonly keyTail: DualCopyChoice<CachePos> & { value: CachePos };
  readonly dirtyTail: DualCopyChoice<CachePos> & { value: CachePos };
  readonly segmentInfos: DualCopyChoice<SegmentInfo>[];
  readonly gens: DualCopyChoice<number>[];
}

export type DeviceContents = 'blank' | 'pcache' | 'other';

/**
 * What a device holds: blank (first 8 KiB zero), a pcache superblock (either copy), or
 * something else (which may still be a pcache cache whose superblocks are both damaged:
 * pcacheRecordsFound tells).
 */
export async function probeDevice(device: BlockDevice): Promise<DeviceContents> {
  if (device.sizeBytes < blankProbeBytes) return 'other';
  const head = new Uint8Array(blankProbeBytes);
  await device.read(head, 0);
  if (hasSuperblockMagic(head.subarray(superblockOffsetBytes))) return 'pcache';
  if (await readSecondSuperblock(device) !== undefined) return 'pcache';
  return isAllZero(head) ? 'blank' : 'other';
}

/** The second superblock copy of a version 2 device, if the device's last block holds a valid one. */
async function readSecondSuperblock(device: BlockDevice): Promise<Decoded<Superblock> | undefined> {
  if (device.sizeBytes < 2 * blankProbeBytes) return undefined;
  const bytes = new Uint8Array(superblockRecordBytes);
  await device.read(bytes, lastBlockOffsetBytes(device.sizeBytes));
  if (!hasSuperblockMagic(bytes)) return undefined;
  const decoded = decodeSuperblock(bytes, device.sizeBytes);
  return decoded.ok && decoded.value.formatVersion === 1 ? undefined : decoded;
}

/**
 * Reads and validates every metadata record. Errors: FOREIGN when the device is not a pcache
 * cache, CORRUPT when a record the cache cannot do without has no valid copy (including a
 * device whose superblocks are gone but whose other records show it was a pcache cache).
 */
export async function readCacheMetadata(device: BlockDevice): Promise<CacheMetadata> {
  const sbBytes = new Uint8Array(superblockRecordBytes);
  await device.read(sbBytes, superblockOffsetBytes);
  const first = hasSuperblockMagic(sbBytes) ? decodeSuperblock(sbBytes, device.sizeBytes) : undefined;
  const second = first?.ok === true && first.value.formatVersion === 1 ? undefined : await readSecondSuperblock(device);
  const superblockDamage: string[] = [];
  const superblockBadCopies: number[] = [];
  let sb: Superblock;
  if (first?.ok === true) {
    sb = first.value;
    if (sb.formatVersion !== 1 && second?.ok !== true) {
      superblockDamage.push(`superblock copy 1 (the device's last 4 KiB block): ${second?.ok === false ? second.problem : 'no pcache superblock there'}`);
      superblockBadCopies.push(1);
    }
  } else if (second?.ok === true) {
    sb = second.value;
    superblockDamage.push(`superblock copy 0: ${first?.ok === false ? first.problem : 'no pcache superblock there'}`);
    superblockBadCopies.push(0);
  } else {
    // A superblock copy 0 with the magic that fails its checks: the device is pcache's, damaged.
    if (first !== undefined) throw new PcacheError('CORRUPT', first.problem);
    const found = await pcacheRecordsFound(device);
    if (found.length > 0) {
      throw new PcacheError('CORRUPT', `the cache device has no valid pcache superblock, but it holds pcache records (${found.join(', ')}): it is a damaged pcache cache, which may hold data not yet written back`);
    }
    throw new PcacheError('FOREIGN', 'the cache device holds no pcache superblock', { reason: 'not-pcache' });
  }
  const version = sb.formatVersion;
  const layout = layoutFor(version);
  const limits = { segmentCount: sb.segmentCount, dataSizeBytes: segmentDataSizeBytes(sb.segmentSizeBytes), ksetHeaderBytes: ksetHeaderBytesFor(layout.extendedKsets) };

  const readPair = async <T>(offsets: readonly [number, number], bytes: number, decode: (record: Uint8Array, copy: number) => Decoded<T>): Promise<DualCopyChoice<T>> => {
    const copies: Decoded<T>[] = [];
    for (const [copy, at] of offsets.entries()) {
      const record = new Uint8Array(bytes);
      await device.read(record, at);
      copies.push(decode(record, copy));
    }
    return chooseLatest([copies[0] ?? missing(), copies[1] ?? missing()]);
  };

  const cacheInfo = await readPair<CacheInfo>(cacheInfoOffsetsBytes, cacheInfoRecordBytesMax, (r, copy) => decodeCacheInfo(r, sb.segmentCount, `cache_info copy ${copy}`, version));
  if (cacheInfo.value === undefined) throw new PcacheError('CORRUPT', `no valid cache_info: ${cacheInfo.problems.join('; ')}`);
  const keyTail = await readPair<CachePos>(layout.keyTailOffsetsBytes, cachePosRecordBytesMax, (r, copy) => decodeCachePos(r, limits, `key_tail copy ${copy}`, version));
  if (keyTail.value === undefined) throw new PcacheError('CORRUPT', `no valid key_tail: ${keyTail.problems.join('; ')}`);
  const dirtyTail = await readPair<CachePos>(layout.dirtyTailOffsetsBytes, cachePosRecordBytesMax, (r, copy) => decodeCachePos(r, limits, `dirty_tail copy ${copy}`, version));
  if (dirtyTail.value === undefined) throw new PcacheError('CORRUPT', `no valid dirty_tail: ${dirtyTail.problems.join('; ')}`);

  // One read per segment covers both seg_info copies and both generation copies.
  const head = new Uint8Array(segmentDataOffsetBytes);
  const segmentInfos: DualCopyChoice<SegmentInfo>[] = [];
  const gens: DualCopyChoice<number>[] = [];
  for (let segment = 0; segment < sb.segmentCount; segment++) {
    await device.read(head, segmentOffsetBytes(segment, sb.segmentSizeBytes));
    const infos = segmentInfoOffsetsBytes.map((at, copy) => decodeSegmentInfo(head.subarray(at), sb.segmentCount, `segment ${segment} seg_info copy ${copy}`, version));
    segmentInfos.push(chooseLatest([infos[0] ?? missing(), infos[1] ?? missing()]));
    const genCopies = layout.segmentGenOffsetsBytes.map((at, copy) => decodeSegmentGen(head.subarray(at), `segment ${segment} gen copy ${copy}`, version));
    gens.push(chooseLatest([genCopies[0] ?? missing(), genCopies[1] ?? missing()]));
  }
  return {
    sb,
    superblockDamage,
    superblockBadCopies,
    cacheInfo: { ...cacheInfo, value: cacheInfo.value },
    keyTail: { ...keyTail, value: keyTail.value },
    dirtyTail: { ...dirtyTail, value: dirtyTail.value },
    segmentInfos,
    gens,
  };
}

function missing(): { ok: false; problem: string } {
  return { ok: false, problem: 'missing copy' };
}

/**
 * The pcache records a device holds, whatever their state: a superblock magic at either
 * place, or a copy of cache_info, key_tail or dirty_tail, or segment 0's seg_info, whose CRC
 * passes, in either format version. Used when no superblock can be read: a device with any of
 * these was a pcache cache and may still hold dirty data, so it is never taken for foreign.
 */
export async function pcacheRecordsFound(device: BlockDevice): Promise<string[]> {
  const found: string[] = [];
  const recordBytesMax = Math.max(cacheInfoRecordBytesMax, cachePosRecordBytesMax, segmentInfoRecordBytes);
  const read = async (at: number, bytes: number): Promise<Uint8Array | undefined> => {
    if (at + bytes > device.sizeBytes) return undefined;
    const record = new Uint8Array(bytes);
    await device.read(record, at);
    return record;
  };
  for (const [copy, at] of [superblockOffsetBytes, lastBlockOffsetBytes(device.sizeBytes)].entries()) {
    const record = await read(at, superblockRecordBytes);
    if (record !== undefined && hasSuperblockMagic(record)) found.push(`superblock copy ${copy}`);
  }
  /** Where each record may be, and its length by version (the CRC covers bytes 4 .. its end). */
  const places: { name: string; at: number; bytes: (version: FormatVersion) => number }[] = [
    ...cacheInfoOffsetsBytes.map((at, copy) => ({ name: `cache_info copy ${copy}`, at, bytes: cacheInfoRecordBytes })),
    ...formatVersionsSupported.flatMap((version) => {
      const layout = layoutFor(version);
      return [
        ...layout.keyTailOffsetsBytes.map((at, copy) => ({ name: `key_tail copy ${copy}`, at, bytes: cachePosRecordBytes })),
        ...layout.dirtyTailOffsetsBytes.map((at, copy) => ({ name: `dirty_tail copy ${copy}`, at, bytes: cachePosRecordBytes })),
      ];
    }),
    ...segmentInfoOffsetsBytes.map((at, copy) => ({ name: `segment 0 seg_info copy ${copy}`, at: at + segmentOffsetBytes(0, 0), bytes: () => segmentInfoRecordBytes })),
  ];
  for (const place of places) {
    const record = await read(place.at, recordBytesMax);
    if (record === undefined || found.includes(place.name)) continue;
    const version = formatVersionsSupported.find((known) => known === metaRecordVersion(record));
    if (version !== undefined && recordCrcPasses(record, place.bytes(version))) found.push(place.name);
  }
  return found;
}

function recordCrcPasses(record: Uint8Array, lengthBytes: number): boolean {
  return record.length >= lengthBytes && !isAllZero(record.subarray(0, lengthBytes)) && readU32LE(record, 0) === crc32c(record.subarray(4, lengthBytes));
}

/**
 * Writes a changed superblock (the backing device's size) into every copy: the second copy
 * (version 2) first, synced, then the first, synced. Readers take the first valid copy, so a
 * crash in between leaves either the old or the new superblock readable, never neither.
 */
export async function rewriteSuperblock(device: BlockDevice, sb: Superblock): Promise<void> {
  const area = new Uint8Array(blockBytes);
  area.set(encodeSuperblock(sb));
  if (layoutFor(sb.formatVersion).superblockCopyAtEnd) {
    await device.write(area, lastBlockOffsetBytes(device.sizeBytes));
    await device.sync();
  }
  await device.write(area, superblockOffsetBytes);
  await device.sync();
}

/** Checks the segment chain 0 -> 1 -> ... -> n-1; returns the problems found. */
export function segmentChainProblems(metadata: CacheMetadata): string[] {
  const problems: string[] = [];
  metadata.segmentInfos.forEach((choice, segment) => {
    const expected = segment + 1 < metadata.sb.segmentCount ? segment + 1 : undefined;
    if (choice.value === undefined) problems.push(`segment ${segment}: no valid seg_info (${choice.problems.join('; ')})`);
    else if (choice.value.next !== expected) problems.push(`segment ${segment}: chain points at ${String(choice.value.next)}, expected ${String(expected)}`);
  });
  return problems;
}

/**
 * Formats `device` as a fresh cache for `backing`. Overwrites whatever the device held: the
 * caller decides whether that is allowed. Order: clear the old superblocks, sync; every
 * segment's metadata, the first copies of the tails and both copies of cache_info, sync; the
 * superblock copies, sync; last (version 2) the tails' second copies in the device's first
 * block, sync. A format cut short before the superblock leaves a device that probes as blank
 * (its first 8 KiB still zero); one cut short after it leaves a valid cache whose tails have one
 * copy each, as a crash during any tail update would.
 */
export async function formatCacheDevice(device: BlockDevice, backing: BlockDevice, options: FormatOptions = {}): Promise<Superblock> {
  const version = options.formatVersion ?? formatVersionLatest;
  const layout = layoutFor(version);
  const segmentSizeBytes = options.segmentSizeBytes ?? segmentSizeDefaultFor(device.sizeBytes);
  const sizeProblem = segmentSizeProblem(segmentSizeBytes);
  if (sizeProblem !== undefined) throw new PcacheError('EINVAL', sizeProblem);
  const gcPercent = options.gcPercent ?? gcPercentDefault;
  if (!Number.isInteger(gcPercent) || gcPercent < 0 || gcPercent > gcPercentMax) throw new PcacheError('EINVAL', `gc_percent must be 0..${gcPercentMax}, got ${gcPercent}`);
  const segmentCount = Math.min(segmentCountFor(device.sizeBytes, segmentSizeBytes, layout), segmentCountMax);
  if (segmentCount < segmentCountMin) {
    const neededBytes = segmentsOffsetBytes + segmentCountMin * segmentSizeBytes + (layout.superblockCopyAtEnd ? blockBytes : 0);
    const withSmallest = segmentCountFor(device.sizeBytes, segmentSizeMinBytes, layout);
    const smaller = segmentSizeBytes > segmentSizeMinBytes && withSmallest >= segmentCountMin ? `, or smaller segments (--segment-size 1M gives ${withSmallest})` : '';
    throw new PcacheError('EINVAL', `a cache device of ${device.sizeBytes} bytes holds ${segmentCount} segments of ${segmentSizeBytes} bytes; at least ${segmentCountMin} are needed: ` +
      `use a cache device of at least ${neededBytes} bytes${smaller}`);
  }
  if (backing.sizeBytes % 512 !== 0 || backing.sizeBytes === 0) throw new PcacheError('EINVAL', `the backing device size ${backing.sizeBytes} is not a positive multiple of 512`);
  const sb: Superblock = {
    formatVersion: version,
    segmentSizeBytes,
    segmentCount,
    cacheUuid: options.cacheUuid ?? Buffer.from(randomUUID().replaceAll('-', ''), 'hex'),
    backingSizeBytes: backing.sizeBytes,
    backingIdentity: backing.identity ?? '',
    formatTimeMs: options.formatTimeMs ?? Date.now(),
  };
  const encodedSb = encodeSuperblock(sb);
  // Clear previous superblocks first, so a crash in the middle never leaves one describing new contents.
  const sbPlaces = [superblockOffsetBytes, ...(device.sizeBytes >= 2 * blankProbeBytes ? [lastBlockOffsetBytes(device.sizeBytes)] : [])];
  for (const at of sbPlaces) await device.write(new Uint8Array(superblockRecordBytes), at);
  await device.sync();

  const head = new Uint8Array(segmentDataOffsetBytes);
  const headerBytes = ksetHeaderBytesFor(layout.extendedKsets);
  for (let segment = 0; segment < segmentCount; segment++) {
    head.fill(0);
    const info = encodeSegmentInfo({ next: segment + 1 < segmentCount ? segment + 1 : undefined }, 1, version);
    // Segment 0 starts the log: it has been handed out once, so its generation is 1.
    const gen = encodeSegmentGen(segment === 0 ? 1 : 0, 1, version);
    head.set(info, segmentInfoOffsetsBytes[0]);
    head.set(gen, layout.segmentGenOffsetsBytes[0]);
    if (version !== 1) {
      head.set(info, segmentInfoOffsetsBytes[1]);
      head.set(gen, layout.segmentGenOffsetsBytes[1]);
    }
    await device.write(head, segmentOffsetBytes(segment, segmentSizeBytes));
    await device.write(new Uint8Array(headerBytes), segmentOffsetBytes(segment, segmentSizeBytes) + segmentDataOffsetBytes);
  }
  // The log starts at segment 0, offset 0, with kset seq 1.
  const start: CachePos = { segment: 0, offsetBytes: 0, seq: 1, durableSeq: 0 };
  const startRecord = encodeCachePos(start, 1, version);
  const writeAtCopy = async (copy: 0 | 1): Promise<void> => {
    const blockStart = Math.floor(layout.keyTailOffsetsBytes[copy] / blockBytes) * blockBytes;
    const block = new Uint8Array(blockBytes);
    block.set(startRecord, layout.keyTailOffsetsBytes[copy] - blockStart);
    block.set(startRecord, layout.dirtyTailOffsetsBytes[copy] - blockStart);
    await device.write(block, blockStart);
  };
  await writeAtCopy(0);
  const info: CacheInfo = { dataCrc: options.dataCrc ?? false, initDone: true, gcPercent, segmentCount, firstSegment: 0, backingState: 'unknown', backingFingerprint: noFingerprint, mode: 'writeback' };
  const infos = new Uint8Array(2 * blockBytes);
  const encodedInfo = encodeCacheInfo(info, 1, version);
  infos.set(encodedInfo, 0);
  if (version !== 1) infos.set(encodedInfo, cacheInfoOffsetsBytes[1] - cacheInfoOffsetsBytes[0]);
  await device.write(infos, cacheInfoOffsetsBytes[0]);
  await device.sync();
  const sbArea = new Uint8Array(blockBytes);
  sbArea.set(encodedSb);
  if (layout.superblockCopyAtEnd) await device.write(sbArea, lastBlockOffsetBytes(device.sizeBytes));
  await device.write(sbArea, superblockOffsetBytes);
  await device.sync();
  if (version !== 1) {
    await writeAtCopy(1);
    await device.sync();
  }
  return sb;
}
