// Runs the compiled benchmarks under dist/bench (each in its own node process, with --expose-gc).
// Usage: node scripts/run_bench.mjs [name ...]   e.g. `npm run bench -- index engine`
// Environment: PCACHE_BENCH_SMOKE=1 for tiny parameters; PCACHE_BENCH_JSON=file to collect results.
import { readdirSync } from 'node:fs';
import { spawnSync } from 'node:child_process';

const wanted = process.argv.slice(2);
const files = readdirSync('dist/bench')
  .filter((f) => f.endsWith('_bench.js'))
  .filter((f) => wanted.length === 0 || wanted.some((w) => f.startsWith(w)))
  .sort();
if (files.length === 0) {
  console.error(`no benchmarks match ${wanted.join(', ')}`);
  process.exit(1);
}
let status = 0;
for (const file of files) {
  console.log(`\n== ${file.replace(/_bench\.js$/, '')}`);
  const result = spawnSync(process.execPath, ['--expose-gc', `dist/bench/${file}`], { stdio: 'inherit' });
  if (result.status !== 0) status = result.status ?? 1;
}
process.exit(status);
