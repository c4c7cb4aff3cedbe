// Block traces for the cache-policy benchmark: sequences of 4 KiB block numbers to read.
//
// Each trace is a workload the cache-policy issue names, built from a seeded PRNG so a run
// can be repeated: a Zipf popularity over a working set several times the cache, a hot set
// smaller than the cache with periodic scans larger than it, and a working set that moves.
// Popular blocks are scattered over their range by a random permutation: real hot data is
// not one contiguous run, and a contiguous one would reward read-ahead instead of policy.
import { Prng } from '../../sim/prng.js';

export interface Trace {
  readonly name: string;
  /** What the trace models, for the report. */
  readonly description: string;
  /** Block numbers, in request order. */
  readonly blocks: Uint32Array;
}

/** A random permutation of [0, count): Fisher-Yates from the seeded PRNG. */
export function permutation(count: number, prng: Prng): Uint32Array {
  const out = new Uint32Array(count);
  for (let i = 0; i < count; i++) out[i] = i;
  for (let i = count - 1; i > 0; i--) {
    const j = prng.nextInt(i + 1);
    const held = out[i] ?? 0;
    out[i] = out[j] ?? 0;
    out[j] = held;
  }
  return out;
}

/**
 * Samples ranks in [0, count) with P(rank k) proportional to 1 / (k + 1)^alpha, by bisecting
 * the cumulative distribution (one Float64Array of `count` entries).
 */
export class ZipfSampler {
  private readonly cdf: Float64Array;

  constructor(
    readonly count: number,
    readonly alpha: number,
  ) {
    this.cdf = new Float64Array(count);
    let sum = 0;
    for (let k = 0; k < count; k++) {
      sum += 1 / Math.pow(k + 1, alpha);
      this.cdf[k] = sum;
    }
    for (let k = 0; k < count; k++) this.cdf[k] = (this.cdf[k] ?? 0) / sum;
  }

  next(prng: Prng): number {
    const u = prng.nextFloat();
    let lo = 0;
    let hi = this.count - 1;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.cdf[mid] ?? 1) < u) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}

/** Zipf(alpha) over `workingSetBlocks` scattered blocks. */
export function zipfTrace(options: { alpha: number; workingSetBlocks: number; requests: number; seed: number }): Trace {
  const prng = new Prng(options.seed);
  const sampler = new ZipfSampler(options.workingSetBlocks, options.alpha);
  const where = permutation(options.workingSetBlocks, prng);
  const blocks = new Uint32Array(options.requests);
  for (let i = 0; i < options.requests; i++) blocks[i] = where[sampler.next(prng)] ?? 0;
  return {
    name: `zipf-${options.alpha.toFixed(1)}`,
    description: `Zipf alpha ${options.alpha} over ${options.workingSetBlocks} blocks`,
    blocks,
  };
}

/**
 * A hot set read at random (uniformly), interrupted every `scanEveryRequests` by one
 * sequential scan of `scanBlocks` blocks of a cold region after it. Scans are read once each;
 * a policy that admits them flushes the hot set.
 */
export function hotScanTrace(options: { hotBlocks: number; scanBlocks: number; scanEveryRequests: number; requests: number; seed: number }): Trace {
  const prng = new Prng(options.seed);
  const blocks = new Uint32Array(options.requests);
  let scanStart = options.hotBlocks;
  let i = 0;
  let sinceScan = 0;
  while (i < options.requests) {
    if (sinceScan >= options.scanEveryRequests) {
      for (let s = 0; s < options.scanBlocks && i < options.requests; s++) blocks[i++] = scanStart + s;
      // Each scan covers a new cold range: nothing of it is worth keeping.
      scanStart += options.scanBlocks;
      sinceScan = 0;
      continue;
    }
    blocks[i++] = prng.nextInt(options.hotBlocks);
    sinceScan++;
  }
  return {
    name: 'hot+scans',
    description: `uniform over a hot set of ${options.hotBlocks} blocks, a scan of ${options.scanBlocks} new blocks every ${options.scanEveryRequests} requests`,
    blocks,
  };
}

/**
 * Zipf(alpha) over a working set that moves: `phases` phases, each over its own scattered
 * set of `workingSetBlocks` blocks, half of which it shares with the phase before.
 */
export function shiftingTrace(options: { alpha: number; workingSetBlocks: number; phases: number; requests: number; seed: number }): Trace {
  const prng = new Prng(options.seed);
  const sampler = new ZipfSampler(options.workingSetBlocks, options.alpha);
  const blocks = new Uint32Array(options.requests);
  const perPhase = Math.ceil(options.requests / options.phases);
  const step = options.workingSetBlocks / 2;
  for (let phase = 0; phase < options.phases; phase++) {
    const base = phase * step;
    const where = permutation(options.workingSetBlocks, prng);
    for (let i = phase * perPhase; i < Math.min(options.requests, (phase + 1) * perPhase); i++) {
      blocks[i] = base + (where[sampler.next(prng)] ?? 0);
    }
  }
  return {
    name: 'shifting',
    description: `Zipf alpha ${options.alpha} over ${options.workingSetBlocks} blocks, moving by half of them ${options.phases - 1} times`,
    blocks,
  };
}

/** The highest block a trace reads, plus one: the backing device it needs. */
export function blocksSpanned(trace: Trace): number {
  let max = 0;
  for (const block of trace.blocks) if (block > max) max = block;
  return max + 1;
}
