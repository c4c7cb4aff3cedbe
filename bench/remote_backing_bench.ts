// Remote backing device: pcache in front of a slow network store, against that store alone.
// The store is nbdkit's `file` plugin behind its `delay` filter, which holds every read, write,
// zero, trim, cache and block-status request for 1 ms (nbdkit 1.32 cannot delay FLUSH); the
// file is on tmpfs (/dev/shm), so the delay is the store's whole cost. pcache serves it through
// the real CLI: `pcache serve --backing nbd+unix:///?socket=...` (default 4 connections, default
// tuning), with its cache file on tmpfs too.
//
// Workloads (target ratio pcache/direct >= 10): 4 KiB random write QD1, and 4 KiB random read
// QD1 of data already in the cache (the range is read through pcache once before measuring;
// the hit rate during the runs is printed). The peer is the same fio workload straight against
// the delayed nbdkit, on a second range of the same file: pcache caches the first half of the
// backing file and the direct runs touch only the second half, so direct writes never change
// data behind the cache's back.
//
// Method: every round runs each workload once through pcache and once direct, alternating
// which goes first; medians over the rounds are compared. After each pcache write run the
// cache is drained through its control socket (so writeback never overlaps the next run); the
// drain's duration and the bytes it wrote back are printed for information. The cache file is
// written full of zeroes first (as in nbd_fio_bench.ts). Reads run before writes: the write runs
// fill the log, and GC could evict the warmed range.
// PCACHE_BENCH_SMOKE=1: tiny sizes, one short round (the test suite runs that).

import type { ChildProcess } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { controlRequest } from '../src/cli/control_client.js';
import { median, param, report, smoke } from './harness.js';
import { fioJob, makeBenchFiles, removeScratch, requireTool, run, startNbdkitServer, startPcacheServe, stopChild, version } from './processes.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** The range each side touches: pcache the first one of the backing file, direct runs the second. */
const rangeBytes = param(8 * MiB, 256 * MiB);
const backingBytes = 2 * rangeBytes;
// A QD1 write run through pcache appends up to ~1 GiB to the log (overwrites included); the
// cache is large enough that every run stays below the writeback start watermark (80%; 50% when it was written), and
// the five write runs together below the GC threshold (70% of segments in use) as far as
// possible (the last line printed says whether GC ran).
const cacheBytes = param(128 * MiB, 6144 * MiB);
const rounds = param(1, 5);
const runtime = param('200ms', '5s');
const rampTime = param('0', '1s');
/** What every request to the backing store costs. */
const delay = '1ms';
const delayedOps = ['read', 'write', 'zero', 'trim', 'cache', 'extents'];
const target = 10;

interface Workload {
  readonly name: string;
  readonly rw: 'randread' | 'randwrite';
}

const workloads: readonly Workload[] = [
  { name: '4K random read QD1 (cached)', rw: 'randread' },
  { name: '4K random write QD1', rw: 'randwrite' },
];

type Side = 'pcache' | 'direct';

/** The delayed store: `nbdkit --filter=delay file`, ready once it has written its pid file. */
async function startNbdkit(dir: string, backing: string): Promise<{ socket: string; child: ChildProcess }> {
  const socket = path.join(dir, 'nbdkit.sock');
  const args = ['-f', '--exit-with-parent', '--filter=delay', 'file', `file=${backing}`, ...delayedOps.map((op) => `delay-${op}=${delay}`)];
  return { socket, child: await startNbdkitServer(dir, socket, args) };
}

/** `pcache serve` through the real CLI, ready once it printed "serving ...". */
async function startPcache(dir: string, args: string[]): Promise<{ socket: string; child: ChildProcess }> {
  const socket = path.join(dir, 'pcache.sock');
  return { socket, child: await startPcacheServe('pcache serve', dir, socket, args) };
}

interface FioRun {
  readonly rw: 'randread' | 'randwrite' | 'read';
  readonly blockSize: string;
  readonly depth: number;
  readonly offsetBytes: number;
  /** Run for `runtime` after `rampTime`; otherwise one pass over the range. */
  readonly timed: boolean;
}

/** One fio job (one NBD connection) against `socket`; returns its IOPS. */
async function fio(socket: string, job: FioRun): Promise<number> {
  const output = await run('fio', [
    `--name=${job.rw}`, '--ioengine=nbd', `--uri=nbd+unix:///?socket=${socket}`, `--rw=${job.rw}`,
    `--bs=${job.blockSize}`, `--iodepth=${job.depth}`, '--numjobs=1', '--thread',
    `--offset=${job.offsetBytes}`, `--size=${rangeBytes}`,
    ...(job.timed ? ['--time_based', `--runtime=${runtime}`, `--ramp_time=${rampTime}`] : []),
    '--norandommap', '--randrepeat=0', '--output-format=json',
  ]);
  const result = fioJob(output, `${job.rw} on ${socket}`);
  return result.read.iops + result.write.iops;
}

interface CacheCounters {
  readRequests: number;
  readHitRequests: number;
  writebackBytes: number;
  writebackRounds: number;
  gcSegmentsFreed: number;
}

interface PcacheStatus {
  backingRemote: { connectionsWanted: number; connectionsConnected: number } | null;
  cache: { dirtyBytes: number; segsUsed: number; segTotal: number; counters: CacheCounters };
}

async function status(control: string): Promise<PcacheStatus> {
  return await controlRequest(control, 'status') as PcacheStatus;
}

function mib(bytes: number): string {
  return (bytes / MiB).toFixed(1);
}

async function main(): Promise<void> {
  requireTool('fio', 'fio');
  requireTool('nbdkit', 'nbdkit');
  const { base, dir, backing, cache, control } = makeBenchFiles('pcache-bench-remote-', backingBytes, cacheBytes);
  const started: ChildProcess[] = [];
  try {
    const nbdkit = await startNbdkit(dir, backing);
    started.push(nbdkit.child);
    // The sequential cutoff is off (sequential_cutoff_bytes=0): the warm-up reads the range in order, and with the cutoff on those reads would not be admitted; the benchmark measures the cache's own path.
    const pcache = await startPcache(dir, ['--cache', cache, '--backing', `nbd+unix:///?socket=${nbdkit.socket}`, '--control', control, '--tuning', 'sequential_cutoff_bytes=0']);
    started.push(pcache.child);
    const sides: Record<Side, { socket: string; offsetBytes: number }> = {
      pcache: { socket: pcache.socket, offsetBytes: 0 },
      direct: { socket: nbdkit.socket, offsetBytes: rangeBytes },
    };

    // Warm the range: one sequential pass through pcache brings it into the cache.
    await fio(pcache.socket, { rw: 'read', blockSize: '1m', depth: 4, offsetBytes: 0, timed: false });
    const remote = (await status(control)).backingRemote;
    console.log(`machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), Node ${process.version}, ${version('fio', ['--version'])}, ${version('nbdkit', ['--version'])}; load average at start ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    console.log(`backing: nbdkit file on ${base}, delay filter ${delay} per ${delayedOps.join('/')} request, ${backingBytes / MiB} MiB; pcache cache ${cacheBytes / MiB} MiB on ${base}, ` +
      `${remote?.connectionsConnected ?? '?'}/${remote?.connectionsWanted ?? '?'} backing connections; range ${rangeBytes / MiB} MiB per side; ${rounds} round(s) of ${runtime} per run${smoke ? ' (smoke)' : ''}`);

    for (const workload of workloads) {
      const results: Record<Side, number[]> = { pcache: [], direct: [] };
      const drains: { ms: number; dirtyBytes: number; rounds: number }[] = [];
      let writebackDuringRuns = 0;
      let reads = 0;
      let hits = 0;
      for (let round = 0; round < rounds; round++) {
        const order: Side[] = round % 2 === 0 ? ['pcache', 'direct'] : ['direct', 'pcache'];
        for (const side of order) {
          const before = side === 'pcache' ? await status(control) : undefined;
          const iops = await fio(sides[side].socket, { rw: workload.rw, blockSize: '4k', depth: 1, offsetBytes: sides[side].offsetBytes, timed: true });
          results[side].push(iops);
          if (before === undefined) continue;
          const after = await status(control);
          writebackDuringRuns += after.cache.counters.writebackBytes - before.cache.counters.writebackBytes;
          reads += after.cache.counters.readRequests - before.cache.counters.readRequests;
          hits += after.cache.counters.readHitRequests - before.cache.counters.readHitRequests;
          if (workload.rw !== 'randwrite') continue;
          const drainStart = performance.now();
          await controlRequest(control, 'drain');
          const ms = performance.now() - drainStart;
          const drained = await status(control);
          drains.push({ ms, dirtyBytes: after.cache.dirtyBytes, rounds: drained.cache.counters.writebackRounds - after.cache.counters.writebackRounds });
        }
      }
      const value = median(results.pcache);
      const direct = median(results.direct);
      report({ bench: 'remote_backing', metric: `${workload.name} vs direct`, value, unit: 'IOPS', peer: `nbdkit delay ${delay}`, peerValue: direct });
      const ratio = value / direct;
      const hitRate = reads === 0 ? '' : `; pcache read hits ${(100 * hits / reads).toFixed(1)}%`;
      console.log(`  ${workload.name}: ratio ${ratio.toFixed(2)}, target >= ${target.toFixed(1)}: ${ratio >= target ? 'met' : 'MISSED'}${hitRate}; ` +
        `writeback during pcache runs ${mib(writebackDuringRuns)} MiB; runs pcache ${results.pcache.map(Math.round).join(' ')} | direct ${results.direct.map(Math.round).join(' ')}`);
      if (drains.length > 0) {
        report({ bench: 'remote_backing', metric: 'drain after a write run', value: median(drains.map((d) => d.ms)), unit: 'ms' });
        console.log(`  drains (dirty log bytes, time, writeback rounds): ${drains.map((d) => `${mib(d.dirtyBytes)} MiB in ${(d.ms / 1000).toFixed(2)} s (${d.rounds})`).join('; ')}`);
      }
    }
    const end = (await status(control)).cache;
    console.log(`cache at end: ${end.segsUsed} of ${end.segTotal} segments in use; GC freed ${end.counters.gcSegmentsFreed} segments; ` +
      `${end.counters.writebackRounds} writeback rounds, ${mib(end.counters.writebackBytes)} MiB of log written back`);
    console.log(`load average at end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  } finally {
    // pcache first: it holds connections to nbdkit.
    for (const child of started.reverse()) await stopChild(child);
    removeScratch(dir);
  }
}

await main();
