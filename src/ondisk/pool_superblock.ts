// The pool superblock: what a cache device formatted for volumes is (pool_layout.ts), written
// at format and never changed.
//
//   offset  size  field
//   0       8     meta header (crc, seq = 0, version = 3, reserved); CRC covers bytes 4..64
//   8       8     magic: ASCII "pcacheSB" (the cache superblock's: older pcache reads the version
//                 byte and refuses the device as "formatted by a newer pcache", by name)
//   16      4     flags (zero)
//   20      4     segment_size   bytes per unit, which is every volume's segment size
//   24      4     unit_count     units on the device
//   28      4     volumes_max    slots in the header (16)
//   32      16    pool_uuid      random at format
//   48      8     format_time    milliseconds since the Unix epoch (informational)
//   56      8     reserved (zero)
//   64            end of record
//
// Two identical copies: at 4 KiB and in the device's last 4 KiB block. Written last at format,
// after the empty volume table is durable, so a device whose first 8 KiB are zero is blank.

import { isAllZero, readU32LE, readU64LE, writeU32LE, writeU64LE } from '../lib/units.js';
import { segmentSizeProblem } from './layout.js';
import { checkMetaRecord, metaRecordVersion, sealMetaRecord, type Decoded } from './meta_header.js';
import { poolFormatVersion, poolUnitCountFor, volumesMax } from './pool_layout.js';
import { superblockMagic } from './superblock.js';

export const poolSuperblockRecordBytes = 64;
const uuidBytes = 16;

export interface PoolSuperblock {
  readonly segmentSizeBytes: number;
  readonly unitCount: number;
  readonly volumesMax: number;
  readonly poolUuid: Uint8Array;
  readonly formatTimeMs: number;
}

export function encodePoolSuperblock(sb: PoolSuperblock): Uint8Array {
  const problem = validatePoolSuperblock(sb, Number.POSITIVE_INFINITY);
  if (problem !== undefined) throw new RangeError(`refusing to encode an invalid pool superblock: ${problem}`);
  const record = new Uint8Array(poolSuperblockRecordBytes);
  record.set(Buffer.from(superblockMagic, 'ascii'), 8);
  writeU32LE(record, 20, sb.segmentSizeBytes);
  writeU32LE(record, 24, sb.unitCount);
  writeU32LE(record, 28, sb.volumesMax);
  record.set(sb.poolUuid, 32);
  writeU64LE(record, 48, sb.formatTimeMs);
  return sealMetaRecord(record, 0, poolFormatVersion);
}

/** Whether a superblock-sized record says "pool" (magic and version 3) before anything is checked. */
export function isPoolSuperblock(record: Uint8Array): boolean {
  return Buffer.from(record.subarray(8, 16)).toString('latin1') === superblockMagic && metaRecordVersion(record) === poolFormatVersion;
}

/** Decodes and validates a pool superblock read from a device of `deviceSizeBytes`; the only way bytes become one. */
export function decodePoolSuperblock(record: Uint8Array, deviceSizeBytes: number): Decoded<PoolSuperblock> {
  if (record.length < poolSuperblockRecordBytes) return { ok: false, problem: 'pool superblock: record too short' };
  const bytes = record.subarray(0, poolSuperblockRecordBytes);
  if (isAllZero(bytes)) return { ok: false, problem: 'pool superblock: never written (all zero)', blank: true };
  if (!isPoolSuperblock(bytes)) return { ok: false, problem: 'pool superblock: no pcache pool magic and version' };
  const checked = checkMetaRecord(bytes, 'pool superblock', poolFormatVersion);
  if ('problem' in checked) return { ok: false, ...checked };
  if (readU32LE(bytes, 16) !== 0) return { ok: false, problem: `pool superblock: unknown flags ${readU32LE(bytes, 16)}` };
  if (!isAllZero(bytes.subarray(56, 64))) return { ok: false, problem: 'pool superblock: reserved bytes are not zero' };
  const sb: PoolSuperblock = {
    segmentSizeBytes: readU32LE(bytes, 20),
    unitCount: readU32LE(bytes, 24),
    volumesMax: readU32LE(bytes, 28),
    poolUuid: bytes.slice(32, 32 + uuidBytes),
    formatTimeMs: readU64LE(bytes, 48),
  };
  const problem = validatePoolSuperblock(sb, deviceSizeBytes);
  if (problem !== undefined) return { ok: false, problem: `pool superblock: ${problem}` };
  return { ok: true, value: sb, seq: checked.seq };
}

export function validatePoolSuperblock(sb: PoolSuperblock, deviceSizeBytes: number): string | undefined {
  const sizeProblem = segmentSizeProblem(sb.segmentSizeBytes);
  if (sizeProblem !== undefined) return sizeProblem;
  if (!Number.isSafeInteger(sb.unitCount) || sb.unitCount < 1) return `unit count ${sb.unitCount} is invalid`;
  if (Number.isFinite(deviceSizeBytes) && sb.unitCount > poolUnitCountFor(deviceSizeBytes, sb.segmentSizeBytes)) {
    return `${sb.unitCount} units of ${sb.segmentSizeBytes} bytes do not fit a device of ${deviceSizeBytes} bytes`;
  }
  if (sb.volumesMax !== volumesMax) return `volumes_max ${sb.volumesMax}, expected ${volumesMax}`;
  if (sb.poolUuid.length !== uuidBytes) return 'pool uuid must be 16 bytes';
  if (!Number.isSafeInteger(sb.formatTimeMs) || sb.formatTimeMs < 0) return 'format time is out of range';
  return undefined;
}
