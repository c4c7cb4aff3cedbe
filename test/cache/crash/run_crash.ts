// `npm run test:crash -- [--states N] [--seed S] [--mode randomized|exhaustive] [--ops N]
//                        [--gc-percent P] [--data-crc] [--ordering strict|relaxed]
//                        [--backing-alone-check] [--absorb] [--rewrite-pieces N] [--async-cache] [--base NAME] [--workloads W;W;...]
//                        [--blocks N] [--shard I/N] [--profile default|pressure] [--no-recovery-crashes]
//                        [--replay SPEC]`
// --absorb runs workloads made to make writeback skip superseded data (crash_suite.ts).
// --rewrite-pieces sets fragmented_rewrite_pieces, so reads of that many dirty pieces are
// stored again as one (cache_read_rewrite.ts; the simulator's reads cover at most 16 blocks).
// --async-cache makes the cache device complete its I/O later instead of within the call.
// --ordering sets writeback_ordering; under relaxed the raw backing device is not required to
// hold a prefix of the flush epochs unless --backing-alone-check asks for it anyway.
//
// Deeper crash-consistency runs than the test tier. Randomized mode runs seeded runs (seed S,
// S+1, ...) until at least N crash states have been explored; exhaustive mode enumerates every
// workload of up to --ops operations (or runs the chosen --workloads, separated by ';');
// --shard I/N runs only the workloads whose index in the enumeration is I modulo N (the deep
// run splits long enumerations into chunks this way).
// --base starts from a cache with history (aged_bases.ts: log-end, stranded,
// divergent-tails, log-full); --profile pressure runs randomized workloads on a cache that
// fills up (crash_suite.ts). --no-recovery-crashes leaves out the crashes at every prefix of
// recovery's own writes (for bases whose every recovery replays megabytes). Prints the states
// explored and the violations found, and exits 1 if there was any violation. --replay reruns
// exactly one printed spec.
import { parseArgs } from 'node:util';
import { baseNames, type BaseName } from './aged_bases.js';
import { exhaustive, randomized, randomizedProfileNames, type RandomizedProfile } from './crash_suite.js';

const { values } = parseArgs({
  options: {
    states: { type: 'string', default: '20000' },
    seed: { type: 'string', default: '1' },
    mode: { type: 'string', default: 'randomized' },
    ops: { type: 'string', default: '3' },
    'gc-percent': { type: 'string', default: '0' },
    'data-crc': { type: 'boolean', default: false },
    ordering: { type: 'string', default: 'strict' },
    'backing-alone-check': { type: 'boolean', default: false },
    absorb: { type: 'boolean', default: false },
    'rewrite-pieces': { type: 'string' },
    'async-cache': { type: 'boolean', default: false },
    base: { type: 'string' },
    workloads: { type: 'string' },
    blocks: { type: 'string' },
    profile: { type: 'string', default: 'default' },
    'no-recovery-crashes': { type: 'boolean', default: false },
    shard: { type: 'string' },
    replay: { type: 'string' },
  },
});
if (values.ordering !== 'strict' && values.ordering !== 'relaxed') throw new Error(`--ordering takes strict or relaxed, got ${values.ordering}`);
const ordering: 'strict' | 'relaxed' = values.ordering === 'relaxed' ? 'relaxed' : 'strict';
const base = values.base as BaseName | undefined;
if (base !== undefined && !baseNames.includes(base)) {
  console.error(`--base must be one of ${baseNames.join(', ')}`);
  process.exit(2);
}
const profile = values.profile as RandomizedProfile;
if (!randomizedProfileNames.includes(profile)) {
  console.error(`--profile must be one of ${randomizedProfileNames.join(', ')}`);
  process.exit(2);
}
const shardMatch = values.shard === undefined ? undefined : /^(\d+)\/(\d+)$/.exec(values.shard);
if (values.shard !== undefined && (shardMatch === undefined || shardMatch === null || Number(shardMatch[1]) >= Number(shardMatch[2]))) {
  console.error(`--shard takes I/N with I < N (workloads whose index is I modulo N), got ${values.shard}`);
  process.exit(2);
}
const shard = shardMatch === undefined || shardMatch === null ? undefined : { index: Number(shardMatch[1]), count: Number(shardMatch[2]) };
const target = {
  gcPercent: Number(values['gc-percent']),
  dataCrc: values['data-crc'],
  ordering,
  ...(values['backing-alone-check'] ? { backingAloneCheck: true } : {}),
  ...(values.absorb ? { absorb: true } : {}),
  ...(values['rewrite-pieces'] !== undefined ? { rewritePieces: Number(values['rewrite-pieces']) } : {}),
  ...(values['async-cache'] ? { asyncCache: true } : {}),
};
const log = (line: string): void => { console.log(line); };
let explored = 0;
let violations = 0;
const started = performance.now();
if (values.mode === 'exhaustive') {
  const report = await exhaustive(target, {
    opsMax: Number(values.ops),
    seed: Number(values.seed),
    log,
    ...(values.replay !== undefined ? { replay: values.replay } : {}),
    ...(base !== undefined ? { base } : {}),
    ...(values.workloads !== undefined ? { workloads: values.workloads.split(';') } : {}),
    ...(values.blocks !== undefined ? { blockCount: Number(values.blocks) } : {}),
    ...(values['no-recovery-crashes'] ? { recoveryCrashes: false } : {}),
    ...(shard !== undefined ? { shard } : {}),
  });
  explored = report.statesExplored;
  violations = report.violationsTotal;
} else {
  const wanted = Number(values.states);
  const replaySeed = values.replay !== undefined ? /seed=(\d+)/.exec(values.replay)?.[1] : undefined;
  let seed = Number(replaySeed ?? values.seed);
  do {
    const report = await randomized(target, { seed, runs: 1, log, ...(values.replay !== undefined ? { replay: values.replay } : {}), ...(base !== undefined ? { base } : {}), profile });
    explored += report.statesExplored;
    violations += report.violationsTotal;
    seed++;
  } while (values.replay === undefined && explored < wanted);
}
// CPU time as well as wall time: on a shared machine only the first says what a state costs.
const cpu = process.cpuUsage();
console.log(`crash run: ${explored} crash states explored, ${violations} violations, ${((performance.now() - started) / 1000).toFixed(0)} s, ${((cpu.user + cpu.system) / 1e6).toFixed(1)} s of CPU`);
process.exit(violations === 0 ? 0 : 1);
