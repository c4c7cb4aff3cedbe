// A segment's generation, stored twice in the segment (layout.ts says where, by version).
//
//   offset  size  field
//   0       8     meta header (crc, seq, version, reserved); CRC covers bytes 4..16
//   8       8     gen    how many times the segment has been handed out or freed
//   16            end of record
//
// A key records the generation of its data segment when the space was allocated; a key whose
// generation is older than the segment's is stale and is ignored. A kset records (the low 32
// bits of) the generation of the log segment it is written in, so ksets left over from an
// earlier use of that segment are never replayed. A missing generation (neither copy valid)
// reads as 0, which is what format writes.

import { readU64LE, writeU64LE } from '../lib/units.js';
import type { FormatVersion } from './layout.js';
import { checkMetaRecord, sealMetaRecord, type Decoded } from './meta_header.js';

export const segmentGenRecordBytes = 16;

export function encodeSegmentGen(gen: number, seq: number, version: FormatVersion): Uint8Array {
  const record = new Uint8Array(segmentGenRecordBytes);
  writeU64LE(record, 8, gen);
  return sealMetaRecord(record, seq, version);
}

export function decodeSegmentGen(record: Uint8Array, name: string, version: FormatVersion): Decoded<number> {
  const bytes = record.subarray(0, segmentGenRecordBytes);
  const checked = checkMetaRecord(bytes, name, version);
  if ('problem' in checked) return { ok: false, ...checked };
  const gen = readU64LE(bytes, 8);
  if (!Number.isSafeInteger(gen)) return { ok: false, problem: `${name}: generation out of range` };
  return { ok: true, value: gen, seq: checked.seq };
}
