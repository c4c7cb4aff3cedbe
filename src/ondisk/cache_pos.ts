// A persisted log position (key_tail or dirty_tail), stored twice (layout.ts says where, by
// format version).
//
//   offset  size  field
//   0       8     meta header (crc, seq, version, reserved); CRC covers bytes 4 .. end
//   8       4     segment   cache segment holding the kset the position points at
//   12      4     offset    byte offset of that kset inside the segment's data area
//   16      8     kset_seq  (version 2 only) the seq of the kset at this position (kset.ts);
//                           replay starts counting there, so the log's seqs never restart
//   24      8     durable_seq (version 2 only) when the record was written, every kset up to
//                           this seq was durable: a log that ends before it was damaged
//   16 / 32       end of record (version 1 / version 2)
//
// Ksets are multiples of 8 bytes long, so a valid offset is too.

import { readU32LE, readU64LE, writeU32LE, writeU64LE } from '../lib/units.js';
import type { FormatVersion } from './layout.js';
import { checkMetaRecord, sealMetaRecord, type Decoded } from './meta_header.js';

export const cachePosRecordBytesMax = 32;

export function cachePosRecordBytes(version: FormatVersion): number {
  return version === 1 ? 16 : 32;
}

export interface CachePos {
  readonly segment: number;
  readonly offsetBytes: number;
  /** The seq of the kset at the position; 0 in version 1, whose records and ksets carry none. */
  readonly seq: number;
  /** Every kset up to this seq was durable when the record was written; 0 in version 1. */
  readonly durableSeq: number;
}

export interface CachePosLimits {
  readonly segmentCount: number;
  readonly dataSizeBytes: number;
  /** The size of a kset header in this format: a position leaves room for one. */
  readonly ksetHeaderBytes: number;
}

export function encodeCachePos(pos: CachePos, seq: number, version: FormatVersion): Uint8Array {
  const record = new Uint8Array(cachePosRecordBytes(version));
  writeU32LE(record, 8, pos.segment);
  writeU32LE(record, 12, pos.offsetBytes);
  if (version !== 1) {
    writeU64LE(record, 16, pos.seq);
    writeU64LE(record, 24, pos.durableSeq);
  }
  return sealMetaRecord(record, seq, version);
}

export function decodeCachePos(record: Uint8Array, limits: CachePosLimits, name: string, version: FormatVersion): Decoded<CachePos> {
  const bytes = record.subarray(0, cachePosRecordBytes(version));
  const checked = checkMetaRecord(bytes, name, version);
  if ('problem' in checked) return { ok: false, ...checked };
  const pos: CachePos = {
    segment: readU32LE(bytes, 8),
    offsetBytes: readU32LE(bytes, 12),
    seq: version === 1 ? 0 : readU64LE(bytes, 16),
    durableSeq: version === 1 ? 0 : readU64LE(bytes, 24),
  };
  if (pos.segment >= limits.segmentCount) return { ok: false, problem: `${name}: segment ${pos.segment} out of range` };
  if (pos.offsetBytes + limits.ksetHeaderBytes > limits.dataSizeBytes) return { ok: false, problem: `${name}: offset ${pos.offsetBytes} past the data area` };
  if (pos.offsetBytes % 8 !== 0) return { ok: false, problem: `${name}: offset ${pos.offsetBytes} is not a multiple of 8` };
  if (version !== 1 && (!Number.isSafeInteger(pos.seq) || pos.seq < 1)) return { ok: false, problem: `${name}: kset seq ${pos.seq} out of range` };
  if (version !== 1 && !Number.isSafeInteger(pos.durableSeq)) return { ok: false, problem: `${name}: durable seq out of range` };
  return { ok: true, value: pos, seq: checked.seq };
}
