// Where everything lives on the cache device, and the limits that the format allows.
//
//   byte offset            size           content
//   0                      4 KiB          reserved, zero (a blank device is zero in its first 8 KiB)
//   4 KiB                  4 KiB          superblock (one copy, written once, last, at format)
//   8 KiB, 12 KiB          4 KiB each     cache_info copy 0 and copy 1
//   16 KiB                 4 KiB          cache_ctrl: key_tail copies at +0 and +512,
//                                         dirty_tail copies at +1024 and +1536
//   20 KiB + i * segSize   segSize        segment i (i = 0 .. segmentCount-1)
//
// Inside each segment:
//   +0, +4 KiB             4 KiB each     seg_info copy 0 and copy 1
//   +8 KiB, +8 KiB + 512   512 B each     segment generation copy 0 and copy 1
//   +12 KiB                segSize-12 KiB data area: cached data extents, or the kset log
//
// Every copy of a small record sits in a 512-byte sector of its own, so that a torn sector
// can damage at most one copy. All integers are little-endian.

import { assert } from '../lib/assert.js';
import { GiB, KiB, MiB, sectorSizeBytes } from '../lib/units.js';

export const formatVersion = 1;

export const superblockOffsetBytes = 4 * KiB;
export const cacheInfoOffsetsBytes = [8 * KiB, 12 * KiB] as const;
export const keyTailOffsetsBytes = [16 * KiB, 16 * KiB + 512] as const;
export const dirtyTailOffsetsBytes = [16 * KiB + 1024, 16 * KiB + 1536] as const;
export const segmentsOffsetBytes = 20 * KiB;
/** The first bytes of a blank device; they are zero unless a format got as far as the superblock. */
export const blankProbeBytes = 8 * KiB;

export const segmentInfoOffsetsBytes = [0, 4 * KiB] as const;
export const segmentGenOffsetsBytes = [8 * KiB, 8 * KiB + 512] as const;
export const segmentDataOffsetBytes = 12 * KiB;

export const segmentSizeDefaultBytes = 16 * MiB;
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

/** How many segments of `segmentSizeBytes` fit on a cache device of `deviceSizeBytes`. */
export function segmentCountFor(deviceSizeBytes: number, segmentSizeBytes: number): number {
  return Math.max(0, Math.floor((deviceSizeBytes - segmentsOffsetBytes) / segmentSizeBytes));
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
assert(segmentGenOffsetsBytes[1] + sectorSizeBytes <= segmentDataOffsetBytes, 'generation copies precede the data area');
assert(dirtyTailOffsetsBytes[1] + sectorSizeBytes <= segmentsOffsetBytes, 'cache_ctrl fits before the segments');
assert(segmentSizeMaxBytes <= 0xffff_ffff, 'segment offsets fit in u32 fields');
assert(subtreeSizeBytes <= segmentSizeMinBytes * 4, 'a subtree-sized key needs at most a few segments');
