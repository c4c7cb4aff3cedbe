// Runs a compiled benchmark (dist/bench/NAME_bench.js) in smoke mode (PCACHE_BENCH_SMOKE=1:
// tiny sizes, seconds) in a child process, for the test/bench/*_smoke tests that keep the
// benchmarks from rotting. Figures are never judged: tests do not time anything.

import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { cliEnv } from './pcache.js';

export interface BenchRun {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** `node dist/bench/<name>_bench.js` with PCACHE_BENCH_SMOKE=1 and `env`; never rejects. */
export function runBenchSmoke(name: string, env: Record<string, string> = {}, timeoutMs = 120_000): Promise<BenchRun> {
  const benchPath = fileURLToPath(new URL(`../../bench/${name}_bench.js`, import.meta.url));
  return new Promise((resolve) => {
    execFile(process.execPath, [benchPath], { env: cliEnv({ PCACHE_BENCH_SMOKE: '1', ...env }), timeout: timeoutMs, encoding: 'utf8' }, (error, stdout, stderr) => {
      resolve({ code: error === null ? 0 : typeof error.code === 'number' ? error.code : -1, stdout, stderr });
    });
  });
}
