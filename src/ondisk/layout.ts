// Where everything lives on the cache device, and the limits that the format allows.
//
// Format version 2 (what `format` writes):
//   byte offset            size           content
//   0                      4 KiB          key_tail copy 1 at +0, dirty_tail copy 1 at +512
//                                         (written last at format: a device whose format was
//                                         cut short is still zero in its first 8 KiB, blank)
//   4 KiB                  4 KiB          superblock copy 0
//   8 KiB, 12 KiB          4 KiB each     cache_info copy 0 and copy 1
//   16 KiB                 4 KiB          key_tail copy 0 at +0, dirty_tail copy 0 at +1024
//   20 KiB + i * segSize   segSize        segment i (i = 0 .. segmentCount-1)
//   last 4 KiB of device   4 KiB          superblock copy 1 (the last whole 4 KiB block at format)
// Inside each segment:
//   +0                     4 KiB          seg_info copy 0
//   +4 KiB                 4 KiB          seg_info copy 1 at +0, generation copy 1 at +512
//   +8 KiB                 4 KiB          generation copy 0
//   +12 KiB                segSize-12 KiB data area: cached data extents, or the kset log
//
// The two copies of every record live in different 4 KiB blocks: devices fail and write in 4 KiB
// units, so two copies in one block are one copy. Every copy sits in a 512-byte sector of its
// own, so a torn sector damages at most one copy.
//
// Format version 1 (still opened and served, never written by format) had the same segments
// and data areas but kept both copies of key_tail, of dirty_tail and of each generation in one
// 4 KiB block (key_tail at 16 KiB + 0 and + 512, dirty_tail at + 1024 and + 1536, generations
// at +8 KiB and +8 KiB + 512 in the segment), and one superblock copy. All integers are
// little-endian.

import { assert } from '../lib/assert.js';
import { GiB, KiB, MiB, sectorSizeBytes } from '../lib/units.js';

/** The format versions this code opens; `format` writes the latest. */
export type FormatVersion = 1 | 2;
export const formatVersionLatest: FormatVersion = 2;
export const formatVersionsSupported: readonly FormatVersion[] = [1, 2];

/** The unit in which devices fail and write: two copies of a record never share one. */
export const blockBytes = 4 * KiB;

export const superblockOffsetBytes = 4 * KiB;
export const cacheInfoOffsetsBytes = [8 * KiB, 12 * KiB] as const;
export const segmentsOffsetBytes = 20 * KiB;
/** The first bytes of a blank device; they are zero unless a format got as far as the superblock. */
export const blankProbeBytes = 8 * KiB;

export const segmentInfoOffsetsBytes = [0, 4 * KiB] as const;
export const segmentDataOffsetBytes = 12 * KiB;

/** Where the copies of the records that moved between versions live. */
export interface Layout {
  readonly version: FormatVersion;
  readonly keyTailOffsetsBytes: readonly [number, number];
  readonly dirtyTailOffsetsBytes: readonly [number, number];
  /** Offsets of the generation copies inside a segment. */
  readonly segmentGenOffsetsBytes: readonly [number, number];
  /** Whether the superblock has a second copy in the device's last 4 KiB block. */
  readonly superblockCopyAtEnd: boolean;
  /** Whether ksets carry the extended header (their seq and the durable seq; kset.ts). */
  readonly extendedKsets: boolean;
}

const layoutV1: Layout = {
  version: 1,
  keyTailOffsetsBytes: [16 * KiB, 16 * KiB + 512],
  dirtyTailOffsetsBytes: [16 * KiB + 1024, 16 * KiB + 1536],
  segmentGenOffsetsBytes: [8 * KiB, 8 * KiB + 512],
  superblockCopyAtEnd: false,
  extendedKsets: false,
};

const layoutV2: Layout = {
  version: 2,
  keyTailOffsetsBytes: [16 * KiB, 0],
  dirtyTailOffsetsBytes: [16 * KiB + 1024, 512],
  segmentGenOffsetsBytes: [8 * KiB, 4 * KiB + 512],
  superblockCopyAtEnd: true,
  extendedKsets: true,
};

export function layoutFor(version: FormatVersion): Layout {
  return version === 1 ? layoutV1 : layoutV2;
}

/** Where the superblock's copies are on a device of `deviceSizeBytes` (the second, when there is one, in its last whole 4 KiB block). */
export function superblockOffsetsBytes(layout: Layout, deviceSizeBytes: number): number[] {
  return layout.superblockCopyAtEnd ? [superblockOffsetBytes, lastBlockOffsetBytes(deviceSizeBytes)] : [superblockOffsetBytes];
}

/** The offset of the last whole 4 KiB block of a device. */
export function lastBlockOffsetBytes(deviceSizeBytes: number): number {
  return Math.floor(deviceSizeBytes / blockBytes) * blockBytes - blockBytes;
}

/** The default segment size of caches of 4 GiB and more (dm-pcache's fixed size); smaller caches get smaller ones. */
export const segmentSizeDefaultBytes = 16 * MiB;
/**
 * Format's default segment size aims at this many segments: a read cache holds data in all but
 * a few of its segments (one held back for the log, the log's own, a 64th of the cache kept
 * free for fills, the data head's unfilled part) and GC frees whole ones, so with 16 MiB
 * segments a 256 MiB cache held about 13/16 of what its size promises, with 4 MiB ones 92%,
 * with 1 MiB ones 96% (docs/performance.md, the policy benchmark). Each segment's 12 KiB of
 * metadata is 1.2% of a 1 MiB one, paid back several times over by that.
 */
export const segmentCountTarget = 256;
export const segmentSizeMinBytes = 1 * MiB;
export const segmentSizeMaxBytes = 1 * GiB;
/** Segment sizes are whole multiples of this, so data areas stay sector- and page-aligned. */
export const segmentSizeAlignBytes = 1 * MiB;
/**
 * At least one log segment, one segment held back for the log, and two for data; fewer and
 * the cache cannot keep writing while garbage collection runs.
 */
export const segmentCountMin = 4;
export const segmentCountMax = 1 << 20;

/** Keys never cross a subtree boundary: 4 MiB of the backing device's address space. */
export const subtreeSizeBytes = 4 * MiB;
/**
 * With DATA_CRC, pcache writes keys of at most this length. A read hit verifies the CRC of its
 * key's whole extent, so this bounds the bytes a small read reads and checksums (8x for a
 * 4 KiB read) at a log cost of 40 bytes per 32 KiB. A writer policy, not a format limit.
 */
export const dataCrcKeyMaxBytes = 32 * KiB;
/** Data extents and keys are whole sectors. */
export const extentAlignBytes = sectorSizeBytes;

export const gcPercentDefault = 70;
export const gcPercentMax = 90;

export const backingIdentityMaxBytes = 128;

export function segmentOffsetBytes(segment: number, segmentSizeBytes: number): number {
  return segmentsOffsetBytes + segment * segmentSizeBytes;
}

export function segmentDataSizeBytes(segmentSizeBytes: number): number {
  return segmentSizeBytes - segmentDataOffsetBytes;
}

/** Bytes a layout keeps at the device's end, after the segments. */
export function endReserveBytes(layout: Layout, deviceSizeBytes: number): number {
  return layout.superblockCopyAtEnd ? deviceSizeBytes - lastBlockOffsetBytes(deviceSizeBytes) : 0;
}

/** The smallest cache device that holds `segments` segments (tests and benchmarks size their devices with it). */
export function cacheDeviceBytesFor(segments: number, segmentSizeBytes: number, version: FormatVersion = formatVersionLatest): number {
  return segmentsOffsetBytes + segments * segmentSizeBytes + (layoutFor(version).superblockCopyAtEnd ? blockBytes : 0);
}

/** How many segments of `segmentSizeBytes` fit on a cache device of `deviceSizeBytes`. */
export function segmentCountFor(deviceSizeBytes: number, segmentSizeBytes: number, layout: Layout): number {
  const usableBytes = deviceSizeBytes - endReserveBytes(layout, deviceSizeBytes) - segmentsOffsetBytes;
  return Math.max(0, Math.floor(usableBytes / segmentSizeBytes));
}

/**
 * The segment size format picks for a device of `deviceSizeBytes` when none is given: the
 * device's size over segmentCountTarget, rounded down to a power of two, from 1 MiB to
 * segmentSizeDefaultBytes (1 MiB up to 511 MiB, 4 MiB for 1 GiB, 16 MiB from 4 GiB on). Recorded in the superblock.
 */
export function segmentSizeDefaultFor(deviceSizeBytes: number): number {
  let segmentSizeBytes = segmentSizeDefaultBytes;
  while (segmentSizeBytes > segmentSizeMinBytes && segmentSizeBytes * segmentCountTarget > deviceSizeBytes) segmentSizeBytes /= 2;
  return segmentSizeBytes;
}

/** Returns why a segment size is unacceptable, or undefined. */
export function segmentSizeProblem(segmentSizeBytes: number): string | undefined {
  if (!Number.isSafeInteger(segmentSizeBytes)) return `segment size ${segmentSizeBytes} is not an integer`;
  if (segmentSizeBytes < segmentSizeMinBytes) return `segment size ${segmentSizeBytes} is below the minimum of 1 MiB`;
  if (segmentSizeBytes > segmentSizeMaxBytes) return `segment size ${segmentSizeBytes} is above the maximum of 1 GiB`;
  if (segmentSizeBytes % segmentSizeAlignBytes !== 0) return `segment size ${segmentSizeBytes} is not a multiple of 1 MiB`;
  return undefined;
}

// Relationships the rest of the code relies on, checked once when the module loads.
assert(segmentSizeMinBytes > segmentDataOffsetBytes, 'a segment must have room for data after its metadata');
assert(segmentDataOffsetBytes % (4 * KiB) === 0, 'data areas start page-aligned');
assert(segmentSizeAlignBytes % sectorSizeBytes === 0, 'data areas are whole sectors');
for (const layout of [layoutV1, layoutV2]) {
  for (const at of layout.segmentGenOffsetsBytes) assert(at + sectorSizeBytes <= segmentDataOffsetBytes, 'generation copies precede the data area');
  for (const at of [...layout.keyTailOffsetsBytes, ...layout.dirtyTailOffsetsBytes]) assert(at + sectorSizeBytes <= segmentsOffsetBytes, 'cache_ctrl fits before the segments');
}
const blockOf = (at: number): number => Math.floor(at / blockBytes);
assert(blockOf(layoutV2.keyTailOffsetsBytes[0]) !== blockOf(layoutV2.keyTailOffsetsBytes[1]), 'key_tail copies share a block');
assert(blockOf(layoutV2.dirtyTailOffsetsBytes[0]) !== blockOf(layoutV2.dirtyTailOffsetsBytes[1]), 'dirty_tail copies share a block');
assert(blockOf(layoutV2.segmentGenOffsetsBytes[0]) !== blockOf(layoutV2.segmentGenOffsetsBytes[1]), 'generation copies share a block');
assert(blockOf(cacheInfoOffsetsBytes[0]) !== blockOf(cacheInfoOffsetsBytes[1]), 'cache_info copies share a block');
assert(blockOf(segmentInfoOffsetsBytes[1]) === blockOf(layoutV2.segmentGenOffsetsBytes[1]), 'generation copy 1 shares seg_info copy 1\'s block');
assert(segmentSizeMaxBytes <= 0xffff_ffff, 'segment offsets fit in u32 fields');
assert(subtreeSizeBytes <= segmentSizeMinBytes * 4, 'a subtree-sized key needs at most a few segments');
