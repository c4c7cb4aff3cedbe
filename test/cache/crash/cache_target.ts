// The pcache engine as a crash-simulator target.
//
// Opening formats a blank cache device (1 MiB segments) and recovers anything else, with
// background work off and manual timers, so the harness alone decides when writeback and GC
// run and every replay is exact. abandon() drops the engine as a crash would.
import { Cache } from '../../../src/cache/cache.js';
import type { WritebackOrdering } from '../../../src/cache/cache_tuning.js';
import type { BlockDevice } from '../../../src/device/block_device.js';
import { ManualTimers } from '../../../src/lib/timers.js';
import { MiB } from '../../../src/lib/units.js';
import { cacheDeviceBytesFor } from '../../../src/ondisk/layout.js';
import type { CrashTarget, OpenTarget } from '../../../sim/harness.js';

export interface CacheTargetOptions {
  readonly dataCrc?: boolean;
  readonly gcPercent?: number;
  /** writeback_ordering (default strict). */
  readonly ordering?: WritebackOrdering;
}

/** Cache device bytes for `segments` segments of 1 MiB. */
export function crashCacheBytes(segments: number): number {
  return cacheDeviceBytesFor(segments, MiB);
}

export function cacheTarget(options: CacheTargetOptions = {}): CrashTarget {
  return {
    async open(cacheDevice: BlockDevice, backingDevice: BlockDevice): Promise<OpenTarget> {
      const cache = await Cache.open({
        cacheDevice,
        backingDevice,
        formatIfBlank: {
          segmentSizeBytes: MiB,
          dataCrc: options.dataCrc ?? false,
          gcPercent: options.gcPercent ?? 0,
          cacheUuid: new Uint8Array(16).fill(0x5c),
          formatTimeMs: 0,
        },
        background: false,
        timers: new ManualTimers(),
        tuning: { writebackOrdering: options.ordering ?? 'strict' },
      });
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
        close: () => cache.close(),
        abandon: () => { cache.abandon(); },
      };
    },
  };
}
