// Sustained 4 KiB random writes past the cache, against Ceph RBD (the second part of
// bench/rbd_bench.ts, which starts the cluster and calls `sustainedWrites`). A burst of writes
// lands in pcache's log at local speed; a run that keeps writing over a range several times the
// cache's size must, once the log has wrapped, wait for writeback to free segments, so its steady
// rate is set by how fast writeback gets the data into Ceph. This measures that steady state and
// the image alone under the same load, in the same run.
//
// What runs: fio, 4 KiB random writes at QD`depth` over the first `rangeBytes` of an image:
// straight to the image (the peer) for `directSeconds`, then through `pcache serve` on a new
// sparse cache of `cacheBytes` (default settings) in front of the other image, then straight to
// the image again (so a drift in the machine's load shows on both sides), and once more straight
// at the depth writeback itself keeps in flight (writebackWritesInFlightMax): the most writeback
// could get from the image. Both images were written in full before (no side writes into
// unallocated RBD objects). Per second: writes completed and p50/p99/max latency (fio's per-I/O
// log), pcache's dirty bytes, the bytes writeback sent to the image and the log GC freed (its
// control socket). The steady part of the pcache run starts at the first second GC freed a
// segment (the log has wrapped); the peer's is every second but the first of each run.
// Reported: medians and means of the per-second IOPS and their ratios, latency over the steady
// part, bytes written back against client bytes, and the drain at the end. Optionally an SVG
// chart of the series (bench/svg_chart.ts).

import type { ChildProcess } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { writebackWritesInFlightMax } from '../src/cache/cache_writeback_apply.js';
import { controlRequest } from '../src/cli/control_client.js';
import { median, report } from './harness.js';
import { fioJob, run, startPcacheServe, stopChild } from './processes.js';
import { bytesWrittenBack, fioLatencyLogArgs, latencies, latencyBuckets, latencyLogFiles, sampleSeries, startSampler, type Latencies, type Sample } from './sustained_series.js';
import { renderChart } from './svg_chart.js';

const MiB = 1024 * 1024;
/** Writes of the steady part shown in the printed table (the whole series goes into the chart). */
const tableRowsMax = 40;

export interface SustainedOptions {
  /** Scratch directory for the cache file, sockets and fio's logs. */
  readonly dir: string;
  /** qemu-nbd sockets: the image behind pcache, and the one written straight. */
  readonly cachedImageSocket: string;
  readonly directImageSocket: string;
  readonly rangeBytes: number;
  readonly cacheBytes: number;
  /** serve --segment-size (default: serve's own, 16 MiB). */
  readonly segmentSizeBytes?: number;
  readonly depth: number;
  readonly pcacheSeconds: number;
  /** Each of the two direct runs. */
  readonly directSeconds: number;
  /** The OSD's store in a few words, for the chart's title. */
  readonly store: string;
  /** Draw the series into this SVG file. */
  readonly svgPath?: string;
}

interface RunLog {
  iops: number;
  /** Latencies (ms) of the writes completed in each second. */
  buckets: number[][];
}

async function fioRun(options: SustainedOptions, socket: string, seconds: number, logPrefix: string, depth = options.depth): Promise<RunLog> {
  try {
    const output = await run('fio', [
      '--name=randwrite', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${socket}`, '--rw=randwrite', '--bs=4k', `--iodepth=${depth}`,
      '--numjobs=1', '--thread', `--size=${options.rangeBytes}`, '--time_based', `--runtime=${seconds}`, '--norandommap', '--randrepeat=0',
      '--output-format=json', ...fioLatencyLogArgs(logPrefix),
    ]);
    const iops = fioJob(output, `randwrite on ${socket}`).write.iops;
    return { iops, buckets: await latencyBuckets(`${logPrefix}_lat.1.log`, seconds) };
  } finally {
    for (const file of latencyLogFiles(logPrefix)) rmSync(file, { force: true });
  }
}

/** Mean writes per second over `buckets`. */
function mean(buckets: readonly (readonly number[])[]): number {
  return buckets.reduce((sum, bucket) => sum + bucket.length, 0) / Math.max(1, buckets.length);
}

/** Seconds in which no write completed. */
function idle(buckets: readonly (readonly number[])[]): number {
  return buckets.filter((bucket) => bucket.length === 0).length;
}

function steadyLatencies(buckets: readonly (readonly number[])[]): Latencies {
  const all: number[] = [];
  for (const bucket of buckets) for (const value of bucket) all.push(value);
  return latencies(all);
}

function latencyText(l: Latencies): string {
  return `p50 ${l.p50Ms.toFixed(2)} ms, p99 ${l.p99Ms.toFixed(2)} ms, p99.9 ${l.p999Ms.toFixed(1)} ms, max ${l.maxMs.toFixed(1)} ms`;
}

export async function sustainedWrites(options: SustainedOptions): Promise<void> {
  const { dir, depth, rangeBytes, cacheBytes } = options;
  console.log(`sustained writes past the cache: 4 KiB random writes QD${depth} over ${rangeBytes / MiB} MiB of each image; pcache with a new ${cacheBytes / MiB} MiB cache for ${options.pcacheSeconds} s, ` +
    `the image alone for ${options.directSeconds} s before and after, and at QD${writebackWritesInFlightMax}; load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  const directBefore = await fioRun(options, options.directImageSocket, options.directSeconds, path.join(dir, 'lat-direct-1'));
  const cache = path.join(dir, 'sustained-cache.img');
  const control = path.join(dir, 'sustained.ctl');
  const socket = path.join(dir, 'sustained.sock');
  let child: ChildProcess | undefined;
  let pcacheRun: RunLog;
  let samples: Sample[];
  let drainMs: number;
  try {
    child = await startPcacheServe('pcache serve', dir, socket, ['--cache', cache, '--cache-size', String(cacheBytes), ...(options.segmentSizeBytes === undefined ? [] : ['--segment-size', String(options.segmentSizeBytes)]), '--backing', `nbd+unix:///?socket=${options.cachedImageSocket}`, '--control', control]);
    const sampler = await startSampler(control, child.pid ?? 0);
    pcacheRun = await fioRun(options, socket, options.pcacheSeconds, path.join(dir, 'lat-pcache'));
    await sampler.stop();
    samples = sampler.samples;
    const drainStart = performance.now();
    await controlRequest(control, 'drain');
    drainMs = performance.now() - drainStart;
  } finally {
    if (child !== undefined) await stopChild(child);
    rmSync(cache, { force: true });
  }
  const directAfter = await fioRun(options, options.directImageSocket, options.directSeconds, path.join(dir, 'lat-direct-2'));
  // The image at the depth writeback uses (it keeps up to writebackWritesInFlightMax writes in flight, whatever the client's depth): what writeback could reach at best.
  const directDeep = await fioRun(options, options.directImageSocket, options.directSeconds, path.join(dir, 'lat-direct-deep'), writebackWritesInFlightMax);

  const series = sampleSeries(samples, options.pcacheSeconds);
  const pcacheCounts = pcacheRun.buckets.map((bucket) => bucket.length);
  const wrappedAt = series.gcMiBs.findIndex((rate) => rate > 0);
  // No GC within the run (a cache larger than what was written): the whole run counts, and the line says so.
  const steadyFrom = wrappedAt < 0 ? 0 : wrappedAt;
  const pcacheSteady = pcacheRun.buckets.slice(steadyFrom);
  const directSteady = [...directBefore.buckets.slice(1), ...directAfter.buckets.slice(1)];
  const pcacheMedian = median(pcacheSteady.map((bucket) => bucket.length));
  const directMedian = median(directSteady.map((bucket) => bucket.length));
  const first = samples[Math.min(steadyFrom, samples.length - 1)]?.status.cache.counters;
  const last = samples[samples.length - 1]?.status.cache.counters;
  const clientBytes = (last?.writeBytes ?? 0) - (first?.writeBytes ?? 0);
  const writtenBack = (last === undefined ? 0 : bytesWrittenBack(last)) - (first === undefined ? 0 : bytesWrittenBack(first));
  const backingWrites = (last?.writebackBackingWrites ?? 0) - (first?.writebackBackingWrites ?? 0);
  const startCounters = samples[0]?.status.cache.counters;
  const totalClient = (last?.writeBytes ?? 0) - (startCounters?.writeBytes ?? 0);

  console.log('  pcache per second:   s   IOPS  p50 ms  p99 ms   max ms  dirty MiB  written back MiB/s  GC freed MiB/s');
  const rows = pcacheCounts.map((count, index) => ({ count, index, l: latencies(pcacheRun.buckets[index] ?? []) }));
  const shown = rows.length <= tableRowsMax ? rows : rows.filter((row) => row.index % Math.ceil(rows.length / tableRowsMax) === 0 || row.index === steadyFrom);
  for (const { count, index, l } of shown) {
    console.log(`                    ${String(index + 1).padStart(4)} ${String(count).padStart(6)} ${l.p50Ms.toFixed(2).padStart(7)} ${l.p99Ms.toFixed(2).padStart(7)} ${l.maxMs.toFixed(1).padStart(8)} ` +
      `${(series.dirtyMiB[index] ?? 0).toFixed(1).padStart(10)} ${(series.writebackMiBs[index] ?? 0).toFixed(1).padStart(19)} ${(series.gcMiBs[index] ?? 0).toFixed(1).padStart(15)}${index === steadyFrom ? '  <- steady from here' : ''}`);
  }
  report({ bench: 'rbd', metric: `4K random write QD${depth} past the cache (steady, per-second median)`, value: pcacheMedian, unit: 'IOPS', peer: `RBD via qemu-nbd --cache=none QD${depth}`, peerValue: directMedian });
  console.log(`  steady part, mean per second: pcache ${Math.round(mean(pcacheSteady))} IOPS, image ${Math.round(mean(directSteady))} IOPS, ratio ${(mean(pcacheSteady) / Math.max(1, mean(directSteady))).toFixed(2)}; ` +
    `seconds in which no write completed: pcache ${idle(pcacheSteady)} of ${pcacheSteady.length}, image ${idle(directSteady)} of ${directSteady.length}`);
  console.log(`  steady part: ${wrappedAt < 0 ? 'the log never wrapped (whole run)' : `from second ${steadyFrom + 1} (the log wrapped) to ${options.pcacheSeconds}`}; fio's whole-run means: pcache ${Math.round(pcacheRun.iops)} IOPS, image ${Math.round(directBefore.iops)} and ${Math.round(directAfter.iops)} IOPS (before, after)`);
  console.log(`  the image at QD${writebackWritesInFlightMax} (writeback's in-flight limit), mean per second ${Math.round(mean(directDeep.buckets.slice(1)))} IOPS: pcache's steady mean is ${(mean(pcacheSteady) / Math.max(1, mean(directDeep.buckets.slice(1)))).toFixed(2)}x that`);
  console.log(`  latency, steady part: pcache ${latencyText(steadyLatencies(pcacheSteady))} | image ${latencyText(steadyLatencies(directSteady))}`);
  console.log(`  bytes: client wrote ${(totalClient / MiB).toFixed(0)} MiB through pcache (${(totalClient / cacheBytes).toFixed(1)}x the cache); in the steady part written back ${(writtenBack / MiB).toFixed(0)} MiB in ${backingWrites} writes (${(writtenBack / 1024 / Math.max(1, backingWrites)).toFixed(1)} KiB each) ` +
    `of ${(clientBytes / MiB).toFixed(0)} MiB client bytes = ${(100 * writtenBack / Math.max(1, clientBytes)).toFixed(1)}%; drain after the run ${(drainMs / 1000).toFixed(1)} s`);
  if (options.svgPath !== undefined) drawChart(options, pcacheRun, directBefore, directAfter, directDeep, series, steadyFrom, { pcache: mean(pcacheSteady), direct: mean(directSteady) });
}

function drawChart(options: SustainedOptions, pcacheRun: RunLog, before: RunLog, after: RunLog, deep: RunLog, series: ReturnType<typeof sampleSeries>, steadyFrom: number, means: { pcache: number; direct: number }): void {
  const svgPath = options.svgPath ?? '';
  const x = pcacheRun.buckets.map((_, index) => index + 1);
  const per = (log: RunLog): (number | undefined)[] => x.map((_, index) => log.buckets[index]?.length);
  const stats = pcacheRun.buckets.map(latencies);
  writeFileSync(svgPath, renderChart({
    title: `pcache in front of Ceph RBD (${options.store}): 4 KiB random writes QD${options.depth} over ${options.rangeBytes / MiB} MiB, ${options.cacheBytes / MiB} MiB cache`,
    subtitle: `from second ${steadyFrom + 1} (log wrapped): mean ${Math.round(means.pcache)} IOPS through pcache, ${Math.round(means.direct)} straight to the image (${(means.pcache / Math.max(1, means.direct)).toFixed(2)}x); qemu-nbd --cache=none; ${os.cpus().length} shared CPUs`,
    x,
    xLabel: 'seconds (the image-alone runs plotted on their own seconds)',
    panels: [
      { title: 'client writes', unit: 'IOPS', lines: [
        { name: 'through pcache', color: '#1f77b4', values: per(pcacheRun) },
        { name: 'image, before', color: '#999999', values: per(before) },
        { name: 'image, after', color: '#555555', values: per(after) },
        { name: `image, QD${writebackWritesInFlightMax}`, color: '#bcbd22', values: per(deep) },
      ] },
      { title: 'write latency through pcache', unit: 'ms', log: true, lines: [
        { name: 'p50', color: '#2ca02c', values: stats.map((s) => s.p50Ms) },
        { name: 'p99', color: '#ff7f0e', values: stats.map((s) => s.p99Ms) },
        { name: 'max', color: '#d62728', values: stats.map((s) => s.maxMs) },
      ] },
      { title: 'dirty data in the cache', unit: 'MiB', lines: [{ name: 'dirty', color: '#9467bd', values: series.dirtyMiB }] },
      { title: 'writeback and GC', unit: 'MiB/s', lines: [
        { name: 'client writes', color: '#1f77b4', values: per(pcacheRun).map((count) => count === undefined ? undefined : count * 4096 / MiB) },
        { name: 'written to RBD', color: '#8c564b', values: series.writebackMiBs },
        { name: 'GC freed', color: '#7f7f7f', values: series.gcMiBs },
      ] },
    ],
  }));
  console.log(`  chart written to ${svgPath}`);
}
