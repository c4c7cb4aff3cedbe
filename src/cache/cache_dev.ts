// The cache device: its geometry, the I/O helpers the engine uses on it, every metadata
// write, format, and reading the metadata back.
//
// I/O helpers return undefined when the device completed the request synchronously (it
// offers blocking I/O) and a promise otherwise, so the request path pays for a promise only
// when the device is really asynchronous. Metadata writes go to the older copy of each
// dual-copy record (DualCopyWriter); nothing here syncs except where a comment says so —
// the callers own the ordering between writes and syncs, because that ordering is the crash
// contract (docs/design.md, "Barriers").

import { randomUUID } from 'node:crypto';
import { assert } from '../lib/assert.js';
import { PcacheError } from '../lib/errors.js';
import { isAllZero } from '../lib/units.js';
import type { BlockDevice } from '../device/block_device.js';
import { encodeCacheInfo, decodeCacheInfo, type CacheInfo } from '../ondisk/cache_info.js';
import { decodeCachePos, encodeCachePos, type CachePos } from '../ondisk/cache_pos.js';
import { ksetCrcSeed, ksetHeaderBytes } from '../ondisk/kset.js';
import {
  blankProbeBytes, cacheInfoOffsetsBytes, dirtyTailOffsetsBytes, gcPercentDefault, gcPercentMax, keyTailOffsetsBytes,
  segmentCountFor, segmentCountMax, segmentCountMin, segmentDataOffsetBytes, segmentDataSizeBytes, segmentGenOffsetsBytes,
  segmentInfoOffsetsBytes, segmentOffsetBytes, segmentSizeDefaultBytes, segmentSizeProblem, superblockOffsetBytes,
} from '../ondisk/layout.js';
import { chooseLatest, DualCopyWriter, type Decoded, type DualCopyChoice } from '../ondisk/meta_header.js';
import { decodeSegmentGen, encodeSegmentGen } from '../ondisk/segment_gen.js';
import { decodeSegmentInfo, encodeSegmentInfo, type SegmentInfo } from '../ondisk/segment_info.js';
import { decodeSuperblock, encodeSuperblock, hasSuperblockMagic, superblockRecordBytes, type Superblock } from '../ondisk/superblock.js';
import type { Io } from './cache_types.js';

export interface FormatOptions {
  /** Bytes per segment; default 16 MiB, smallest 1 MiB. */
  segmentSizeBytes?: number;
  /** Protect every data extent with a CRC32C (fixed at format). Default false. */
  dataCrc?: boolean;
  /** GC threshold in percent of segments in use, 0..90. Default 70. */
  gcPercent?: number;
  /** The cache's uuid (tests pass one for reproducible images); default random. */
  cacheUuid?: Uint8Array;
  /** Format time to record (tests); default now. */
  formatTimeMs?: number;
}

export class CacheDev {
  readonly device: BlockDevice;
  readonly sb: Superblock;
  readonly segmentCount: number;
  readonly segmentSizeBytes: number;
  readonly dataSizeBytes: number;
  readonly crcSeed: number;
  private readonly cacheInfoWriter: DualCopyWriter;
  private readonly keyTailWriter: DualCopyWriter;
  private readonly dirtyTailWriter: DualCopyWriter;
  /** Per segment: which generation copy is newest (0, 1, or 2 for neither) and its seq. */
  private readonly genLatestIndex: Uint8Array;
  private readonly genLatestSeq: Uint8Array;

  constructor(device: BlockDevice, metadata: CacheMetadata) {
    this.device = device;
    this.sb = metadata.sb;
    this.segmentCount = metadata.sb.segmentCount;
    this.segmentSizeBytes = metadata.sb.segmentSizeBytes;
    this.dataSizeBytes = segmentDataSizeBytes(this.segmentSizeBytes);
    this.crcSeed = ksetCrcSeed(metadata.sb.cacheUuid);
    this.cacheInfoWriter = new DualCopyWriter(metadata.cacheInfo);
    this.keyTailWriter = new DualCopyWriter(metadata.keyTail);
    this.dirtyTailWriter = new DualCopyWriter(metadata.dirtyTail);
    this.genLatestIndex = new Uint8Array(this.segmentCount).fill(2);
    this.genLatestSeq = new Uint8Array(this.segmentCount);
    metadata.gens.forEach((choice, segment) => {
      this.genLatestIndex[segment] = choice.latestIndex ?? 2;
      this.genLatestSeq[segment] = choice.latestSeq;
    });
  }

  /** Absolute device offset of byte `offsetBytes` of segment `segment`'s data area. */
  dataOffset(segment: number, offsetBytes: number): number {
    assert(segment >= 0 && segment < this.segmentCount, 'segment out of range', segment);
    assert(offsetBytes >= 0 && offsetBytes <= this.dataSizeBytes, 'data offset out of range', offsetBytes);
    return segmentOffsetBytes(segment, this.segmentSizeBytes) + segmentDataOffsetBytes + offsetBytes;
  }

  readData(target: Uint8Array, segment: number, offsetBytes: number): Io {
    assert(offsetBytes + target.length <= this.dataSizeBytes, 'read runs past the segment');
    return this.read(target, this.dataOffset(segment, offsetBytes));
  }

  writeData(source: Uint8Array, segment: number, offsetBytes: number): Io {
    assert(offsetBytes + source.length <= this.dataSizeBytes, 'write runs past the segment');
    return this.write(source, this.dataOffset(segment, offsetBytes));
  }

  /** Writes `sources` back to back into a segment's data area, in one call where the device allows. */
  writeDataRun(sources: readonly Uint8Array[], segment: number, offsetBytes: number): Io {
    let total = 0;
    for (const source of sources) total += source.length;
    assert(offsetBytes + total <= this.dataSizeBytes, 'write runs past the segment');
    const start = this.dataOffset(segment, offsetBytes);
    const blocking = this.device.blocking;
    if (blocking?.writevSync !== undefined && sources.length > 1) {
      blocking.writevSync(sources, start);
      return undefined;
    }
    let at = start;
    const pending: Promise<void>[] = [];
    for (const source of sources) {
      const io = this.write(source, at);
      if (io !== undefined) pending.push(io);
      at += source.length;
    }
    return pending.length === 0 ? undefined : Promise.all(pending).then(() => undefined);
  }

  read(target: Uint8Array, offsetBytes: number): Io {
    const blocking = this.device.blocking;
    if (blocking === undefined) return this.device.read(target, offsetBytes);
    blocking.readSync(target, offsetBytes);
    return undefined;
  }

  write(source: Uint8Array, offsetBytes: number): Io {
    const blocking = this.device.blocking;
    if (blocking === undefined) return this.device.write(source, offsetBytes);
    blocking.writeSync(source, offsetBytes);
    return undefined;
  }

  sync(): Promise<void> {
    return this.device.sync();
  }

  /**
   * Writes segment `segment`'s generation into its older copy (no sync). Completes
   * synchronously (returns undefined) on a blocking device.
   */
  writeGen(segment: number, gen: number): Io {
    const latest = this.genLatestIndex[segment] ?? 2;
    const index = latest === 0 ? 1 : 0;
    const seq = ((this.genLatestSeq[segment] ?? 0) + 1) & 0xff;
    const offset = segmentOffsetBytes(segment, this.segmentSizeBytes) + segmentGenOffsetsBytes[index];
    const written = (): void => {
      this.genLatestIndex[segment] = index;
      this.genLatestSeq[segment] = seq;
    };
    const io = this.write(encodeSegmentGen(gen, seq), offset);
    if (io === undefined) {
      written();
      return undefined;
    }
    return io.then(written);
  }

  async writeKeyTail(pos: CachePos): Promise<void> {
    await writeDualCopy(this, this.keyTailWriter, keyTailOffsetsBytes, (seq) => encodeCachePos(pos, seq));
  }

  async writeDirtyTail(pos: CachePos): Promise<void> {
    await writeDualCopy(this, this.dirtyTailWriter, dirtyTailOffsetsBytes, (seq) => encodeCachePos(pos, seq));
  }

  async writeCacheInfo(info: CacheInfo): Promise<void> {
    await writeDualCopy(this, this.cacheInfoWriter, cacheInfoOffsetsBytes, (seq) => encodeCacheInfo(info, seq));
  }
}

async function writeDualCopy(dev: CacheDev, writer: DualCopyWriter, offsets: readonly [number, number], encode: (seq: number) => Uint8Array): Promise<void> {
  const slot = writer.target();
  await dev.write(encode(slot.seq), offsets[slot.index]);
  writer.written(slot);
}

/** Everything read from the metadata areas of a cache device, validated. */
export interface CacheMetadata {
  readonly sb: Superblock;
  readonly cacheInfo: DualCopyChoice<CacheInfo> & { value: CacheInfo };
  readonly keyTail: DualCopyChoice<CachePos> & { value: CachePos };
  readonly dirtyTail: DualCopyChoice<CachePos> & { value: CachePos };
  readonly segmentInfos: DualCopyChoice<SegmentInfo>[];
  readonly gens: DualCopyChoice<number>[];
}

export type DeviceContents = 'blank' | 'pcache' | 'other';

/** What a device holds: blank (first 8 KiB zero), a pcache superblock, or something else. */
export async function probeDevice(device: BlockDevice): Promise<DeviceContents> {
  if (device.sizeBytes < blankProbeBytes) return 'other';
  const head = new Uint8Array(blankProbeBytes);
  await device.read(head, 0);
  if (isAllZero(head)) return 'blank';
  return hasSuperblockMagic(head.subarray(superblockOffsetBytes)) ? 'pcache' : 'other';
}

/**
 * Reads and validates every metadata record. Errors: FOREIGN when the device is not a pcache
 * cache, CORRUPT when a record the cache cannot do without has no valid copy.
 */
export async function readCacheMetadata(device: BlockDevice): Promise<CacheMetadata> {
  const sbBytes = new Uint8Array(superblockRecordBytes);
  await device.read(sbBytes, superblockOffsetBytes);
  if (!hasSuperblockMagic(sbBytes)) throw new PcacheError('FOREIGN', 'the cache device holds no pcache superblock', { reason: 'not-pcache' });
  const decodedSb = decodeSuperblock(sbBytes, device.sizeBytes);
  if (!decodedSb.ok) throw new PcacheError('CORRUPT', decodedSb.problem);
  const sb = decodedSb.value;
  const limits = { segmentCount: sb.segmentCount, dataSizeBytes: segmentDataSizeBytes(sb.segmentSizeBytes) };

  const readPair = async <T>(offsets: readonly [number, number], bytes: number, decode: (record: Uint8Array, copy: number) => Decoded<T>): Promise<DualCopyChoice<T>> => {
    const first = new Uint8Array(bytes);
    const second = new Uint8Array(bytes);
    await device.read(first, offsets[0]);
    await device.read(second, offsets[1]);
    return chooseLatest([decode(first, 0), decode(second, 1)]);
  };

  const cacheInfo = await readPair<CacheInfo>(cacheInfoOffsetsBytes, 64, (r, copy) => decodeCacheInfo(r, sb.segmentCount, `cache_info copy ${copy}`));
  if (cacheInfo.value === undefined) throw new PcacheError('CORRUPT', `no valid cache_info: ${cacheInfo.problems.join('; ')}`);
  const keyTail = await readPair<CachePos>(keyTailOffsetsBytes, 16, (r, copy) => decodeCachePos(r, limits, `key_tail copy ${copy}`));
  if (keyTail.value === undefined) throw new PcacheError('CORRUPT', `no valid key_tail: ${keyTail.problems.join('; ')}`);
  const dirtyTail = await readPair<CachePos>(dirtyTailOffsetsBytes, 16, (r, copy) => decodeCachePos(r, limits, `dirty_tail copy ${copy}`));
  if (dirtyTail.value === undefined) throw new PcacheError('CORRUPT', `no valid dirty_tail: ${dirtyTail.problems.join('; ')}`);

  // One read per segment covers both seg_info copies and both generation copies.
  const head = new Uint8Array(segmentDataOffsetBytes);
  const segmentInfos: DualCopyChoice<SegmentInfo>[] = [];
  const gens: DualCopyChoice<number>[] = [];
  for (let segment = 0; segment < sb.segmentCount; segment++) {
    await device.read(head, segmentOffsetBytes(segment, sb.segmentSizeBytes));
    const copies = segmentInfoOffsetsBytes.map((at, copy) => decodeSegmentInfo(head.subarray(at), sb.segmentCount, `segment ${segment} seg_info copy ${copy}`));
    segmentInfos.push(chooseLatest([copies[0] ?? failed(), copies[1] ?? failed()]));
    const genCopies = segmentGenOffsetsBytes.map((at, copy) => decodeSegmentGen(head.subarray(at), `segment ${segment} gen copy ${copy}`));
    gens.push(chooseLatest([genCopies[0] ?? failed(), genCopies[1] ?? failed()]));
  }
  return {
    sb,
    cacheInfo: { ...cacheInfo, value: cacheInfo.value },
    keyTail: { ...keyTail, value: keyTail.value },
    dirtyTail: { ...dirtyTail, value: dirtyTail.value },
    segmentInfos,
    gens,
  };
}

function failed(): { ok: false; problem: string } {
  return { ok: false, problem: 'missing copy' };
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
 * caller decides whether that is allowed. Order: every segment's metadata, the tails and
 * cache_info, a sync, then the superblock and a final sync — a format cut short leaves no
 * superblock, so the device still probes as blank.
 */
export async function formatCacheDevice(device: BlockDevice, backing: BlockDevice, options: FormatOptions = {}): Promise<Superblock> {
  const segmentSizeBytes = options.segmentSizeBytes ?? segmentSizeDefaultBytes;
  const sizeProblem = segmentSizeProblem(segmentSizeBytes);
  if (sizeProblem !== undefined) throw new PcacheError('EINVAL', sizeProblem);
  const gcPercent = options.gcPercent ?? gcPercentDefault;
  if (!Number.isInteger(gcPercent) || gcPercent < 0 || gcPercent > gcPercentMax) throw new PcacheError('EINVAL', `gc_percent must be 0..${gcPercentMax}, got ${gcPercent}`);
  const segmentCount = Math.min(segmentCountFor(device.sizeBytes, segmentSizeBytes), segmentCountMax);
  if (segmentCount < segmentCountMin) {
    throw new PcacheError('EINVAL', `a cache device of ${device.sizeBytes} bytes holds ${segmentCount} segments of ${segmentSizeBytes} bytes; at least ${segmentCountMin} are needed`);
  }
  if (backing.sizeBytes % 512 !== 0 || backing.sizeBytes === 0) throw new PcacheError('EINVAL', `the backing device size ${backing.sizeBytes} is not a positive multiple of 512`);
  const sb: Superblock = {
    segmentSizeBytes,
    segmentCount,
    cacheUuid: options.cacheUuid ?? Buffer.from(randomUUID().replaceAll('-', ''), 'hex'),
    backingSizeBytes: backing.sizeBytes,
    backingIdentity: backing.identity ?? '',
    formatTimeMs: options.formatTimeMs ?? Date.now(),
  };
  const encodedSb = encodeSuperblock(sb);
  // Clear a previous superblock first, so a crash in the middle never leaves it describing new contents.
  await device.write(new Uint8Array(superblockRecordBytes), superblockOffsetBytes);
  await device.sync();

  const head = new Uint8Array(segmentDataOffsetBytes);
  for (let segment = 0; segment < segmentCount; segment++) {
    head.fill(0);
    const info = encodeSegmentInfo({ next: segment + 1 < segmentCount ? segment + 1 : undefined }, 1);
    head.set(info, segmentInfoOffsetsBytes[0]);
    // Segment 0 starts the log: it has been handed out once, so its generation is 1.
    head.set(encodeSegmentGen(segment === 0 ? 1 : 0, 1), segmentGenOffsetsBytes[0]);
    await device.write(head, segmentOffsetBytes(segment, segmentSizeBytes));
    await device.write(new Uint8Array(ksetHeaderBytes), segmentOffsetBytes(segment, segmentSizeBytes) + segmentDataOffsetBytes);
  }
  const ctrl = new Uint8Array(4096);
  const start: CachePos = { segment: 0, offsetBytes: 0 };
  ctrl.set(encodeCachePos(start, 1), keyTailOffsetsBytes[0] - keyTailOffsetsBytes[0]);
  ctrl.set(encodeCachePos(start, 1), dirtyTailOffsetsBytes[0] - keyTailOffsetsBytes[0]);
  await device.write(ctrl, keyTailOffsetsBytes[0]);
  const info: CacheInfo = { dataCrc: options.dataCrc ?? false, initDone: true, gcPercent, segmentCount, firstSegment: 0 };
  const infos = new Uint8Array(8192);
  infos.set(encodeCacheInfo(info, 1), 0);
  await device.write(infos, cacheInfoOffsetsBytes[0]);
  await device.sync();
  const sbArea = new Uint8Array(4096);
  sbArea.set(encodedSb);
  await device.write(sbArea, superblockOffsetBytes);
  await device.sync();
  return sb;
}
