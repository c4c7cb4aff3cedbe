// The command Stryker's command runner runs (scripts/mutation/run.mjs): once for the dry run,
// then once per mutant, in a sandbox copy of the tree. Stryker puts every mutant into the
// sources at once, each behind a switch read from __STRYKER_ACTIVE_MUTANT__, so the sandbox
// is compiled once (the first call) and each later call only runs the tests. The test files
// come from PCACHE_MUTATION_TESTS (paths under dist/test, comma-separated); exit status 0 means
// the mutant survived.
import { spawnSync } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';

const marker = 'dist/.mutation-built';
if (!existsSync(marker)) {
  // Instrumented files carry // @ts-nocheck, so type errors there are expected; emitting is what counts.
  spawnSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.json'], { stdio: 'ignore' });
  if (!existsSync('dist/test/ondisk/ondisk.test.js')) {
    console.error('the sandbox did not compile');
    process.exit(2);
  }
  writeFileSync(marker, '');
}
const tests = (process.env.PCACHE_MUTATION_TESTS ?? '').split(',').filter((path) => path !== '');
if (tests.length === 0) {
  console.error('PCACHE_MUTATION_TESTS names no test files');
  process.exit(2);
}
const result = spawnSync(process.execPath, ['--test', '--test-reporter=dot', ...tests.map((path) => `dist/test/${path}`)], { stdio: 'inherit' });
process.exit(result.status ?? 1);
