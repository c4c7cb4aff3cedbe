// The event loop's delay inside `pcache serve`, for bench/volumes_bench.ts (PCACHE_BENCH_LOOP_PROBE=1):
// preloaded into the server with NODE_OPTIONS=--import, it samples the loop with
// perf_hooks.monitorEventLoopDelay (a 1 ms timer; each value is the time between two ticks, so
// 1 ms means no delay). On SIGUSR2 it appends one JSON line to PCACHE_LOOP_PROBE_FILE with the
// percentiles since the previous SIGUSR2, and starts over. Nothing happens without that variable.
// Bench-only: pcache itself never loads this file.

import { appendFileSync } from 'node:fs';
import { monitorEventLoopDelay } from 'node:perf_hooks';

const file = process.env.PCACHE_LOOP_PROBE_FILE;
if (file !== undefined && file !== '') {
  const histogram = monitorEventLoopDelay({ resolution: 1 });
  histogram.enable();
  process.on('SIGUSR2', () => {
    const ms = (ns: number): number => ns / 1e6;
    appendFileSync(file, `${JSON.stringify({ p50Ms: ms(histogram.percentile(50)), p99Ms: ms(histogram.percentile(99)), maxMs: ms(histogram.max) })}\n`);
    histogram.reset();
  });
}
