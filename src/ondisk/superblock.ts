// The superblock: what this device is, written at format and never changed.
//
//   offset  size  field
//   0       8     meta header (crc, seq = 0, version, reserved); CRC covers bytes 4..200;
//                 its version is the device's format version (layout.ts)
//   8       8     magic: ASCII "pcacheSB"
//   16      4     flags (zero; reserved for future format features)
//   20      4     segment_size       bytes per segment (multiple of 1 MiB, 1 MiB .. 1 GiB)
//   24      4     segment_count      segments on the device (4 .. 2^20)
//   28      4     reserved (zero)
//   32      16    cache_uuid         random at format; seeds the kset CRC (see kset.ts)
//   48      8     backing_size       bytes of the backing device this cache belongs to
//   56      2     backing_identity_length   0 .. 128
//   58      6     reserved (zero)
//   64      128   backing_identity   UTF-8 identity of the backing device, zero-padded
//   192     8     format_time        milliseconds since the Unix epoch (informational)
//   200           end of record
//
// It is written last at format (after everything it describes is durable), so a torn
// superblock write can only come from a format that never finished, and a device whose first
// 8 KiB are zero is still blank. Version 1 has one copy; version 2 a second, identical copy in
// the device's last 4 KiB block, so the loss of either block loses nothing. A version this code
// does not know is refused by name ("formatted by a newer pcache"), before any other field is
// trusted.

import { readU32LE, readU64LE, readU16LE, writeU32LE, writeU64LE, writeU16LE } from '../lib/units.js';
import {
  backingIdentityMaxBytes, endReserveBytes, formatVersionsSupported, layoutFor, segmentCountMax, segmentCountMin, segmentsOffsetBytes,
  segmentSizeProblem, type FormatVersion,
} from './layout.js';
import { checkMetaRecord, metaRecordVersion, sealMetaRecord, type Decoded } from './meta_header.js';
import { poolFormatVersion } from './pool_layout.js';

export const superblockRecordBytes = 200;
export const superblockMagic = 'pcacheSB';
const uuidBytes = 16;

export interface Superblock {
  readonly formatVersion: FormatVersion;
  readonly segmentSizeBytes: number;
  readonly segmentCount: number;
  readonly cacheUuid: Uint8Array;
  readonly backingSizeBytes: number;
  readonly backingIdentity: string;
  readonly formatTimeMs: number;
}

export function encodeSuperblock(sb: Superblock): Uint8Array {
  const record = new Uint8Array(superblockRecordBytes);
  record.set(Buffer.from(superblockMagic, 'ascii'), 8);
  writeU32LE(record, 16, 0);
  writeU32LE(record, 20, sb.segmentSizeBytes);
  writeU32LE(record, 24, sb.segmentCount);
  record.set(sb.cacheUuid, 32);
  writeU64LE(record, 48, sb.backingSizeBytes);
  const identity = Buffer.from(sb.backingIdentity, 'utf8');
  writeU16LE(record, 56, identity.length);
  record.set(identity, 64);
  writeU64LE(record, 192, sb.formatTimeMs);
  const problem = validateSuperblock(sb, Number.POSITIVE_INFINITY);
  if (problem !== undefined) throw new RangeError(`refusing to encode an invalid superblock: ${problem}`);
  return sealMetaRecord(record, 0, sb.formatVersion);
}

/** Whether the record carries the superblock magic at all (before any CRC check). */
export function hasSuperblockMagic(record: Uint8Array): boolean {
  return Buffer.from(record.subarray(8, 16)).toString('latin1') === superblockMagic;
}

/**
 * Decodes and validates a superblock read from a device of `deviceSizeBytes`. Decoding is the
 * only way bytes become a Superblock.
 */
export function decodeSuperblock(record: Uint8Array, deviceSizeBytes: number): Decoded<Superblock> {
  if (record.length < superblockRecordBytes) return { ok: false, problem: 'superblock: record too short' };
  const bytes = record.subarray(0, superblockRecordBytes);
  if (!hasSuperblockMagic(bytes)) return { ok: false, problem: 'superblock: no pcache magic' };
  const version = formatVersionsSupported.find((known) => known === metaRecordVersion(bytes));
  if (metaRecordVersion(bytes) === poolFormatVersion) {
    return { ok: false, problem: 'this cache device holds volumes (format version 3): serve it without --backing, and use `pcache volume list --control PATH` and `pcache check --cache PATH`' };
  }
  if (version === undefined) {
    return { ok: false, problem: `superblock: format version ${metaRecordVersion(bytes)}, which this pcache does not know (it opens versions ${formatVersionsSupported.join(' and ')}): a newer pcache formatted this device` };
  }
  const checked = checkMetaRecord(bytes, 'superblock', version);
  if ('problem' in checked) return { ok: false, ...checked };
  const identityLength = readU16LE(bytes, 56);
  if (identityLength > backingIdentityMaxBytes) {
    return { ok: false, problem: `superblock: backing identity length ${identityLength} exceeds ${backingIdentityMaxBytes}` };
  }
  if (readU32LE(bytes, 16) !== 0) return { ok: false, problem: `superblock: unknown flags ${readU32LE(bytes, 16)}` };
  const sb: Superblock = {
    formatVersion: version,
    segmentSizeBytes: readU32LE(bytes, 20),
    segmentCount: readU32LE(bytes, 24),
    cacheUuid: bytes.slice(32, 32 + uuidBytes),
    backingSizeBytes: readU64LE(bytes, 48),
    backingIdentity: Buffer.from(bytes.subarray(64, 64 + identityLength)).toString('utf8'),
    formatTimeMs: readU64LE(bytes, 192),
  };
  const problem = validateSuperblock(sb, deviceSizeBytes);
  if (problem !== undefined) return { ok: false, problem: `superblock: ${problem}` };
  return { ok: true, value: sb, seq: checked.seq };
}

export function validateSuperblock(sb: Superblock, deviceSizeBytes: number): string | undefined {
  const sizeProblem = segmentSizeProblem(sb.segmentSizeBytes);
  if (sizeProblem !== undefined) return sizeProblem;
  if (sb.segmentCount < segmentCountMin) return `segment count ${sb.segmentCount} is below the minimum of ${segmentCountMin}`;
  if (sb.segmentCount > segmentCountMax) return `segment count ${sb.segmentCount} exceeds the maximum of ${segmentCountMax}`;
  const endBytes = segmentsOffsetBytes + sb.segmentCount * sb.segmentSizeBytes;
  const usableBytes = deviceSizeBytes - endReserveBytes(layoutFor(sb.formatVersion), deviceSizeBytes);
  if (endBytes > usableBytes) return `${sb.segmentCount} segments end at byte ${endBytes}, past the device end ${deviceSizeBytes}`;
  if (sb.cacheUuid.length !== uuidBytes) return 'cache uuid must be 16 bytes';
  if (!Number.isSafeInteger(sb.backingSizeBytes) || sb.backingSizeBytes <= 0) return `backing size ${sb.backingSizeBytes} is invalid`;
  if (sb.backingSizeBytes % 512 !== 0) return `backing size ${sb.backingSizeBytes} is not a multiple of 512`;
  if (Buffer.byteLength(sb.backingIdentity, 'utf8') > backingIdentityMaxBytes) return 'backing identity is longer than 128 bytes';
  if (!Number.isSafeInteger(sb.formatTimeMs)) return 'format time is out of range';
  return undefined;
}

export function uuidToString(uuid: Uint8Array): string {
  const hex = Buffer.from(uuid).toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
