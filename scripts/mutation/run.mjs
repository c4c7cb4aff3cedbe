// Mutation testing of the crash-critical code with StrykerJS (its command runner), outside
// `npm test`: `npm run test:mutation -- [--scope ondisk|cache|ondisk-all|cache-all|gc-sim|absorb|index] [--mutate GLOBS] [--concurrency N]`.
// Each scope names the files mutated and the tests run against every mutant (docs/testing.md,
// "Mutation testing"): the tests that target that code and finish in seconds, since each
// mutant costs one run of them. The report goes to reports/mutation/<scope>.json and the
// score table and surviving mutants to standard output.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

const unitTests = ['ondisk/ondisk.test.js', 'cache/cache_recovery.test.js'];
const cacheTests = [...unitTests, 'cache/cache_writeback_gc.test.js'];
const cacheAll = ['cache_dev', 'cache_metadata', 'cache_segment', 'cache_kset', 'cache_replay', 'cache_gc', 'cache_writeback'].map((name) => `src/cache/${name}.ts`);
/**
 * What each scope mutates and which tests run against every mutant. `ondisk` and `cache` are
 * what a shared two-core machine gets through in well under an hour: the records a crash can
 * tear (kset, generation, tail positions, the dual-copy header) and the three modules that
 * order segment reuse (the free pool and its generations, GC). The `-all` scopes take every file named in
 * issue 19 and need hours there.
 */
const scopes = {
  ondisk: { mutate: ['kset', 'segment_gen', 'cache_pos', 'meta_header'].map((name) => `src/ondisk/${name}.ts`), tests: unitTests },
  cache: { mutate: ['src/cache/cache_segment.ts'], tests: ['cache/cache_recovery.test.js', 'cache/cache_writeback_gc.test.js'] },
  'ondisk-all': { mutate: ['src/ondisk/**/*.ts'], tests: unitTests },
  'cache-all': { mutate: cacheAll, tests: cacheTests },
  // GC's round (what it passes, when key_tail is persisted, what it frees) against the crash
  // simulator's GC file alone: is the simulator, not the unit tests, a net for it?
  'gc-sim': { mutate: ['src/cache/cache_gc.ts:106-116'], tests: ['cache/crash/crash_gc.test.js'] },
  // Issue 16's shortcuts: writeback's plan from the live index (what it skips as superseded),
  // the gathered read and the rewrite of fragmented dirty data, against their unit tests and
  // the crash file that runs writeback under both orderings (about 8 s per mutant).
  absorb: {
    mutate: ['cache_writeback_plan', 'cache_read_gather', 'cache_read_rewrite'].map((name) => `src/cache/${name}.ts`),
    tests: ['cache/cache_writeback_absorb.test.js', 'cache/cache_read_gather.test.js', 'cache/cache_read_rewrite.test.js', 'cache/crash/crash_absorb.test.js'],
  },
  // The range index every read, write, writeback plan and GC round goes through: the overlap
  // cases of insert, the subtrees' rows, stale entries and sweeps, against the index's own
  // tests (explicit overlap cases and a per-sector model under random inserts).
  index: { mutate: ['src/cache/cache_tree.ts', 'src/cache/cache_index.ts'], tests: ['cache/cache_tree.test.js'] },
};

const { values } = parseArgs({
  options: {
    scope: { type: 'string', default: 'ondisk' },
    mutate: { type: 'string' },
    concurrency: { type: 'string', default: '2' },
  },
});
const scope = scopes[values.scope];
if (scope === undefined) {
  console.error(`--scope must be one of ${Object.keys(scopes).join(', ')}`);
  process.exit(2);
}
// The shared settings plus this scope's files and report name, as a config of its own.
const config = JSON.parse(readFileSync('scripts/mutation/stryker.config.json', 'utf8'));
delete config.$schema;
config.mutate = values.mutate?.split(',') ?? scope.mutate;
config.concurrency = Number(values.concurrency);
config.jsonReporter = { fileName: `reports/mutation/${values.scope}.json` };
// A sandbox folder per scope: two scopes may run at once, and each cleans up its own.
config.tempDirName = `.stryker-tmp/${values.scope}`;
mkdirSync('reports/mutation', { recursive: true });
const configPath = `reports/mutation/${values.scope}.config.json`;
writeFileSync(configPath, `${JSON.stringify(config, null, 2)}\n`);
const result = spawnSync(process.execPath, ['node_modules/@stryker-mutator/core/bin/stryker.js', 'run', configPath], {
  stdio: 'inherit',
  env: { ...process.env, PCACHE_MUTATION_TESTS: scope.tests.join(',') },
});
process.exit(result.status ?? 1);
