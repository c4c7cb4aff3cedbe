// The pcache engine as a crash-simulator target.
//
// Opening formats a blank cache device (1 MiB segments) and recovers anything else, with
// background work off and manual timers, so the harness alone decides when writeback and GC
// run and every replay is exact. abandon() drops the engine as a crash would.
// Also here: which writes of the cache device a crash may leave as garbage (its metadata
// records, each kept twice in sectors of their own: docs/format.md).
import { Cache, type CacheStatus } from '../../../src/cache/cache.js';
import type { WritebackOrdering } from '../../../src/cache/cache_tuning.js';
import type { BlockDevice } from '../../../src/device/block_device.js';
import { ManualTimers } from '../../../src/lib/timers.js';
import { MiB } from '../../../src/lib/units.js';
import { cacheDeviceBytesFor, lastBlockOffsetBytes, segmentDataOffsetBytes, segmentsOffsetBytes } from '../../../src/ondisk/layout.js';
import type { VolatileWrite } from '../../../sim/device_model.js';
import type { CrashTarget, OpenTarget } from '../../../sim/harness.js';

export interface CacheTargetOptions {
  readonly dataCrc?: boolean;
  readonly gcPercent?: number;
  /** writeback_ordering (default strict). */
  readonly ordering?: WritebackOrdering;
  /** fragmented_rewrite_pieces (default: the engine's, which the simulator's small reads never reach). */
  readonly rewritePieces?: number;
  /** Hears every opened cache's counters when it is closed or abandoned (a test adds them up). */
  readonly onCounters?: (counters: CacheStatus['counters']) => void;
}

/** The simulator's segment size: the smallest the format allows, so logs wrap soonest. */
export const crashSegmentBytes = MiB;

/** Cache device bytes for `segments` segments of 1 MiB. */
export function crashCacheBytes(segments: number): number {
  return cacheDeviceBytesFor(segments, crashSegmentBytes);
}

/** Opens (formatting a blank device) the way the crash target does: background work off, manual timers. */
export function openCache(cacheDevice: BlockDevice, backingDevice: BlockDevice, options: CacheTargetOptions = {}): Promise<Cache> {
  return Cache.open({
    cacheDevice,
    backingDevice,
    formatIfBlank: {
      segmentSizeBytes: crashSegmentBytes,
      dataCrc: options.dataCrc ?? false,
      gcPercent: options.gcPercent ?? 0,
      cacheUuid: new Uint8Array(16).fill(0x5c),
      formatTimeMs: 0,
    },
    background: false,
    timers: new ManualTimers(),
    tuning: { writebackOrdering: options.ordering ?? 'strict', ...(options.rewritePieces !== undefined ? { fragmentedRewritePieces: options.rewritePieces } : {}) },
  });
}

export function cacheTarget(options: CacheTargetOptions = {}): CrashTarget {
  return {
    async open(cacheDevice: BlockDevice, backingDevice: BlockDevice): Promise<OpenTarget> {
      const cache = await openCache(cacheDevice, backingDevice, options);
      return {
        read: (target, offset) => cache.read(target, offset),
        write: (source, offset, writeOptions) => cache.write(source, offset, writeOptions),
        flush: () => cache.flush(),
        trim: (offset, length, writeOptions) => cache.trim(offset, length, writeOptions),
        writeZeroes: (offset, length, zeroOptions) => cache.writeZeroes(offset, length, zeroOptions),
        writebackStep: async () => { await cache.writebackStep(); },
        gcStep: async () => { await cache.gcStep(); },
        drain: () => cache.drain(),
        check: () => cache.check(),
        close: () => {
          options.onCounters?.(cache.status().counters);
          return cache.close();
        },
        abandon: () => {
          options.onCounters?.(cache.status().counters);
          cache.abandon();
        },
      };
    },
  };
}

/**
 * Whether a write of a cache device of `cacheSizeBytes` (1 MiB segments) lies in its metadata:
 * the first 20 KiB (tails, superblock, cache_info), each segment's first 12 KiB (seg_info,
 * generation) and the superblock copy in the last 4 KiB block. Every record there is kept
 * twice, each copy in a sector of its own, so the design survives any one sector of them
 * being garbage; the log and the data rely on sector writes being old-or-new (a kset shares
 * its sectors with its neighbours).
 */
export function isCacheMetadataWrite(cacheSizeBytes: number, write: { offsetBytes: number; lengthBytes: number }): boolean {
  const start = write.offsetBytes;
  const end = start + write.lengthBytes;
  if (end <= segmentsOffsetBytes) return true;
  if (start >= lastBlockOffsetBytes(cacheSizeBytes)) return true;
  const inSegment = (start - segmentsOffsetBytes) % crashSegmentBytes;
  return start >= segmentsOffsetBytes && inSegment + write.lengthBytes <= segmentDataOffsetBytes;
}

/** The harness's garbage option for the pcache target: metadata writes of the cache device. */
export function cacheMetadataGarbage(cacheSizeBytes: number): (device: string, write: VolatileWrite) => boolean {
  return (device, write) => device === 'cache' && isCacheMetadataWrite(cacheSizeBytes, write);
}
