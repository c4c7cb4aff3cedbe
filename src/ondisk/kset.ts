// Keys and key sets (ksets): the records of the cache's log.
//
// Key (40 bytes), one cached extent of the backing device:
//   offset  size  field
//   0       8     offset        byte offset on the backing device (multiple of 512)
//   8       4     length        bytes (multiple of 512, > 0); never crosses a 4 MiB subtree
//   12      4     flags         bit 1 CLEAN (filled from the backing device: nothing to write back)
//                               bit 2 ZERO  (the extent reads as zeroes; no data is stored)
//                               (bit 0, EMPTY, marks in-memory placeholders and never reaches disk)
//                               CLEAN and ZERO together (version 2 only): a DROP key — the
//                               cache holds no copy of the extent any more (it was written to
//                               the backing device directly, by a write mode or the sequential
//                               cutoff); reads go to the backing device; no data, nothing to
//                               write back
//   16      4     segment       cache segment holding the data (0 for ZERO keys)
//   20      4     segment_offset byte offset of the data in that segment's data area
//   24      8     segment_gen   generation of the segment when the space was allocated
//   32      4     data_crc      CRC32C of the extent's data when the cache has DATA_CRC, else 0
//   36      4     reserved      zero
//
// Kset header (24 bytes in format version 1, 40 in version 2), followed by key_count keys:
//   offset  size  field
//   0       4     crc           CRC32C, seeded with crc32c(cache_uuid), of bytes 4 .. end of
//                               the kset (the header only, for a LAST kset)
//   4       4     key_count     0 .. 128; or, for a LAST kset, the next log segment
//   8       8     magic         ASCII "pcacheKS"
//   16      4     flags         bit 0 LAST (the log continues at offset 0 of the next segment)
//                               bit 1 EPOCH_END (sealed by a flush: a client flush epoch ends here)
//                               bit 2 EXTENDED (the two fields below follow; every kset of a
//                                     version 2 device has them, no kset of version 1 does)
//                               bit 3 INVALIDATE (version 2; no keys): every CLEAN key before
//                                     it in the log is dropped (`pcache invalidate`, or a
//                                     backing device found changed at start)
//   20      4     log_gen       low 32 bits of the generation of the segment the kset is in
//   24      8     seq           the kset's number in the log: each kset with keys takes the next
//                               one; a LAST kset carries the number of the kset after it
//   32      8     durable_seq   when the kset was written, every kset up to this seq was durable
//
// Why seq and durable_seq: replay must tell the end of the log from damage inside it. Replay
// takes ksets in seq order from key_tail's seq; when a kset fails its checks, a valid kset
// found later on the device with a higher seq and a durable_seq at or past the failed one's seq
// proves that the failed one had been durable (a sync covered it before that kset was written):
// the log was damaged, not cut short by a crash. A crash can only leave ksets written in the
// same unsynced batch behind a torn one, and their durable_seq is below it.
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
/** The kset header of format version 1. */
export const ksetHeaderBytes = 24;
/** The kset header of format version 2: with seq and durable_seq. */
export const ksetExtendedHeaderBytes = 40;
export const ksetKeysMax = 128;
export const ksetBytesMax = ksetExtendedHeaderBytes + ksetKeysMax * keyBytes;
export const ksetMagic = 'pcacheKS';
const ksetMagicBytes = Buffer.from(ksetMagic, 'ascii');

export const keyFlagEmpty = 1 << 0;
export const keyFlagClean = 1 << 1;
export const keyFlagZero = 1 << 2;
const keyFlagsOnDisk = keyFlagClean | keyFlagZero;
/** The flags of a DROP key (format version 2): the extent is no longer cached. */
export const keyFlagsDrop = keyFlagClean | keyFlagZero;

export function isDropKey(flags: number): boolean {
  return (flags & keyFlagsDrop) === keyFlagsDrop;
}

export const ksetFlagLast = 1 << 0;
export const ksetFlagEpochEnd = 1 << 1;
export const ksetFlagExtended = 1 << 2;
export const ksetFlagInvalidate = 1 << 3;
const ksetFlagsKnown = ksetFlagLast | ksetFlagEpochEnd | ksetFlagExtended | ksetFlagInvalidate;

export function ksetHeaderBytesFor(extended: boolean): number {
  return extended ? ksetExtendedHeaderBytes : ksetHeaderBytes;
}

/** The seq fields of an extended kset header. */
export interface KsetSeqs {
  readonly seq: number;
  readonly durableSeq: number;
}

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
  /** Format version 2 (extended ksets), where DROP keys exist. */
  readonly extended?: boolean;
}

export function ksetBytes(keyCount: number, extended: boolean): number {
  return ksetHeaderBytesFor(extended) + keyCount * keyBytes;
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
    if ((flags & keyFlagClean) !== 0 && limits.extended !== true) return 'a key cannot be both ZERO and CLEAN (a DROP key) before format version 2';
    if (key.segment !== 0 || key.segmentOffsetBytes !== 0 || key.gen !== 0 || key.dataCrc !== 0) return 'a ZERO or DROP key must not point at data';
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
  /** An INVALIDATE marker (no keys; extended ksets only). */
  readonly invalidate?: boolean;
  readonly logGen: number;
  readonly crcSeed: number;
  /** The seq fields, on a device whose ksets carry them (format version 2). */
  readonly seqs: KsetSeqs | undefined;
}

/**
 * Fills in the header of a kset whose keys are already encoded after the header (at
 * ksetHeaderBytesFor(seqs !== undefined)) in `buffer`, and returns the kset's size on disk.
 */
export function sealKset(buffer: Uint8Array, seal: KsetSeal): number {
  const size = ksetBytes(seal.keyCount, seal.seqs !== undefined);
  writeU32LE(buffer, 4, seal.keyCount);
  writeHeaderTail(buffer, (seal.epochEnd ? ksetFlagEpochEnd : 0) | (seal.invalidate === true ? ksetFlagInvalidate : 0), seal.logGen, seal.seqs);
  writeU32LE(buffer, 0, crc32c(buffer.subarray(4, size), seal.crcSeed));
  return size;
}

/** A LAST kset pointing the log at offset 0 of segment `next`. */
export function encodeLastKset(next: number, logGen: number, crcSeed: number, seqs: KsetSeqs | undefined): Uint8Array {
  const size = ksetHeaderBytesFor(seqs !== undefined);
  const buffer = new Uint8Array(size);
  writeU32LE(buffer, 4, next);
  writeHeaderTail(buffer, ksetFlagLast, logGen, seqs);
  writeU32LE(buffer, 0, crc32c(buffer.subarray(4, size), crcSeed));
  return buffer;
}

/** Magic, flags, log_gen and (extended) the seq fields: the header after key_count. */
function writeHeaderTail(buffer: Uint8Array, flags: number, logGen: number, seqs: KsetSeqs | undefined): void {
  buffer.set(ksetMagicBytes, 8);
  writeU32LE(buffer, 16, seqs === undefined ? flags : flags | ksetFlagExtended);
  writeU32LE(buffer, 20, logGen >>> 0);
  if (seqs === undefined) return;
  writeU64LE(buffer, 24, seqs.seq);
  writeU64LE(buffer, 32, seqs.durableSeq);
}

/** The seq fields of a decoded kset; both 0 for a version 1 kset, which has none. */
interface DecodedSeqs {
  readonly seq: number;
  readonly durableSeq: number;
}

export type DecodedKset =
  | ({ readonly ok: true; readonly kind: 'last'; readonly next: number; readonly sizeBytes: number } & DecodedSeqs)
  | ({ readonly ok: true; readonly kind: 'keys'; readonly keys: KeyRecord[]; readonly epochEnd: boolean; readonly invalidate: boolean; readonly sizeBytes: number } & DecodedSeqs)
  /**
   * `damage` is false for the ways a log normally ends (never written, torn by a crash, left
   * from an earlier use of the segment) and true when a kset whose CRC is valid carries a
   * field that no pcache writes: corruption or a forged image.
   */
  | {
      readonly ok: false;
      readonly problem: string;
      readonly damage: boolean;
      /** Set when the CRC passed but the kset carries another log_gen than its segment's: that log_gen. */
      readonly otherLogGen?: number;
    };

export interface KsetContext extends KeyLimits {
  readonly crcSeed: number;
  /** Generation of the segment the kset was read from. */
  readonly logGen: number;
  /** Bytes from the kset's position to the end of the segment's data area. */
  readonly roomBytes: number;
  /** Whether the device's ksets carry the extended header (format version 2). */
  readonly extended: boolean;
}

/** What the CRC check of a kset's header needs: the device's format, the seed, the room left. */
export type KsetHeaderContext = Pick<KsetContext, 'extended' | 'crcSeed' | 'roomBytes'>;

/**
 * The checks a kset passes before anything in it is trusted: room for a header, the magic, a
 * key count within bounds, room for the size that count gives, and the CRC over that size.
 * Returns the size, or why there is no kset here (the ways a log normally ends: not damage).
 */
function crcCheckedKsetSize(bytes: Uint8Array, context: KsetHeaderContext): number | string {
  const headerBytes = ksetHeaderBytesFor(context.extended);
  if (context.roomBytes < headerBytes || bytes.length < headerBytes) return 'no room for a kset header';
  if (!ksetMagicBytes.equals(bytes.subarray(8, 16))) return 'no kset magic';
  // Until the CRC has passed, nothing here is trusted; only the size is needed to check it.
  const flags = readU32LE(bytes, 16);
  const isLast = (flags & ksetFlagLast) !== 0;
  const countOrNext = readU32LE(bytes, 4);
  if (!isLast && countOrNext > ksetKeysMax) return `kset key count ${countOrNext} exceeds ${ksetKeysMax} (unverifiable header)`;
  // The size follows the device's format, not the flag: the flag is checked once the CRC passed.
  const size = isLast ? headerBytes : ksetBytes(countOrNext, context.extended);
  if (size > context.roomBytes || size > bytes.length) return `kset of ${size} bytes would overrun its segment (unverifiable header)`;
  const stored = readU32LE(bytes, 0);
  const computed = crc32c(bytes.subarray(4, size), context.crcSeed);
  if (stored !== computed) return `kset CRC mismatch (stored ${hex(stored)}, computed ${hex(computed)})`;
  return size;
}

/**
 * The log_gen of the kset at the start of `bytes` if its CRC passes, else undefined: what
 * decodeKset reads before it looks at flags and keys, for a caller that wants nothing more
 * (the checker's scan of every segment's first kset, which validated every key it skipped).
 */
export function crcCheckedKsetLogGen(bytes: Uint8Array, context: KsetHeaderContext): number | undefined {
  return typeof crcCheckedKsetSize(bytes, context) === 'string' ? undefined : readU32LE(bytes, 20);
}

/**
 * Decodes the kset at the start of `bytes` (which holds at least min(roomBytes,
 * ksetBytesMax) bytes read from the log) and validates every field. The first problem found
 * marks the end of the log during replay.
 */
export function decodeKset(bytes: Uint8Array, context: KsetContext): DecodedKset {
  const end = (problem: string): DecodedKset => ({ ok: false, problem, damage: false });
  const damaged = (problem: string): DecodedKset => ({ ok: false, problem, damage: true });
  const size = crcCheckedKsetSize(bytes, context);
  if (typeof size === 'string') return end(size);
  const headerBytes = ksetHeaderBytesFor(context.extended);
  const flags = readU32LE(bytes, 16);
  const isLast = (flags & ksetFlagLast) !== 0;
  const countOrNext = readU32LE(bytes, 4);
  const logGen = readU32LE(bytes, 20);
  if (logGen !== context.logGen >>> 0) {
    return { ok: false, problem: `kset from an earlier use of its segment (log_gen ${logGen}, segment gen ${context.logGen})`, damage: false, otherLogGen: logGen };
  }
  if ((flags & ~ksetFlagsKnown) !== 0) return damaged(`unknown kset flags 0x${flags.toString(16)}`);
  if (((flags & ksetFlagExtended) !== 0) !== context.extended) {
    return damaged(context.extended ? 'a kset without the extended header on a version 2 device' : 'a kset with the extended header on a version 1 device');
  }
  const seqs: DecodedSeqs = context.extended ? { seq: readU64LE(bytes, 24), durableSeq: readU64LE(bytes, 32) } : { seq: 0, durableSeq: 0 };
  if (context.extended && (!Number.isSafeInteger(seqs.seq) || seqs.seq < 1 || !(seqs.durableSeq < seqs.seq))) {
    return damaged(`kset seq ${seqs.seq} with durable seq ${seqs.durableSeq} is impossible`);
  }
  const invalidate = (flags & ksetFlagInvalidate) !== 0;
  if (invalidate && (!context.extended || isLast || countOrNext !== 0)) return damaged('an INVALIDATE kset must be an extended kset without keys');
  if (isLast) {
    if ((flags & ksetFlagEpochEnd) !== 0) return damaged('a LAST kset cannot end an epoch');
    if (countOrNext >= context.segmentCount) return damaged(`LAST kset points at segment ${countOrNext}, out of range`);
    return { ok: true, kind: 'last', next: countOrNext, sizeBytes: size, ...seqs };
  }
  const epochEnd = (flags & ksetFlagEpochEnd) !== 0;
  if (countOrNext === 0 && !epochEnd && !invalidate) return damaged('an empty kset must end an epoch or invalidate');
  const keys: KeyRecord[] = [];
  for (let index = 0; index < countOrNext; index++) {
    const key = decodeKey(bytes, headerBytes + index * keyBytes);
    const problem = validateKey(key, context);
    if (problem !== undefined) return damaged(`key ${index}: ${problem}`);
    keys.push(key);
  }
  return { ok: true, kind: 'keys', keys, epochEnd, invalidate, sizeBytes: size, ...seqs };
}
