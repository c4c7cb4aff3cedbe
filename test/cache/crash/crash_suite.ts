// Shared settings of the crash-consistency suites: the shapes the engine is explored with, and
// how a run reports. Every run prints its seed, a replay command per violation, and a summary
// line with the number of crash states explored and the violations found.
import { runExhaustive, runRandomized, type HarnessReport } from '../../../sim/harness.js';
import { cacheTarget, crashCacheBytes, type CacheTargetOptions } from './cache_target.js';

export const exhaustiveShape = {
  cacheSizeBytes: crashCacheBytes(4),
  backingSizeBytes: 64 * 1024,
  blockCount: 2,
  valueCount: 2,
} as const;

export const randomizedShape = {
  cacheSizeBytes: crashCacheBytes(5),
  backingSizeBytes: 512 * 1024, // twice what the workload addresses: stray writes show too
  blockCount: 64,
  extentBlocksMax: 16,
} as const;

export function targetName(options: CacheTargetOptions): string {
  return `pcache${options.dataCrc === true ? '-crc' : ''}-gc${options.gcPercent ?? 0}${options.ordering === 'relaxed' ? '-relaxed' : ''}`;
}

function replayCommand(kind: 'exhaustive' | 'randomized', options: CacheTargetOptions) {
  return (spec: string): string =>
    `npm run test:crash -- --mode ${kind} --gc-percent ${options.gcPercent ?? 0}${options.dataCrc === true ? ' --data-crc' : ''}${options.ordering === 'relaxed' ? ' --ordering relaxed' : ''} --replay '${spec}'`;
}

/**
 * What the backing device alone must hold at every crash state: a prefix of the flush epochs
 * under strict writeback ordering; nothing promised under relaxed (the cache and backing device
 * together are still checked, and so is the backing device after a drain). `backingAloneCheck`
 * forces the check on, to show that relaxed ordering does break it.
 */
function backingCheck(options: CacheTargetOptions & { backingAloneCheck?: boolean }): boolean {
  return options.backingAloneCheck ?? options.ordering !== 'relaxed';
}

export function exhaustive(options: CacheTargetOptions & { backingAloneCheck?: boolean }, run: { opsMax: number; shard?: { index: number; count: number }; replay?: string; seed?: number; log?: (line: string) => void }): Promise<HarnessReport> {
  return runExhaustive({
    name: targetName(options),
    target: cacheTarget(options),
    rawBackingCheck: backingCheck(options),
    ...exhaustiveShape,
    opsMax: run.opsMax,
    ...(run.shard !== undefined ? { shard: run.shard } : {}),
    ...(run.replay !== undefined ? { replay: run.replay } : {}),
    ...(run.log !== undefined ? { log: run.log } : {}),
    seed: run.seed ?? 1,
    replayCommand: replayCommand('exhaustive', options),
  });
}

export function randomized(options: CacheTargetOptions & { backingAloneCheck?: boolean }, run: { seed: number; runs: number; segmentsPerRun?: number; opsPerSegment?: number; statesPerCrashPoint?: number; replay?: string; log?: (line: string) => void }): Promise<HarnessReport> {
  return runRandomized({
    name: targetName(options),
    target: cacheTarget(options),
    rawBackingCheck: backingCheck(options),
    ...randomizedShape,
    seed: run.seed,
    runs: run.runs,
    segmentsPerRun: run.segmentsPerRun ?? 3,
    opsPerSegment: run.opsPerSegment ?? 300,
    statesPerCrashPoint: run.statesPerCrashPoint ?? 16,
    ...(run.replay !== undefined ? { replay: run.replay } : {}),
    ...(run.log !== undefined ? { log: run.log } : {}),
    replayCommand: replayCommand('randomized', options),
  });
}
