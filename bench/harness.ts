// Tiny benchmark harness: repeated runs, medians, ratios against a peer measured in the same
// process, and a smoke mode (PCACHE_BENCH_SMOKE=1) with tiny parameters so every benchmark
// also runs in the test suite and cannot rot. Results print as aligned text and, with
// PCACHE_BENCH_JSON=path, append one JSON line per result.
import { appendFileSync } from 'node:fs';

export const smoke = process.env.PCACHE_BENCH_SMOKE === '1';

/** A parameter with a smoke value (test runs) and a real value (npm run bench). */
export function param<T>(smokeValue: T, realValue: T): T {
  return smoke ? smokeValue : realValue;
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? 0) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

/** Runs `fn` `runs` times (after one warm-up) and returns the median of what it returns. */
export async function medianOf(runs: number, fn: () => number | Promise<number>): Promise<number> {
  await fn();
  const values: number[] = [];
  for (let i = 0; i < runs; i++) values.push(await fn());
  return median(values);
}

export interface Result {
  readonly bench: string;
  readonly metric: string;
  readonly value: number;
  readonly unit: string;
  readonly peer?: string;
  readonly peerValue?: number;
}

export function report(result: Result): void {
  const ratio = result.peerValue !== undefined && result.peerValue !== 0 ? result.value / result.peerValue : undefined;
  const peer = result.peer !== undefined && result.peerValue !== undefined
    ? `  ${result.peer}: ${format(result.peerValue)} ${result.unit}  ratio ${ratio?.toFixed(2) ?? '-'}`
    : '';
  console.log(`${result.bench.padEnd(22)} ${result.metric.padEnd(34)} ${format(result.value).padStart(12)} ${result.unit}${peer}`);
  const file = process.env.PCACHE_BENCH_JSON;
  if (file !== undefined) appendFileSync(file, `${JSON.stringify({ ...result, ratio })}\n`);
}

function format(value: number): string {
  if (value >= 1000) return Math.round(value).toLocaleString('en-US');
  return value.toFixed(value >= 10 ? 1 : 2);
}

export function gc(): void {
  const collect = (globalThis as { gc?: () => void }).gc;
  if (collect === undefined) throw new Error('run benchmarks with node --expose-gc (npm run bench does)');
  collect();
  collect();
}

export function heapBytes(): number {
  gc();
  const usage = process.memoryUsage();
  return usage.heapUsed + usage.arrayBuffers;
}
