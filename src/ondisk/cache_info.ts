// cache_info: the cache's settings, stored twice (8 KiB and 12 KiB), dual-copy rule.
//
//   offset  size  field
//   0       8     meta header (crc, seq, version, reserved); CRC covers bytes 4..24
//   8       4     flags: bit 0 DATA_CRC (data extents carry a CRC32C; fixed at format)
//                        bit 1 INIT_DONE (format completed)
//   12      4     gc_percent      GC starts when this percentage of segments is in use (0..90)
//   16      4     segment_count   segments that belong to the cache (equals the superblock's)
//   20      4     first_segment   first segment of the cache's segment chain (0)
//   24            end of record

import { readU32LE, writeU32LE } from '../lib/units.js';
import { gcPercentMax, type FormatVersion } from './layout.js';
import { checkMetaRecord, sealMetaRecord, type Decoded } from './meta_header.js';

export const cacheInfoRecordBytes = 24;
export const cacheInfoFlagDataCrc = 1 << 0;
export const cacheInfoFlagInitDone = 1 << 1;
const cacheInfoFlagsKnown = cacheInfoFlagDataCrc | cacheInfoFlagInitDone;

export interface CacheInfo {
  readonly dataCrc: boolean;
  readonly initDone: boolean;
  readonly gcPercent: number;
  readonly segmentCount: number;
  readonly firstSegment: number;
}

export function encodeCacheInfo(info: CacheInfo, seq: number, version: FormatVersion): Uint8Array {
  const record = new Uint8Array(cacheInfoRecordBytes);
  writeU32LE(record, 8, (info.dataCrc ? cacheInfoFlagDataCrc : 0) | (info.initDone ? cacheInfoFlagInitDone : 0));
  writeU32LE(record, 12, info.gcPercent);
  writeU32LE(record, 16, info.segmentCount);
  writeU32LE(record, 20, info.firstSegment);
  return sealMetaRecord(record, seq, version);
}

export function cacheInfoFlags(info: CacheInfo): number {
  return (info.dataCrc ? cacheInfoFlagDataCrc : 0) | (info.initDone ? cacheInfoFlagInitDone : 0);
}

/** Decodes one copy; `segmentCount` and `version` are the superblock's. */
export function decodeCacheInfo(record: Uint8Array, segmentCount: number, name: string, version: FormatVersion): Decoded<CacheInfo> {
  const bytes = record.subarray(0, cacheInfoRecordBytes);
  const checked = checkMetaRecord(bytes, name, version);
  if ('problem' in checked) return { ok: false, ...checked };
  const flags = readU32LE(bytes, 8);
  const info: CacheInfo = {
    dataCrc: (flags & cacheInfoFlagDataCrc) !== 0,
    initDone: (flags & cacheInfoFlagInitDone) !== 0,
    gcPercent: readU32LE(bytes, 12),
    segmentCount: readU32LE(bytes, 16),
    firstSegment: readU32LE(bytes, 20),
  };
  if ((flags & ~cacheInfoFlagsKnown) !== 0) return { ok: false, problem: `${name}: unknown flags 0x${flags.toString(16)}` };
  if (info.gcPercent > gcPercentMax) return { ok: false, problem: `${name}: gc_percent ${info.gcPercent} exceeds ${gcPercentMax}` };
  if (info.segmentCount !== segmentCount) {
    return { ok: false, problem: `${name}: segment count ${info.segmentCount} differs from the superblock's ${segmentCount}` };
  }
  if (info.firstSegment !== 0) return { ok: false, problem: `${name}: first segment ${info.firstSegment} is not 0` };
  return { ok: true, value: info, seq: checked.seq };
}
