// Sustained writes through a small cache in front of a slow store: does the cache absorb
// overwrites, and do clients see a steady rate once it is full?
//
// The store is nbdkit's `file` plugin behind its `delay` filter (1 ms per read, write, zero and
// trim request; nbdkit 1.32 cannot delay FLUSH), the file on tmpfs, so the delay is the store's
// whole cost. The peer is fio straight against that store: 4 KiB random writes, QD16, over a
// 128 MiB range. pcache serves the same store through the real CLI (`pcache serve --cache-size
// 256M`, a cache file that does not exist yet, so it is created sparse and formatted as a new
// user's would be; default settings but for writeback_ordering), and fio runs the same workload
// through it for the run's length: 4 KiB random writes, QD16, a 128 MiB hot range, every block
// overwritten many times over. pcache's range is the first half of the backing file and the
// store's the second, so the direct run never changes data behind the cache.
//
// What is measured, per second of the pcache run: client IOPS and the p50/p99/max latency of
// the writes completed in that second (from fio's per-I/O latency log), dirty bytes, and the
// writeback and GC rates (pcache's control socket, sampled every second): bytes written to the
// backing device, log bytes retired by writeback, segments freed by GC. At the end: IOPS against
// the store's (ratio), the share of client bytes written back, the slowest second against the
// median, the slowest write, and pcache's CPU time (user + system, writeback included) per
// client write. Goals (issue 16): ratio >= 3, written back <= 1/4, no second below half the
// median, no write slower than 1 s.
//
// Environment: PCACHE_BENCH_SECONDS (pcache run length, default 60), PCACHE_BENCH_ORDERING
// (comma list of writeback_ordering values, default strict,relaxed), PCACHE_BENCH_FLUSH_EVERY (fio
// fsync=N: a FLUSH every N writes; default none, as in the issue), PCACHE_BENCH_SVG (draw the
// per-second series of the first ordering into this SVG file), PCACHE_BENCH_CACHE_MIB (default
// 256), PCACHE_BENCH_SEGMENT_MIB (serve --segment-size), PCACHE_BENCH_TUNING (more pcache --tuning
// pairs), PCACHE_BENCH_PREWRITTEN=1 (the cache file written full of zeroes first instead of
// sparse). PCACHE_BENCH_SMOKE=1: tiny sizes, a few seconds (the test suite runs that).

import type { ChildProcess } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { median, param, report, smoke } from './harness.js';
import { cacheFileKind, fioJob, makeBenchFiles, newCacheArgs, removeScratch, requireTool, run, startNbdkitServer, startPcacheServe, stopChild, version } from './processes.js';
import { renderChart } from './svg_chart.js';
import { bytesWrittenBack, fioLatencyLogArgs, latencyLogFiles, latencySeconds, sampleSeries, startSampler, userHz, type Latencies, type Sample } from './sustained_series.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const rangeBytes = param(16 * MiB, 128 * MiB);
const backingBytes = 2 * rangeBytes;
const cacheMiB = Number(process.env.PCACHE_BENCH_CACHE_MIB ?? param(128, 256));
const seconds = Number(process.env.PCACHE_BENCH_SECONDS ?? param(3, 60));
const storeSeconds = param(2, 20);
const depth = 16;
const orderings = (process.env.PCACHE_BENCH_ORDERING ?? 'strict,relaxed').split(',').filter((text) => text !== '');
const flushEvery = process.env.PCACHE_BENCH_FLUSH_EVERY === undefined ? undefined : Number(process.env.PCACHE_BENCH_FLUSH_EVERY);
const svgPath = process.env.PCACHE_BENCH_SVG;
/** serve --segment-size for the new cache (PCACHE_BENCH_SEGMENT_MIB; default: serve's own choice). */
const segmentMiB = process.env.PCACHE_BENCH_SEGMENT_MIB;
/** More `--tuning` pairs for pcache (PCACHE_BENCH_TUNING=name=value,...), to try settings. */
const extraTuning = (process.env.PCACHE_BENCH_TUNING ?? '').split(',').filter((text) => text !== '');
const delay = '1ms';
const delayedOps = ['read', 'write', 'zero', 'trim'];
async function fio(socket: string, offsetBytes: number, runSeconds: number, latLog?: string): Promise<{ iops: number; maxLatencyMs: number }> {
  const output = await run('fio', [
    '--name=randwrite', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${socket}`, '--rw=randwrite',
    '--bs=4k', `--iodepth=${depth}`, '--numjobs=1', '--thread', `--offset=${offsetBytes}`, `--size=${rangeBytes}`,
    '--time_based', `--runtime=${runSeconds}`, '--norandommap', '--randrepeat=0', '--output-format=json',
    ...(flushEvery === undefined ? [] : [`--fsync=${flushEvery}`]),
    ...(latLog === undefined ? [] : fioLatencyLogArgs(latLog)),
  ]);
  const job = fioJob(output, `randwrite on ${socket}`) as unknown as { write: { iops: number; lat_ns: { max: number } } };
  return { iops: job.write.iops, maxLatencyMs: job.write.lat_ns.max / 1e6 };
}

function mib(bytes: number): string {
  return (bytes / MiB).toFixed(1);
}

interface RunResult {
  readonly ordering: string;
  readonly iops: number;
  readonly seconds: Latencies[];
  readonly samples: Sample[];
}

async function runPcache(dir: string, store: string, ordering: string, storeIops: number): Promise<RunResult> {
  const cachePath = path.join(dir, `cache-${ordering}.img`);
  const control = path.join(dir, `pcache-${ordering}.ctl`);
  const child = await startPcacheServe('pcache serve', dir, path.join(dir, `pcache-${ordering}.sock`), [
    ...newCacheArgs(cachePath, cacheMiB * MiB), ...(segmentMiB === undefined ? [] : ['--segment-size', `${segmentMiB}M`]), '--backing', `nbd+unix:///?socket=${store}`,
    '--control', control, ...(ordering === 'default' ? [] : ['--tuning', [`writeback_ordering=${ordering}`, ...extraTuning].join(',')]),
  ]);
  const pid = child.pid ?? 0;
  try {
    const sampler = await startSampler(control, pid);
    const latLog = path.join(dir, `lat-${ordering}`);
    const result = await fio(path.join(dir, `pcache-${ordering}.sock`), 0, seconds, latLog);
    await sampler.stop();
    const samples = sampler.samples;
    const perSecond = await latencySeconds(`${latLog}_lat.1.log`, seconds);
    for (const file of latencyLogFiles(latLog)) rmSync(file, { force: true });
    summarize(ordering, result.iops, storeIops, perSecond, samples);
    return { ordering, iops: result.iops, seconds: perSecond, samples };
  } finally {
    await stopChild(child);
    rmSync(cachePath, { force: true });
  }
}

function summarize(ordering: string, iops: number, storeIops: number, perSecond: readonly Latencies[], samples: readonly Sample[]): void {
  const series = sampleSeries(samples, perSecond.length);
  console.log(`  pcache, writeback_ordering=${ordering}, per second:`);
  console.log('    s    IOPS   p50 ms  p99 ms  max ms  dirty MiB  wb MiB/s  retired MiB/s  GC MiB/s  CPU %');
  perSecond.forEach((second, index) => {
    console.log(`  ${String(index + 1).padStart(3)} ${String(second.count).padStart(7)} ${second.p50Ms.toFixed(2).padStart(8)} ${second.p99Ms.toFixed(2).padStart(7)} ${second.maxMs.toFixed(1).padStart(7)} ` +
      `${(series.dirtyMiB[index] ?? 0).toFixed(1).padStart(10)} ${(series.writebackMiBs[index] ?? 0).toFixed(1).padStart(9)} ${(series.retiredMiBs[index] ?? 0).toFixed(1).padStart(14)} ` +
      `${(series.gcMiBs[index] ?? 0).toFixed(1).padStart(9)} ${(series.cpuPercent[index] ?? 0).toFixed(0).padStart(6)}`);
  });
  const first = samples[0]?.status.cache.counters;
  const last = samples[samples.length - 1]?.status.cache.counters;
  const firstTicks = samples[0]?.cpuTicks ?? 0;
  const lastTicks = samples[samples.length - 1]?.cpuTicks ?? 0;
  const clientBytes = (last?.writeBytes ?? 0) - (first?.writeBytes ?? 0);
  const writes = (last?.writeRequests ?? 0) - (first?.writeRequests ?? 0);
  const writtenBack = (last === undefined ? 0 : bytesWrittenBack(last)) - (first === undefined ? 0 : bytesWrittenBack(first));
  const backingWrites = (last?.writebackBackingWrites ?? 0) - (first?.writebackBackingWrites ?? 0);
  const counts = perSecond.map((second) => second.count);
  const medianSecond = median(counts);
  const slowestSecond = Math.min(...counts);
  const slowestWriteMs = Math.max(...perSecond.map((second) => second.maxMs));
  const cpuUsPerWrite = writes === 0 ? 0 : ((lastTicks - firstTicks) / userHz) * 1e6 / writes;
  const share = clientBytes === 0 ? 0 : writtenBack / clientBytes;
  report({ bench: 'sustained', metric: `4K rand write QD${depth} ${ordering}`, value: iops, unit: 'IOPS', peer: `store QD${depth}`, peerValue: storeIops });
  report({ bench: 'sustained', metric: `written back / client bytes ${ordering}`, value: share, unit: 'ratio' });
  report({ bench: 'sustained', metric: `server CPU per 4K write ${ordering}`, value: cpuUsPerWrite, unit: 'us' });
  const verdict = (ok: boolean): string => (ok ? 'met' : 'MISSED');
  console.log(`  ${ordering}: ${Math.round(iops)} IOPS = ${(iops / storeIops).toFixed(2)}x the store (goal >= 3: ${verdict(iops >= 3 * storeIops)}); ` +
    `client ${mib(clientBytes)} MiB, written back ${mib(writtenBack)} MiB in ${backingWrites} writes = ${(100 * share).toFixed(1)}% (goal <= 25%: ${verdict(share <= 0.25)}); ` +
    `slowest second ${slowestSecond} against a median of ${medianSecond} (goal >= half: ${verdict(slowestSecond >= medianSecond / 2)}); ` +
    `slowest write ${slowestWriteMs.toFixed(1)} ms (goal < 1000: ${verdict(slowestWriteMs < 1000)}); server CPU ${cpuUsPerWrite.toFixed(1)} us per write, writeback included`);
}

function drawChart(result: RunResult, storeIops: number): void {
  if (svgPath === undefined) return;
  const series = sampleSeries(result.samples, result.seconds.length);
  const x = result.seconds.map((_, index) => index + 1);
  const svg = renderChart({
    title: `pcache: 4 KiB random writes QD${depth} over ${rangeBytes / MiB} MiB, ${cacheMiB} MiB cache, store = file behind a ${delay} delay`,
    subtitle: `writeback_ordering=${result.ordering}; ${Math.round(result.iops)} IOPS = ${(result.iops / storeIops).toFixed(2)}x the store alone (${Math.round(storeIops)} IOPS at QD${depth}); ${os.cpus().length} CPUs shared by fio, pcache and nbdkit`,
    x,
    xLabel: 'seconds',
    panels: [
      { title: 'client writes', unit: 'IOPS', lines: [{ name: 'pcache', color: '#1f77b4', values: result.seconds.map((s) => s.count) }, { name: 'store alone', color: '#999999', values: x.map(() => storeIops) }] },
      { title: 'write latency', unit: 'ms', log: true, lines: [
        { name: 'p50', color: '#2ca02c', values: result.seconds.map((s) => s.p50Ms) },
        { name: 'p99', color: '#ff7f0e', values: result.seconds.map((s) => s.p99Ms) },
        { name: 'max', color: '#d62728', values: result.seconds.map((s) => s.maxMs) },
      ] },
      { title: 'dirty data', unit: 'MiB', lines: [{ name: 'dirty', color: '#9467bd', values: series.dirtyMiB }] },
      { title: 'writeback and GC', unit: 'MiB/s', lines: [
        { name: 'written to store', color: '#8c564b', values: series.writebackMiBs },
        { name: 'log retired', color: '#e377c2', values: series.retiredMiBs },
        { name: 'GC freed', color: '#7f7f7f', values: series.gcMiBs },
      ] },
    ],
  });
  writeFileSync(svgPath, svg);
  console.log(`chart written to ${svgPath}`);
}

async function main(): Promise<void> {
  requireTool('fio', 'fio');
  requireTool('nbdkit', 'nbdkit');
  // makeBenchFiles fills a cache file too; this benchmark makes its own (sparse) per run.
  const { base, dir, backing } = makeBenchFiles('pcache-bench-sustained-', backingBytes, MiB);
  const started: ChildProcess[] = [];
  try {
    const socket = path.join(dir, 'nbdkit.sock');
    started.push(await startNbdkitServer(dir, socket, ['-f', '--exit-with-parent', '--filter=delay', 'file', `file=${backing}`, ...delayedOps.map((op) => `delay-${op}=${delay}`)]));
    console.log(`machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), Node ${process.version}, ${version('fio', ['--version'])}, ${version('nbdkit', ['--version'])}; load average at start ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    console.log(`store: nbdkit file on ${base} behind the delay filter (${delay} per ${delayedOps.join('/')} request); 4 KiB random writes QD${depth} over ${rangeBytes / MiB} MiB; ` +
      `pcache: ${cacheMiB} MiB cache (${cacheFileKind()}), ${seconds} s per run${flushEvery === undefined ? '' : `, a FLUSH every ${flushEvery} writes`}${smoke ? ' (smoke)' : ''}`);
    const store = await fio(socket, rangeBytes, storeSeconds);
    console.log(`  store alone: ${Math.round(store.iops)} IOPS at QD${depth} (${storeSeconds} s), slowest write ${store.maxLatencyMs.toFixed(1)} ms`);
    const results: RunResult[] = [];
    for (const ordering of orderings) results.push(await runPcache(dir, socket, ordering, store.iops));
    const firstResult = results[0];
    if (firstResult !== undefined) drawChart(firstResult, store.iops);
    console.log(`load average at end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  } finally {
    for (const child of started.reverse()) await stopChild(child);
    removeScratch(dir);
  }
}

await main();
