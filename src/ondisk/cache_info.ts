// cache_info: the cache's settings and the backing device's state at the last stop, stored
// twice (8 KiB and 12 KiB), dual-copy rule.
//
//   offset  size  field
//   0       8     meta header (crc, seq, version, reserved); CRC covers bytes 4 .. end
//   8       4     flags: bit 0 DATA_CRC (data extents carry a CRC32C; fixed at format)
//                        bit 1 INIT_DONE (format completed)
//   12      4     gc_percent      GC starts when this percentage of segments is in use (0..90)
//   16      4     segment_count   segments that belong to the cache (equals the superblock's)
//   20      4     first_segment   first segment of the cache's segment chain (0)
//   24      4     backing_state   (version 2) 0 unknown (the cache is open, or stopped without
//                                 a clean close); 1 clean (stopped cleanly; the fingerprint
//                                 describes the backing device then); 2 detached (drained
//                                 and released: the backing device may change freely)
//   28      4     cache_mode      (version 2) the write mode last chosen, kept across restarts:
//                                 0 writeback, 1 writethrough, 2 writearound, 3 passthrough
//                                 (docs/operations.md, "Write modes")
//   32      16    backing_fingerprint  (version 2) the backing device's state at the clean
//                                 stop: 8 bytes digest of its size and description (a file's
//                                 times, or sampled blocks), 8 bytes digest of its size and
//                                 sampled blocks (cache/cache_backing.ts)
//   24 / 48       end of record (version 1 / version 2)
//
// Why the backing state: clean cached copies are only right while nothing else writes to the
// backing device. A cache that was stopped cleanly knows what the device looked like; when it
// differs at the next start, the clean copies go (and a cache holding dirty data refuses to
// start). After a crash the state is unknown and nothing can be compared.

import { readU32LE, writeU32LE } from '../lib/units.js';
import { gcPercentMax, type FormatVersion } from './layout.js';
import { checkMetaRecord, sealMetaRecord, type Decoded } from './meta_header.js';

export const cacheInfoRecordBytesMax = 48;

export function cacheInfoRecordBytes(version: FormatVersion): number {
  return version === 1 ? 24 : 48;
}

export const cacheInfoFlagDataCrc = 1 << 0;
export const cacheInfoFlagInitDone = 1 << 1;
const cacheInfoFlagsKnown = cacheInfoFlagDataCrc | cacheInfoFlagInitDone;

export const backingFingerprintBytes = 16;
export type BackingState = 'unknown' | 'clean' | 'detached';
const backingStates: readonly BackingState[] = ['unknown', 'clean', 'detached'];

export interface CacheInfo {
  readonly dataCrc: boolean;
  readonly initDone: boolean;
  readonly gcPercent: number;
  readonly segmentCount: number;
  readonly firstSegment: number;
  /** Version 2; always 'unknown' in version 1, which records none. */
  readonly backingState: BackingState;
  /** The backing device's fingerprint at the clean stop (zeroes unless the state is clean). */
  readonly backingFingerprint: Uint8Array;
  /** Version 2; always 'writeback' in version 1, which records none. */
  readonly mode: CacheMode;
}

/** The write modes, in the order of their on-disk numbers (cache_mode). */
export const cacheModes = ['writeback', 'writethrough', 'writearound', 'passthrough'] as const;
export type CacheMode = (typeof cacheModes)[number];

/** The mode named `name`, or undefined when no mode has that name. */
export function cacheModeNamed(name: string): CacheMode | undefined {
  return cacheModes.find((mode) => mode === name);
}

export const noFingerprint = new Uint8Array(backingFingerprintBytes);

export function encodeCacheInfo(info: CacheInfo, seq: number, version: FormatVersion): Uint8Array {
  const record = new Uint8Array(cacheInfoRecordBytes(version));
  writeU32LE(record, 8, cacheInfoFlags(info));
  writeU32LE(record, 12, info.gcPercent);
  writeU32LE(record, 16, info.segmentCount);
  writeU32LE(record, 20, info.firstSegment);
  if (version !== 1) {
    writeU32LE(record, 24, backingStates.indexOf(info.backingState));
    writeU32LE(record, 28, cacheModes.indexOf(info.mode));
    record.set(info.backingFingerprint.subarray(0, backingFingerprintBytes), 32);
  }
  return sealMetaRecord(record, seq, version);
}

export function cacheInfoFlags(info: CacheInfo): number {
  return (info.dataCrc ? cacheInfoFlagDataCrc : 0) | (info.initDone ? cacheInfoFlagInitDone : 0);
}

/** Decodes one copy; `segmentCount` and `version` are the superblock's. */
export function decodeCacheInfo(record: Uint8Array, segmentCount: number, name: string, version: FormatVersion): Decoded<CacheInfo> {
  const bytes = record.subarray(0, cacheInfoRecordBytes(version));
  const checked = checkMetaRecord(bytes, name, version);
  if ('problem' in checked) return { ok: false, ...checked };
  const flags = readU32LE(bytes, 8);
  const state = version === 1 ? 'unknown' : backingStates[readU32LE(bytes, 24)];
  if (state === undefined) return { ok: false, problem: `${name}: unknown backing state ${readU32LE(bytes, 24)}` };
  const mode = version === 1 ? 'writeback' : cacheModes[readU32LE(bytes, 28)];
  if (mode === undefined) return { ok: false, problem: `${name}: unknown cache mode ${readU32LE(bytes, 28)}` };
  const info: CacheInfo = {
    dataCrc: (flags & cacheInfoFlagDataCrc) !== 0,
    initDone: (flags & cacheInfoFlagInitDone) !== 0,
    gcPercent: readU32LE(bytes, 12),
    segmentCount: readU32LE(bytes, 16),
    firstSegment: readU32LE(bytes, 20),
    backingState: state,
    backingFingerprint: version === 1 ? noFingerprint : bytes.slice(32, 32 + backingFingerprintBytes),
    mode,
  };
  if ((flags & ~cacheInfoFlagsKnown) !== 0) return { ok: false, problem: `${name}: unknown flags 0x${flags.toString(16)}` };
  if (info.gcPercent > gcPercentMax) return { ok: false, problem: `${name}: gc_percent ${info.gcPercent} exceeds ${gcPercentMax}` };
  if (info.segmentCount !== segmentCount) {
    return { ok: false, problem: `${name}: segment count ${info.segmentCount} differs from the superblock's ${segmentCount}` };
  }
  if (info.firstSegment !== 0) return { ok: false, problem: `${name}: first segment ${info.firstSegment} is not 0` };
  return { ok: true, value: info, seq: checked.seq };
}
