// Shared settings of the crash-consistency suites: the shapes the engine is explored with, and
// how a run reports. Every run prints its seed, a replay command per violation, and a summary
// line with the number of crash states explored and the violations found.
import { runExhaustive, runRandomized, type HarnessReport } from '../../../sim/harness.js';
import type { OpKind, OpWeights } from '../../../sim/workload.js';
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

export function targetName(options: SuiteOptions): string {
  return `pcache${options.dataCrc === true ? '-crc' : ''}-gc${options.gcPercent ?? 0}${options.ordering === 'relaxed' ? '-relaxed' : ''}${options.absorb === true ? '-absorb' : ''}`;
}

function replayCommand(kind: 'exhaustive' | 'randomized', options: SuiteOptions) {
  const flags = [
    `--gc-percent ${options.gcPercent ?? 0}`,
    ...(options.dataCrc === true ? ['--data-crc'] : []),
    ...(options.ordering === 'relaxed' ? ['--ordering relaxed'] : []),
    ...(options.backingAloneCheck === true ? ['--backing-alone-check'] : []),
    ...(options.absorb === true ? ['--absorb'] : []),
  ];
  return (spec: string): string => `npm run test:crash -- --mode ${kind} ${flags.join(' ')} --replay '${spec}'`;
}

/**
 * What the backing device alone must hold at every crash state: a prefix of the flush epochs
 * under strict writeback ordering; nothing promised under relaxed (the cache and backing device
 * together are still checked, and so is the backing device after a drain). `backingAloneCheck`
 * forces the check on, to show that relaxed ordering does break it.
 */
function backingCheck(options: SuiteOptions): boolean {
  return options.backingAloneCheck ?? options.ordering !== 'relaxed';
}

/**
 * Workloads that make writeback absorb overwrites: many writes (some FUA, which makes a kset
 * durable without ending an epoch), few flushes, frequent writeback steps, so rounds often
 * find their window's data superseded by newer keys, in the open epoch and across epochs.
 */
export const absorbWeights: Partial<OpWeights> = { write: 40, fuaWrite: 12, flush: 2, trim: 3, writeZeroes: 3, writeback: 16, gc: 4, read: 8 };
export const absorbKinds: readonly OpKind[] = ['write', 'fuaWrite', 'flush', 'trim', 'writeback'];

/** How a suite runs the target: its options, the raw backing check, and the absorption workloads. */
export type SuiteOptions = CacheTargetOptions & { readonly backingAloneCheck?: boolean; readonly absorb?: boolean };

export function exhaustive(options: SuiteOptions, run: { opsMax: number; shard?: { index: number; count: number }; replay?: string; seed?: number; log?: (line: string) => void }): Promise<HarnessReport> {
  return runExhaustive({
    name: targetName(options),
    target: cacheTarget(options),
    rawBackingCheck: backingCheck(options),
    ...exhaustiveShape,
    opsMax: run.opsMax,
    ...(options.absorb === true ? { kinds: absorbKinds } : {}),
    ...(run.shard !== undefined ? { shard: run.shard } : {}),
    ...(run.replay !== undefined ? { replay: run.replay } : {}),
    ...(run.log !== undefined ? { log: run.log } : {}),
    seed: run.seed ?? 1,
    replayCommand: replayCommand('exhaustive', options),
  });
}

export function randomized(options: SuiteOptions, run: { seed: number; runs: number; segmentsPerRun?: number; opsPerSegment?: number; statesPerCrashPoint?: number; replay?: string; log?: (line: string) => void }): Promise<HarnessReport> {
  return runRandomized({
    name: targetName(options),
    target: cacheTarget(options),
    rawBackingCheck: backingCheck(options),
    ...randomizedShape,
    seed: run.seed,
    runs: run.runs,
    ...(options.absorb === true ? { weights: absorbWeights } : {}),
    segmentsPerRun: run.segmentsPerRun ?? 3,
    opsPerSegment: run.opsPerSegment ?? 300,
    statesPerCrashPoint: run.statesPerCrashPoint ?? 16,
    ...(run.replay !== undefined ? { replay: run.replay } : {}),
    ...(run.log !== undefined ? { log: run.log } : {}),
    replayCommand: replayCommand('randomized', options),
  });
}
