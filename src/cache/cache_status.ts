// What `pcache status` shows: dm-pcache's nine status fields in its order and format, then
// what dm-pcache lacks (state with its reason, dirty bytes, index size, writeback and GC
// progress, counters). Computed synchronously from memory: it never waits for a device.

import { cacheInfoFlags, cacheModes, type CacheInfo, type CacheMode } from '../ondisk/cache_info.js';
import { uuidToString } from '../ondisk/superblock.js';
import type { CacheContext } from './cache_context.js';
import type { CacheEngine } from './cache_engine.js';
import { formatPosition, type CacheStats } from './cache_types.js';

/** What `pcache status` shows: dm-pcache's nine fields, then what dm-pcache lacks. */
export interface CacheStatus {
  /** dm-pcache field 1: superblock flags (always 0: little-endian). */
  readonly sbFlags: number;
  /** dm-pcache field 2: segments on the cache device. */
  readonly segTotal: number;
  /** dm-pcache field 3: segments used by the cache. */
  readonly cacheSegs: number;
  /** dm-pcache field 4: segments in use (log and data). */
  readonly segsUsed: number;
  /** dm-pcache field 5. */
  readonly gcPercent: number;
  /** dm-pcache field 6: bit 0 DATA_CRC, bit 1 INIT_DONE, bits 2-5 cache mode (0 writeback, 1 writethrough, 2 writearound, 3 passthrough), bits 6-12 gc_percent. */
  readonly cacheFlags: number;
  /** dm-pcache fields 7-9, each "segment:offset". */
  readonly keyHead: string;
  readonly dirtyTail: string;
  readonly keyTail: string;
  /**
   * running, or draining while a drain() is in progress; degraded while writeback or GC keep
   * failing; backing-offline (which outranks draining and degraded); failed; stopping; stopped.
   */
  readonly state: 'running' | 'draining' | 'degraded' | 'backing-offline' | 'failed' | 'stopping' | 'stopped';
  /** The write mode (docs/operations.md, "Write modes"). */
  readonly mode: CacheMode;
  /** Why the state is degraded, backing-offline or failed. */
  readonly stateReason: string | undefined;
  /** When the backing device went offline (ISO 8601), while it is. */
  readonly backingOfflineSince: string | undefined;
  /** Dirty bytes at which writes are held while the backing device is offline. */
  readonly dirtyHighWaterBytes: number;
  readonly readOnly: boolean;
  /** The on-disk format version (docs/format.md); 1 still serves, format writes 2. */
  readonly formatVersion: number;
  readonly dataCrc: boolean;
  readonly cacheUuid: string;
  readonly segmentSizeBytes: number;
  readonly backingSizeBytes: number;
  readonly dirtyBytes: number;
  /** Bytes of log between key_tail and dirty_tail (written back, not yet reclaimed). */
  readonly reclaimableLogBytes: number;
  readonly indexKeys: number;
  readonly indexBytes: number;
  readonly writeback: {
    readonly active: boolean;
    readonly lastError: string | undefined;
    readonly failingForMs: number | undefined;
    readonly backoffMs: number;
    /** Age of the oldest dirty data in the log (undefined when none). */
    readonly oldestDirtyAgeMs: number | undefined;
  };
  readonly gc: { readonly active: boolean; readonly lastError: string | undefined; readonly thresholdSegments: number };
  readonly counters: Readonly<CacheStats>;
}

/**
 * dm-pcache's status line (`dmsetup status`), fields 1-9 in its order and format:
 * `sb_flags seg_total cache_segs segs_used gc_percent cache_flags key_head dirty_tail key_tail`
 * with the two flag words in hex and the positions as segment:offset.
 */
export function dmStatusLine(status: CacheStatus): string {
  return [
    status.sbFlags.toString(16), status.segTotal, status.cacheSegs, status.segsUsed, status.gcPercent,
    status.cacheFlags.toString(16), status.keyHead, status.dirtyTail, status.keyTail,
  ].join(' ');
}

/** The cache_info record that describes this cache with `gcPercent`. */
export function cacheInfoOf(ctx: CacheContext, gcPercent: number): CacheInfo {
  return {
    dataCrc: ctx.dataCrc,
    initDone: true,
    gcPercent,
    segmentCount: ctx.segments.count,
    firstSegment: 0,
    backingState: ctx.backingState,
    backingFingerprint: ctx.backingFingerprint,
    mode: ctx.mode,
  };
}

/** The status of `engine`; `drainsInProgress` makes a running cache report 'draining'. */
export function cacheStatus(engine: CacheEngine, drainsInProgress: number): CacheStatus {
  const ctx = engine.ctx;
  const failingSince = engine.writeback.failingSinceMs;
  let state: CacheStatus['state'] = ctx.state === 'running' ? 'running' : ctx.state;
  let stateReason: string | undefined;
  const offlineSince = ctx.backingOfflineSinceWallMs === undefined ? undefined : new Date(ctx.backingOfflineSinceWallMs).toISOString();
  if (ctx.failure !== undefined) {
    state = 'failed';
    stateReason = ctx.failure.message;
  } else if (ctx.state === 'running' && offlineSince !== undefined) {
    state = 'backing-offline';
    stateReason = `backing offline since ${offlineSince}: ${ctx.backingOfflineReason ?? ''}`;
  } else if (ctx.state === 'running' && (failingSince !== undefined || engine.gc.lastError !== undefined)) {
    state = 'degraded';
    stateReason = engine.writeback.lastError ?? engine.gc.lastError;
  } else if (ctx.state === 'running' && drainsInProgress > 0) {
    state = 'draining';
  }
  return {
    sbFlags: 0,
    segTotal: ctx.dev.sb.segmentCount,
    cacheSegs: ctx.segments.count,
    segsUsed: ctx.segments.usedCount,
    gcPercent: ctx.gcPercent,
    cacheFlags: cacheInfoFlags(cacheInfoOf(ctx, ctx.gcPercent)) | (cacheModes.indexOf(ctx.mode) << 2) | (ctx.gcPercent << 6),
    keyHead: formatPosition(engine.log.keyHead),
    dirtyTail: formatPosition(ctx.dirtyTail),
    keyTail: formatPosition(ctx.keyTail),
    state,
    mode: ctx.mode,
    stateReason,
    backingOfflineSince: offlineSince,
    dirtyHighWaterBytes: ctx.dirtyHighWaterBytes,
    readOnly: ctx.readOnly,
    formatVersion: ctx.dev.sb.formatVersion,
    dataCrc: ctx.dataCrc,
    cacheUuid: uuidToString(ctx.dev.sb.cacheUuid),
    segmentSizeBytes: ctx.dev.segmentSizeBytes,
    backingSizeBytes: ctx.dev.sb.backingSizeBytes,
    dirtyBytes: ctx.stats.dirtyBytes,
    reclaimableLogBytes: ctx.dirtyTail.lsn - ctx.keyTail.lsn,
    indexKeys: ctx.index.keyCount,
    indexBytes: ctx.index.storageBytes,
    writeback: {
      active: engine.writeback.active,
      lastError: engine.writeback.lastError,
      failingForMs: failingSince === undefined ? undefined : ctx.timers.now() - failingSince,
      backoffMs: engine.writeback.backoffMs,
      oldestDirtyAgeMs: engine.writeback.oldestDirtyAgeMs,
    },
    gc: { active: engine.gc.active, lastError: engine.gc.lastError, thresholdSegments: ctx.gcThresholdSegments },
    counters: { ...ctx.stats },
  };
}
