// The pcache engine as a crash-simulator target in a write mode other than writeback, with the
// sequential cutoff, or switching modes (cache_policy.ts), beside cache_target.ts.
//
// As cache_target.ts: 1 MiB segments, background work off, manual timers. Options:
// - mode: the mode set after opening (stored in cache_info, so recovery opens in it too);
// - sequentialCutoffBytes: the cutoff (default 0: off, the streams of the simulator's workloads
//   are short);
// - switchModes: every writeback step of the workload first switches to the next mode of
//   writeback -> writethrough -> writearound -> passthrough -> writeback, so crashes land
//   before, during and after every switch, with dirty data in the cache;
// - loseCacheDevice: recovery formats the cache device again before opening, as if it had been
//   lost: what the oracle then reads is the backing device alone, so every write acknowledged
//   before a FLUSH (or with FUA) must be there. That is the guarantee of writethrough,
//   writearound and passthrough (docs/operations.md), checked at every crash state.
import { Cache, type CacheMode } from '../../../src/cache/cache.js';
import type { BlockDevice } from '../../../src/device/block_device.js';
import { ManualTimers } from '../../../src/lib/timers.js';
import { MiB } from '../../../src/lib/units.js';
import type { CrashTarget, OpenTarget } from '../../../sim/harness.js';

export interface ModesTargetOptions {
  readonly mode?: CacheMode;
  readonly sequentialCutoffBytes?: number;
  readonly switchModes?: boolean;
  readonly loseCacheDevice?: boolean;
}

const cycle: readonly CacheMode[] = ['writeback', 'writethrough', 'writearound', 'passthrough'];

export function modesTargetName(options: ModesTargetOptions): string {
  return `pcache-${options.switchModes === true ? 'switching' : options.mode ?? 'writeback'}` +
    `${options.sequentialCutoffBytes !== undefined ? `-cutoff${options.sequentialCutoffBytes}` : ''}${options.loseCacheDevice === true ? '-cache-lost' : ''}`;
}

async function holdsSomething(device: BlockDevice): Promise<boolean> {
  const head = new Uint8Array(4096);
  await device.read(head, 0);
  return head.some((byte) => byte !== 0);
}

export function modesTarget(options: ModesTargetOptions): CrashTarget {
  const format = { segmentSizeBytes: MiB, dataCrc: false, gcPercent: 0, cacheUuid: new Uint8Array(16).fill(0x5c), formatTimeMs: 0 };
  return {
    async open(cacheDevice: BlockDevice, backingDevice: BlockDevice): Promise<OpenTarget> {
      const recovering = await holdsSomething(cacheDevice);
      if (recovering && options.loseCacheDevice === true) await Cache.format(cacheDevice, backingDevice, format);
      const cache = await Cache.open({ cacheDevice, backingDevice, formatIfBlank: format, background: false, timers: new ManualTimers() });
      cache.setTuning({ sequentialCutoffBytes: options.sequentialCutoffBytes ?? 0 });
      // A fresh cache (or a lost one) starts in the mode asked for; a recovered one keeps its own.
      if (options.mode !== undefined && (!recovering || options.loseCacheDevice === true)) await cache.setMode(options.mode);
      return {
        read: (target, offset) => cache.read(target, offset),
        write: (source, offset, writeOptions) => cache.write(source, offset, writeOptions),
        flush: () => cache.flush(),
        trim: (offset, length, writeOptions) => cache.trim(offset, length, writeOptions),
        writeZeroes: (offset, length, zeroOptions) => cache.writeZeroes(offset, length, zeroOptions),
        writebackStep: async () => {
          if (options.switchModes === true) await cache.setMode(cycle[(cycle.indexOf(cache.mode) + 1) % cycle.length] ?? 'writeback');
          await cache.writebackStep();
        },
        gcStep: async () => { await cache.gcStep(); },
        drain: () => cache.drain(),
        check: () => cache.check(),
        close: () => cache.close(),
        abandon: () => { cache.abandon(); },
      };
    },
  };
}
