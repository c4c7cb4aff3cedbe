// A persisted log position (key_tail or dirty_tail), stored twice in cache_ctrl.
//
//   offset  size  field
//   0       8     meta header (crc, seq, version, reserved); CRC covers bytes 4..16
//   8       4     segment   cache segment holding the kset the position points at
//   12      4     offset    byte offset of that kset inside the segment's data area
//   16            end of record
//
// key_tail copies live at 16 KiB and 16 KiB + 512; dirty_tail copies at 16 KiB + 1024 and
// 16 KiB + 1536. Ksets are multiples of 8 bytes long, so a valid offset is too.

import { readU32LE, writeU32LE } from '../lib/units.js';
import { ksetHeaderBytes } from './kset.js';
import { checkMetaRecord, sealMetaRecord, type Decoded } from './meta_header.js';

export const cachePosRecordBytes = 16;

export interface CachePos {
  readonly segment: number;
  readonly offsetBytes: number;
}

export function encodeCachePos(pos: CachePos, seq: number): Uint8Array {
  const record = new Uint8Array(cachePosRecordBytes);
  writeU32LE(record, 8, pos.segment);
  writeU32LE(record, 12, pos.offsetBytes);
  return sealMetaRecord(record, seq);
}

export function decodeCachePos(record: Uint8Array, limits: { segmentCount: number; dataSizeBytes: number }, name: string): Decoded<CachePos> {
  const bytes = record.subarray(0, cachePosRecordBytes);
  const checked = checkMetaRecord(bytes, name);
  if ('problem' in checked) return { ok: false, ...checked };
  const pos: CachePos = { segment: readU32LE(bytes, 8), offsetBytes: readU32LE(bytes, 12) };
  if (pos.segment >= limits.segmentCount) return { ok: false, problem: `${name}: segment ${pos.segment} out of range` };
  if (pos.offsetBytes + ksetHeaderBytes > limits.dataSizeBytes) return { ok: false, problem: `${name}: offset ${pos.offsetBytes} past the data area` };
  if (pos.offsetBytes % 8 !== 0) return { ok: false, problem: `${name}: offset ${pos.offsetBytes} is not a multiple of 8` };
  return { ok: true, value: pos, seq: checked.seq };
}
