// Keys and key sets (ksets): the records of the cache's log.
//
// Key (40 bytes), one cached extent of the backing device:
//   offset  size  field
//   0       8     offset        byte offset on the backing device (multiple of 512)
//   8       4     length        bytes (multiple of 512, > 0); never crosses a 4 MiB subtree
//   12      4     flags         bit 1 CLEAN (filled from the backing device: nothing to write back)
//                               bit 2 ZERO  (the extent reads as zeroes; no data is stored)
//                               (bit 0, EMPTY, marks in-memory placeholders and never reaches disk)
//   16      4     segment       cache segment holding the data (0 for ZERO keys)
//   20      4     segment_offset byte offset of the data in that segment's data area
//   24      8     segment_gen   generation of the segment when the space was allocated
//   32      4     data_crc      CRC32C of the extent's data when the cache has DATA_CRC, else 0
//   36      4     reserved      zero
//
// Kset header (24 bytes), followed by key_count keys:
//   offset  size  field
//   0       4     crc           CRC32C, seeded with crc32c(cache_uuid), of bytes 4 .. end of
//                               the kset (the header only, for a LAST kset)
//   4       4     key_count     0 .. 128; or, for a LAST kset, the next log segment
//   8       8     magic         ASCII "pcacheKS"
//   16      4     flags         bit 0 LAST (the log continues at offset 0 of the next segment)
//                               bit 1 EPOCH_END (sealed by a flush: a client flush epoch ends here)
//   20      4     log_gen       low 32 bits of the generation of the segment the kset is in
//
// Why log_gen and the seeded CRC: a log segment is reused after garbage collection, and a
// device may be formatted again; neither zeroes old ksets. A kset left from an earlier use of
// its segment carries an older log_gen, and a kset left from an earlier format fails the CRC
// seeded with the new cache's uuid, so replay can never mistake either for part of the log.
// A kset with key_count 0 is valid only with EPOCH_END: it marks the end of a flush epoch
// whose keys were all in ksets already written.

import { crc32c } from '../lib/crc32c.js';
import { readU32LE, readU64LE, writeU32LE, writeU64LE } from '../lib/units.js';
import { extentAlignBytes, subtreeSizeBytes } from './layout.js';
import { hex } from './meta_header.js';

export const keyBytes = 40;
export const ksetHeaderBytes = 24;
export const ksetKeysMax = 128;
export const ksetBytesMax = ksetHeaderBytes + ksetKeysMax * keyBytes;
export const ksetMagic = 'pcacheKS';
const ksetMagicBytes = Buffer.from(ksetMagic, 'ascii');

export const keyFlagEmpty = 1 << 0;
export const keyFlagClean = 1 << 1;
export const keyFlagZero = 1 << 2;
const keyFlagsOnDisk = keyFlagClean | keyFlagZero;

export const ksetFlagLast = 1 << 0;
export const ksetFlagEpochEnd = 1 << 1;
const ksetFlagsKnown = ksetFlagLast | ksetFlagEpochEnd;

export interface KeyRecord {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly flags: number;
  readonly segment: number;
  readonly segmentOffsetBytes: number;
  readonly gen: number;
  readonly dataCrc: number;
}

export interface KeyLimits {
  readonly backingSizeBytes: number;
  readonly segmentCount: number;
  readonly dataSizeBytes: number;
}

export function ksetBytes(keyCount: number): number {
  return ksetHeaderBytes + keyCount * keyBytes;
}

export function ksetCrcSeed(cacheUuid: Uint8Array): number {
  return crc32c(cacheUuid);
}

export function encodeKey(target: Uint8Array, at: number, key: KeyRecord): void {
  writeU64LE(target, at, key.offsetBytes);
  writeU32LE(target, at + 8, key.lengthBytes);
  writeU32LE(target, at + 12, key.flags);
  writeU32LE(target, at + 16, key.segment);
  writeU32LE(target, at + 20, key.segmentOffsetBytes);
  writeU64LE(target, at + 24, key.gen);
  writeU32LE(target, at + 32, key.dataCrc);
  writeU32LE(target, at + 36, 0);
}

function decodeKey(bytes: Uint8Array, at: number): KeyRecord {
  return {
    offsetBytes: readU64LE(bytes, at),
    lengthBytes: readU32LE(bytes, at + 8),
    flags: readU32LE(bytes, at + 12),
    segment: readU32LE(bytes, at + 16),
    segmentOffsetBytes: readU32LE(bytes, at + 20),
    gen: readU64LE(bytes, at + 24),
    dataCrc: readU32LE(bytes, at + 32),
  };
}

/** Why a key (read from disk, after its kset's CRC passed) is unacceptable, or undefined. */
export function validateKey(key: KeyRecord, limits: KeyLimits): string | undefined {
  const { offsetBytes, lengthBytes, flags } = key;
  if (!Number.isSafeInteger(offsetBytes) || offsetBytes % extentAlignBytes !== 0) return `offset ${offsetBytes} is not sector-aligned`;
  if (lengthBytes === 0 || lengthBytes % extentAlignBytes !== 0) return `length ${lengthBytes} is not a positive multiple of 512`;
  if (offsetBytes + lengthBytes > limits.backingSizeBytes) return `extent ${offsetBytes}+${lengthBytes} ends past the backing device`;
  if (Math.floor(offsetBytes / subtreeSizeBytes) !== Math.floor((offsetBytes + lengthBytes - 1) / subtreeSizeBytes)) {
    return `extent ${offsetBytes}+${lengthBytes} crosses a 4 MiB subtree boundary`;
  }
  if ((flags & ~keyFlagsOnDisk) !== 0) return `unknown key flags 0x${flags.toString(16)}`;
  if ((flags & keyFlagZero) !== 0) {
    if ((flags & keyFlagClean) !== 0) return 'a key cannot be both ZERO and CLEAN';
    if (key.segment !== 0 || key.segmentOffsetBytes !== 0 || key.gen !== 0 || key.dataCrc !== 0) return 'a ZERO key must not point at data';
    return undefined;
  }
  if (key.segment >= limits.segmentCount) return `segment ${key.segment} out of range`;
  if (key.segmentOffsetBytes % extentAlignBytes !== 0) return `segment offset ${key.segmentOffsetBytes} is not sector-aligned`;
  if (key.segmentOffsetBytes + lengthBytes > limits.dataSizeBytes) return `data ${key.segmentOffsetBytes}+${lengthBytes} runs past the segment`;
  if (!Number.isSafeInteger(key.gen)) return 'generation out of range';
  return undefined;
}

export interface KsetSeal {
  readonly keyCount: number;
  readonly epochEnd: boolean;
  readonly logGen: number;
  readonly crcSeed: number;
}

/**
 * Fills in the header of a kset whose keys are already encoded at bytes 24.. of `buffer`, and
 * returns the kset's size on disk.
 */
export function sealKset(buffer: Uint8Array, seal: KsetSeal): number {
  const size = ksetBytes(seal.keyCount);
  writeU32LE(buffer, 4, seal.keyCount);
  buffer.set(ksetMagicBytes, 8);
  writeU32LE(buffer, 16, seal.epochEnd ? ksetFlagEpochEnd : 0);
  writeU32LE(buffer, 20, seal.logGen >>> 0);
  writeU32LE(buffer, 0, crc32c(buffer.subarray(4, size), seal.crcSeed));
  return size;
}

/** A LAST kset pointing the log at offset 0 of segment `next`. */
export function encodeLastKset(next: number, logGen: number, crcSeed: number): Uint8Array {
  const buffer = new Uint8Array(ksetHeaderBytes);
  writeU32LE(buffer, 4, next);
  buffer.set(ksetMagicBytes, 8);
  writeU32LE(buffer, 16, ksetFlagLast);
  writeU32LE(buffer, 20, logGen >>> 0);
  writeU32LE(buffer, 0, crc32c(buffer.subarray(4, ksetHeaderBytes), crcSeed));
  return buffer;
}

export type DecodedKset =
  | { readonly ok: true; readonly kind: 'last'; readonly next: number; readonly sizeBytes: number }
  | { readonly ok: true; readonly kind: 'keys'; readonly keys: KeyRecord[]; readonly epochEnd: boolean; readonly sizeBytes: number }
  /**
   * `damage` is false for the ways a log normally ends (never written, torn by a crash, left
   * from an earlier use of the segment) and true when a kset whose CRC is valid carries a
   * field that no pcache writes: corruption or a forged image.
   */
  | { readonly ok: false; readonly problem: string; readonly damage: boolean };

export interface KsetContext extends KeyLimits {
  readonly crcSeed: number;
  /** Generation of the segment the kset was read from. */
  readonly logGen: number;
  /** Bytes from the kset's position to the end of the segment's data area. */
  readonly roomBytes: number;
}

/**
 * Decodes the kset at the start of `bytes` (which holds at least min(roomBytes,
 * ksetBytesMax) bytes read from the log) and validates every field. The first problem found
 * marks the end of the log during replay.
 */
export function decodeKset(bytes: Uint8Array, context: KsetContext): DecodedKset {
  const end = (problem: string): DecodedKset => ({ ok: false, problem, damage: false });
  const damaged = (problem: string): DecodedKset => ({ ok: false, problem, damage: true });
  if (context.roomBytes < ksetHeaderBytes || bytes.length < ksetHeaderBytes) return end('no room for a kset header');
  if (!ksetMagicBytes.equals(bytes.subarray(8, 16))) return end('no kset magic');
  // Until the CRC has passed, nothing here is trusted; only the size is needed to check it.
  const flags = readU32LE(bytes, 16);
  const isLast = (flags & ksetFlagLast) !== 0;
  const countOrNext = readU32LE(bytes, 4);
  if (!isLast && countOrNext > ksetKeysMax) return end(`kset key count ${countOrNext} exceeds ${ksetKeysMax} (unverifiable header)`);
  const size = isLast ? ksetHeaderBytes : ksetBytes(countOrNext);
  if (size > context.roomBytes || size > bytes.length) return end(`kset of ${size} bytes would overrun its segment (unverifiable header)`);
  const stored = readU32LE(bytes, 0);
  const computed = crc32c(bytes.subarray(4, size), context.crcSeed);
  if (stored !== computed) return end(`kset CRC mismatch (stored ${hex(stored)}, computed ${hex(computed)})`);
  const logGen = readU32LE(bytes, 20);
  if (logGen !== context.logGen >>> 0) {
    return end(`kset from an earlier use of its segment (log_gen ${logGen}, segment gen ${context.logGen})`);
  }
  if ((flags & ~ksetFlagsKnown) !== 0) return damaged(`unknown kset flags 0x${flags.toString(16)}`);
  if (isLast) {
    if ((flags & ksetFlagEpochEnd) !== 0) return damaged('a LAST kset cannot end an epoch');
    if (countOrNext >= context.segmentCount) return damaged(`LAST kset points at segment ${countOrNext}, out of range`);
    return { ok: true, kind: 'last', next: countOrNext, sizeBytes: size };
  }
  const epochEnd = (flags & ksetFlagEpochEnd) !== 0;
  if (countOrNext === 0 && !epochEnd) return damaged('an empty kset must end an epoch');
  const keys: KeyRecord[] = [];
  for (let index = 0; index < countOrNext; index++) {
    const key = decodeKey(bytes, ksetHeaderBytes + index * keyBytes);
    const problem = validateKey(key, context);
    if (problem !== undefined) return damaged(`key ${index}: ${problem}`);
    keys.push(key);
  }
  return { ok: true, kind: 'keys', keys, epochEnd, sizeBytes: size };
}
