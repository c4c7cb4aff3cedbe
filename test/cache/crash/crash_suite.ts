// Shared settings of the crash-consistency suites: the shapes the engine is explored with, and
// how a run reports. Every run prints its seed, a replay command per violation, and a summary
// line with the number of crash states explored and the violations found. Runs let a crash
// leave the cache device's metadata sectors as garbage (cache_target.ts) unless told not to; a
// run may start from a cache with history (aged_bases.ts).
import { runExhaustive, runRandomized, type HarnessReport } from '../../../sim/harness.js';
import { MiB } from '../../../src/lib/units.js';
import type { OpKind, OpWeights } from '../../../sim/workload.js';
import { agedBase, type BaseName } from './aged_bases.js';
import { cacheMetadataGarbage, cacheTarget, crashCacheBytes, type CacheTargetOptions } from './cache_target.js';

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

/**
 * The randomized runs' profiles. `default`: GC as often as writeback, so it runs under
 * crashes. `pressure`: a working set larger than the cache and GC only when writers wait for
 * space (its weight 0: a writer out of space kicks it), so every GC round frees segments that
 * waiting writers take at once, and the keys GC passed are still the newest of their ranges
 * (a segment reused too early shows as wrong data). `reads`: mostly reads, eight in flight,
 * over blocks few writes touch, so that misses fill the cache while other reads of the same
 * blocks are in flight and meet their placeholders (a placeholder served as a hit shows as
 * wrong data); writes, trims and GC keep changing what the fills must not bring back.
 */
export const randomizedProfiles = {
  default: { shape: randomizedShape, weights: { gc: 10 } as Partial<OpWeights> },
  pressure: {
    // Megabytes read after every recovery: no crashes during recovery here (the other runs have them).
    shape: { cacheSizeBytes: crashCacheBytes(4), backingSizeBytes: 4 * MiB, blockCount: 1024, extentBlocksMax: 16, recoveryCrashes: false },
    weights: { write: 60, fuaWrite: 3, flush: 4, trim: 1, writeZeroes: 1, writeback: 3, gc: 0, read: 5 } as Partial<OpWeights>,
  },
  reads: {
    shape: randomizedShape,
    weights: { write: 8, fuaWrite: 1, flush: 3, trim: 2, writeZeroes: 1, writeback: 4, gc: 4, read: 60 } as Partial<OpWeights>,
  },
} as const;
export type RandomizedProfile = keyof typeof randomizedProfiles;
export const randomizedProfileNames = Object.keys(randomizedProfiles) as RandomizedProfile[];

export function targetName(options: SuiteOptions): string {
  return `pcache${options.dataCrc === true ? '-crc' : ''}-gc${options.gcPercent ?? 0}${options.ordering === 'relaxed' ? '-relaxed' : ''}${options.absorb === true ? '-absorb' : ''}${options.rewritePieces !== undefined ? `-rewrite${options.rewritePieces}` : ''}${options.asyncCache === true ? '-async' : ''}`;
}

function replayCommand(kind: 'exhaustive' | 'randomized', options: SuiteOptions, base: BaseName | undefined, profile: RandomizedProfile = 'default') {
  const flags = [
    `--gc-percent ${options.gcPercent ?? 0}`,
    ...(options.dataCrc === true ? ['--data-crc'] : []),
    ...(options.ordering === 'relaxed' ? ['--ordering relaxed'] : []),
    ...(options.backingAloneCheck === true ? ['--backing-alone-check'] : []),
    ...(options.absorb === true ? ['--absorb'] : []),
    ...(options.rewritePieces !== undefined ? [`--rewrite-pieces ${options.rewritePieces}`] : []),
    ...(options.asyncCache === true ? ['--async-cache'] : []),
    ...(base === undefined ? [] : [`--base ${base}`]),
    ...(profile === 'default' ? [] : [`--profile ${profile}`]),
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
export type SuiteOptions = CacheTargetOptions & {
  readonly backingAloneCheck?: boolean;
  readonly absorb?: boolean;
  /** The cache device completes its I/O later, not within the call (HarnessOptions.cacheBlocking). */
  readonly asyncCache?: boolean;
};

export interface ExhaustiveRun {
  readonly opsMax: number;
  readonly shard?: { index: number; count: number };
  readonly replay?: string;
  readonly seed?: number;
  readonly log?: (line: string) => void;
  readonly base?: BaseName;
  /** Chosen workloads instead of every one of up to opsMax operations. */
  readonly workloads?: readonly string[];
  /** Blocks the workloads address (default: the exhaustive shape's 2). */
  readonly blockCount?: number;
  /** Metadata writes may be left as garbage (default true; the largest tier leaves them out to fit the time budget). */
  readonly garbage?: boolean;
  /** Crash at every prefix of recovery's own writes too (default true; a base whose every recovery replays megabytes leaves it out). */
  readonly recoveryCrashes?: boolean;
  readonly violationsMax?: number;
}

export function exhaustive(options: SuiteOptions, run: ExhaustiveRun): Promise<HarnessReport> {
  const shape = { ...exhaustiveShape, ...(run.blockCount !== undefined ? { blockCount: run.blockCount } : {}) };
  return runExhaustive({
    name: targetName(options),
    target: cacheTarget(options),
    rawBackingCheck: backingCheck(options),
    ...(options.asyncCache === true ? { cacheBlocking: false } : {}),
    ...shape,
    ...(run.garbage === false ? {} : { garbage: cacheMetadataGarbage(shape.cacheSizeBytes) }),
    opsMax: run.opsMax,
    ...(options.absorb === true ? { kinds: absorbKinds } : {}),
    ...(run.shard !== undefined ? { shard: run.shard } : {}),
    ...(run.replay !== undefined ? { replay: run.replay } : {}),
    ...(run.log !== undefined ? { log: run.log } : {}),
    ...(run.workloads !== undefined ? { workloads: run.workloads } : {}),
    ...(run.violationsMax !== undefined ? { violationsMax: run.violationsMax } : {}),
    ...(run.recoveryCrashes !== undefined ? { recoveryCrashes: run.recoveryCrashes } : {}),
    ...(run.base !== undefined ? { base: agedBase(run.base, { ...shape, workloadSectors: (shape.blockCount * 4096) / 512 }, options) } : {}),
    seed: run.seed ?? 1,
    replayCommand: replayCommand('exhaustive', options, run.base),
  });
}

export interface RandomizedRun {
  readonly seed: number;
  readonly runs: number;
  readonly segmentsPerRun?: number;
  readonly opsPerSegment?: number;
  readonly statesPerCrashPoint?: number;
  readonly crashPointsPerSegment?: number;
  readonly preSyncCrashPointsPerSegment?: number;
  readonly replay?: string;
  readonly log?: (line: string) => void;
  readonly base?: BaseName;
  readonly violationsMax?: number;
  /** Default: 'default'. */
  readonly profile?: RandomizedProfile;
}

export function randomized(options: SuiteOptions, run: RandomizedRun): Promise<HarnessReport> {
  const profile = run.profile ?? 'default';
  const { shape, weights } = randomizedProfiles[profile];
  return runRandomized({
    name: targetName(options),
    target: cacheTarget(options),
    rawBackingCheck: backingCheck(options),
    ...(options.asyncCache === true ? { cacheBlocking: false } : {}),
    ...shape,
    garbage: cacheMetadataGarbage(shape.cacheSizeBytes),
    weights: options.absorb === true ? absorbWeights : weights,
    seed: run.seed,
    runs: run.runs,
    segmentsPerRun: run.segmentsPerRun ?? 3,
    opsPerSegment: run.opsPerSegment ?? 300,
    statesPerCrashPoint: run.statesPerCrashPoint ?? 16,
    crashPointsPerSegment: run.crashPointsPerSegment ?? 4,
    preSyncCrashPointsPerSegment: run.preSyncCrashPointsPerSegment ?? 4,
    ...(run.replay !== undefined ? { replay: run.replay } : {}),
    ...(run.log !== undefined ? { log: run.log } : {}),
    ...(run.violationsMax !== undefined ? { violationsMax: run.violationsMax } : {}),
    ...(run.base !== undefined ? { base: agedBase(run.base, { ...shape, workloadSectors: (shape.blockCount * 4096) / 512 }, options) } : {}),
    replayCommand: replayCommand('randomized', options, run.base, profile),
  });
}
