// Per-second series of a sustained write run, shared by the benchmarks that draw them
// (bench/sustained_bench.ts against a delayed nbdkit, bench/rbd_sustained.ts against Ceph RBD):
// fio's per-I/O latency log cut into seconds (writes completed, p50/p99/max), pcache's status
// sampled once a second from its control socket (dirty bytes, writeback and GC counters) with the
// server's CPU time, and the per-second rates derived from those samples. Nothing here starts a
// process or prints; the benchmarks own their runs and their output.

import { createReadStream, readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { controlRequest } from '../src/cli/control_client.js';

const MiB = 1024 * 1024;
/** Clock ticks per second of /proc/PID/stat's CPU times (USER_HZ, 100 on Linux). */
export const userHz = 100;

export interface Counters {
  writeRequests: number;
  writeBytes: number;
  writebackBytes: number;
  writebackBackingBytes?: number;
  writebackBackingWrites?: number;
  writebackRounds: number;
  gcSegmentsFreed: number;
}

export interface Status {
  cache: { dirtyBytes: number; segsUsed: number; segTotal: number; segmentSizeBytes: number; counters: Counters };
}

export interface Sample {
  readonly atMs: number;
  readonly status: Status;
  readonly cpuTicks: number;
}

/** The CPU time (user + system, clock ticks) `pid` has used. */
export function cpuTicks(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(fields[11]) + Number(fields[12]);
}

/** fio arguments that log every write's latency to `${prefix}_lat.1.log` (read by `latencyBuckets`). */
export function fioLatencyLogArgs(prefix: string): string[] {
  return [`--write_lat_log=${prefix}`, '--log_avg_msec=0'];
}

/** The files fio writes for `fioLatencyLogArgs(prefix)`. */
export function latencyLogFiles(prefix: string): string[] {
  return ['lat', 'clat', 'slat'].map((suffix) => `${prefix}_${suffix}.1.log`);
}

/** Every write's latency (ms) from fio's per-I/O log, by the second of the run it completed in. */
export async function latencyBuckets(file: string, runSeconds: number): Promise<number[][]> {
  const buckets: number[][] = Array.from({ length: runSeconds }, () => []);
  const lines = createInterface({ input: createReadStream(file), crlfDelay: Infinity });
  for await (const line of lines) {
    const comma = line.indexOf(',');
    if (comma < 0) continue;
    const second = Math.floor(Number(line.slice(0, comma)) / 1000);
    const latencyNs = Number(line.slice(comma + 1, line.indexOf(',', comma + 1)));
    if (second < runSeconds) buckets[second]?.push(latencyNs / 1e6);
  }
  return buckets;
}

export interface Latencies {
  count: number;
  p50Ms: number;
  p99Ms: number;
  p999Ms: number;
  maxMs: number;
}

/** Count, p50, p99, p99.9 and max of `values` (ms). */
export function latencies(values: readonly number[]): Latencies {
  const sorted = Float64Array.from(values).sort();
  const at = (q: number): number => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? 0;
  return { count: values.length, p50Ms: at(0.5), p99Ms: at(0.99), p999Ms: at(0.999), maxMs: sorted[sorted.length - 1] ?? 0 };
}

/** Per-second write counts and latency percentiles from fio's per-I/O latency log. */
export async function latencySeconds(file: string, runSeconds: number): Promise<Latencies[]> {
  return (await latencyBuckets(file, runSeconds)).map(latencies);
}

/** Samples pcache's status (and `pid`'s CPU time) now, then on every second boundary until `stop()`, which takes a last sample. */
export async function startSampler(control: string, pid: number): Promise<{ samples: Sample[]; stop: () => Promise<void> }> {
  const samples: Sample[] = [];
  const sample = async (): Promise<void> => {
    samples.push({ atMs: performance.now(), status: await controlRequest(control, 'status') as Status, cpuTicks: cpuTicks(pid) });
  };
  await sample();
  const state = { on: true };
  const loop = (async () => {
    while (state.on) {
      await new Promise((resolve) => setTimeout(resolve, 1000 - ((performance.now() - (samples[0]?.atMs ?? 0)) % 1000)));
      await sample();
    }
  })();
  return {
    samples,
    stop: async () => {
      state.on = false;
      await loop;
      await sample();
    },
  };
}

export interface SampleSeries {
  dirtyMiB: number[];
  writebackMiBs: number[];
  retiredMiBs: number[];
  gcMiBs: number[];
  cpuPercent: number[];
}

/** Per-second rates from the status samples: the sample at or after each second's end. */
export function sampleSeries(samples: readonly Sample[], count: number): SampleSeries {
  const first = samples[0];
  const out: SampleSeries = { dirtyMiB: [], writebackMiBs: [], retiredMiBs: [], gcMiBs: [], cpuPercent: [] };
  if (first === undefined) return out;
  const at = (second: number): Sample => samples.find((s) => s.atMs - first.atMs >= second * 1000 - 100) ?? samples[samples.length - 1] ?? first;
  for (let second = 1; second <= count; second++) {
    const a = at(second - 1);
    const b = at(second);
    const dt = Math.max(0.001, (b.atMs - a.atMs) / 1000);
    const ca = a.status.cache;
    const cb = b.status.cache;
    out.dirtyMiB.push(cb.dirtyBytes / MiB);
    out.writebackMiBs.push((bytesWrittenBack(cb.counters) - bytesWrittenBack(ca.counters)) / MiB / dt);
    out.retiredMiBs.push((cb.counters.writebackBytes - ca.counters.writebackBytes) / MiB / dt);
    out.gcMiBs.push(((cb.counters.gcSegmentsFreed - ca.counters.gcSegmentsFreed) * cb.segmentSizeBytes) / MiB / dt);
    out.cpuPercent.push((100 * (b.cpuTicks - a.cpuTicks)) / userHz / dt);
  }
  return out;
}

/** Bytes writeback wrote to the backing device (older servers counted only log bytes retired). */
export function bytesWrittenBack(counters: Counters): number {
  return counters.writebackBackingBytes ?? counters.writebackBytes;
}
