// seg_info: a segment's place in the cache's segment chain, stored twice at the segment start.
//
//   offset  size  field
//   0       8     meta header (crc, seq, version, reserved); CRC covers bytes 4..16
//   8       4     flags: bit 0 HAS_NEXT; bits 1-4 segment type (1 = cache segment)
//   12      4     next_segment   the next segment of the chain (when HAS_NEXT)
//   16            end of record
//
// pcache uses the whole device, so the chain is 0 -> 1 -> ... -> count-1; it is kept (as in
// dm-pcache) so that the structural checker can prove every segment belongs to this cache.

import { readU32LE, writeU32LE } from '../lib/units.js';
import type { FormatVersion } from './layout.js';
import { checkMetaRecord, sealMetaRecord, type Decoded } from './meta_header.js';

export const segmentInfoRecordBytes = 16;
const flagHasNext = 1 << 0;
const typeShift = 1;
const typeMask = 0xf << typeShift;
export const segmentTypeCache = 1;

export interface SegmentInfo {
  readonly next: number | undefined;
}

export function encodeSegmentInfo(info: SegmentInfo, seq: number, version: FormatVersion): Uint8Array {
  const record = new Uint8Array(segmentInfoRecordBytes);
  writeU32LE(record, 8, (info.next !== undefined ? flagHasNext : 0) | (segmentTypeCache << typeShift));
  writeU32LE(record, 12, info.next ?? 0);
  return sealMetaRecord(record, seq, version);
}

export function decodeSegmentInfo(record: Uint8Array, segmentCount: number, name: string, version: FormatVersion): Decoded<SegmentInfo> {
  const bytes = record.subarray(0, segmentInfoRecordBytes);
  const checked = checkMetaRecord(bytes, name, version);
  if ('problem' in checked) return { ok: false, ...checked };
  const flags = readU32LE(bytes, 8);
  if ((flags & ~(flagHasNext | typeMask)) !== 0) return { ok: false, problem: `${name}: unknown flags 0x${flags.toString(16)}` };
  if ((flags & typeMask) >> typeShift !== segmentTypeCache) return { ok: false, problem: `${name}: not a cache segment` };
  const hasNext = (flags & flagHasNext) !== 0;
  const next = readU32LE(bytes, 12);
  if (hasNext && next >= segmentCount) return { ok: false, problem: `${name}: next segment ${next} out of range` };
  return { ok: true, value: { next: hasNext ? next : undefined }, seq: checked.seq };
}
