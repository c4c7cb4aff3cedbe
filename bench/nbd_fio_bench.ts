// NBD end to end: fio's nbd engine against `pcache serve` and against nbdkit's file plugin,
// both serving the same file on tmpfs (/dev/shm), in alternating runs within one invocation.
// Second peer: `pcache serve --no-cache`, the same server exporting the file with no cache.
//
// Workloads (target ratio pcache/nbdkit): 4 KiB random read QD32 (>= 1.3), 4 KiB random write
// QD32 (>= 1.0), 4 KiB random read QD1 (>= 0.8), 1 MiB sequential read QD4 (>= 0.8). Reads are
// cache hits: the range is read through pcache once before measuring (and the hit rate during
// the read runs is reported). One fio job (one connection, one thread) per run: this machine
// class has 2 cores, and a second job would take the CPU the servers need.
//
// Method: every round runs each workload once against each server, rotating which server goes
// first; medians over the rounds are compared. After a pcache write run the cache is drained
// (through its control socket) before the next run, so writeback never steals CPU from a peer.
// The cache file is written full of zeroes first: a real cache device (pmem, an NVMe
// partition) has its blocks already, whereas a sparse tmpfs file would charge the first lap of
// the log for page allocation. For the same reason the cache and backing files are read through
// before every write run, whichever server it is for: this VM's host takes back memory left idle
// for a minute or two, and the first write into such a page costs 2-5x (processes.ts,
// readThrough). Without it pcache's early write runs, whose log moves onto pages untouched since
// the files were made, paid for that and nbdkit's, which rewrite the same 512 MiB, did not.
// Servers are separate processes started by the real CLI.
// PCACHE_BENCH_SMOKE=1: tiny sizes, one short round (the test suite runs that).

import type { ChildProcess } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { controlRequest } from '../src/cli/control_client.js';
import { median, param, report, smoke } from './harness.js';
import { fioJob, makeBenchFiles, readThrough, removeScratch, requireTool, run, startNbdkitServer, startPcacheServe, stopChild, version } from './processes.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const backingBytes = param(64 * MiB, 1024 * MiB);
// Large enough that a write run (1 s ramp + 5 s) stays below the writeback start watermark
// (80%; 50% when these runs were tuned): at 150,000 4 KiB writes/s that is 3.7 GB of log, 43% of 8 GiB. The runs measure what
// the cache absorbs; writeback cost is described in docs/performance.md.
const cacheBytes = param(256 * MiB, 8192 * MiB);
/** The range every workload touches; it fits the cache, so reads are hits. */
const rangeBytes = param(32 * MiB, 512 * MiB);
const rounds = param(1, 5);
const runtime = param('300ms', '5s');
const rampTime = param('0', '1s');

interface Workload {
  readonly name: string;
  readonly rw: 'randread' | 'randwrite' | 'read';
  readonly blockSize: string;
  readonly depth: number;
  readonly unit: 'IOPS' | 'MiB/s';
  readonly target: number;
  /** fio jobs, one NBD connection each (default 1). */
  readonly jobs?: number;
}

// Reads first: the write runs fill the log, and GC would evict the warmed range.
const workloads: readonly Workload[] = [
  { name: '4K random read QD32', rw: 'randread', blockSize: '4k', depth: 32, unit: 'IOPS', target: 1.3 },
  { name: '4K random read QD1', rw: 'randread', blockSize: '4k', depth: 1, unit: 'IOPS', target: 0.8 },
  { name: '1M sequential read QD4', rw: 'read', blockSize: '1m', depth: 4, unit: 'MiB/s', target: 0.8 },
  { name: '4K random write QD32', rw: 'randwrite', blockSize: '4k', depth: 32, unit: 'IOPS', target: 1.0 },
  // Multi-conn clients (nbdcopy, nbd-client -C) spread I/O over connections; no separate target.
  { name: '4K random write QD32 x2 connections', rw: 'randwrite', blockSize: '4k', depth: 32, unit: 'IOPS', target: 0, jobs: 2 },
];

type ServerName = 'pcache' | 'nbdkit' | 'nocache';

interface Server {
  readonly name: ServerName;
  readonly socket: string;
  readonly child: ChildProcess;
}

/** Starts `pcache serve args` (or, for nbdkit, `nbdkit -U socket args`) and waits until it listens. */
async function start(name: ServerName, dir: string, args: string[]): Promise<Server> {
  const socket = path.join(dir, `${name}.sock`);
  if (name === 'nbdkit') return { name, socket, child: await startNbdkitServer(dir, socket, args) };
  return { name, socket, child: await startPcacheServe(`pcache serve (${name})`, dir, socket, args) };
}

async function fio(server: Server, workload: Workload): Promise<number> {
  const output = await run('fio', [
    `--name=${workload.rw}`, '--ioengine=nbd', `--uri=nbd+unix:///?socket=${server.socket}`, `--rw=${workload.rw}`,
    `--bs=${workload.blockSize}`, `--iodepth=${workload.depth}`, `--numjobs=${workload.jobs ?? 1}`, '--group_reporting', '--thread', `--size=${rangeBytes}`,
    '--time_based', `--runtime=${runtime}`, `--ramp_time=${rampTime}`, '--norandommap', '--randrepeat=0',
    '--group_reporting', '--output-format=json',
  ]);
  const job = fioJob(output, `against ${server.name}`);
  const iops = job.read.iops + job.write.iops;
  return workload.unit === 'IOPS' ? iops : (job.read.bw + job.write.bw) / KiB;
}

interface CacheCounters {
  readRequests: number;
  readHitRequests: number;
}

async function counters(control: string): Promise<CacheCounters> {
  const status = await controlRequest(control, 'status') as { cache: { counters: CacheCounters } };
  return status.cache.counters;
}

async function main(): Promise<void> {
  requireTool('fio', 'fio');
  requireTool('nbdkit', 'nbdkit');
  const { base, dir, backing, cache, control } = makeBenchFiles('pcache-bench-', backingBytes, cacheBytes);
  const servers: Server[] = [];
  try {
    // The sequential cutoff is off (sequential_cutoff_bytes=0): the warm-up reads the range in order, and with the cutoff on those reads would not be admitted; the benchmark measures the cache's own path.
    const pcache = await start('pcache', dir, ['--cache', cache, '--backing', backing, '--control', control, '--tuning', 'sequential_cutoff_bytes=0']);
    servers.push(pcache);
    servers.push(await start('nocache', dir, ['--no-cache', '--backing', backing]));
    servers.push(await start('nbdkit', dir, ['-f', '--exit-with-parent', 'file', `file=${backing}`]));
    const byName = (name: ServerName): Server => servers.find((server) => server.name === name) ?? pcache;

    // Warm the range: one sequential pass through pcache fills it into the cache.
    await fio(pcache, { name: 'warm', rw: 'read', blockSize: '1m', depth: 4, unit: 'MiB/s', target: 0 });
    console.log(`machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), Node ${process.version}, ${version('fio', ['--version'])}, ${version('nbdkit', ['--version'])}; load average at start ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    console.log(`files on ${base}: backing ${backingBytes / MiB} MiB, cache ${cacheBytes / MiB} MiB, range ${rangeBytes / MiB} MiB; ${rounds} round(s) of ${runtime} per run${smoke ? ' (smoke)' : ''}`);

    const order: ServerName[] = ['pcache', 'nbdkit', 'nocache'];
    // PCACHE_BENCH_ONLY=write (a substring of workload names) runs a subset.
    const only = process.env.PCACHE_BENCH_ONLY;
    for (const workload of workloads.filter((w) => only === undefined || w.name.includes(only))) {
      const results: Record<ServerName, number[]> = { pcache: [], nbdkit: [], nocache: [] };
      const before = await counters(control);
      for (let round = 0; round < rounds; round++) {
        for (let turn = 0; turn < order.length; turn++) {
          const name = order[(round + turn) % order.length] ?? 'pcache';
          if (workload.rw === 'randwrite') {
            readThrough(cache);
            readThrough(backing);
          }
          results[name].push(await fio(byName(name), workload));
          if (name === 'pcache' && workload.rw === 'randwrite') await controlRequest(control, 'drain');
        }
      }
      const after = await counters(control);
      const value = median(results.pcache);
      const nbdkit = median(results.nbdkit);
      const nocache = median(results.nocache);
      report({ bench: 'nbd_fio', metric: `${workload.name} vs nbdkit`, value, unit: workload.unit, peer: 'nbdkit file', peerValue: nbdkit });
      report({ bench: 'nbd_fio', metric: `${workload.name} vs no cache`, value, unit: workload.unit, peer: 'pcache --no-cache', peerValue: nocache });
      const ratio = value / nbdkit;
      const reads = after.readRequests - before.readRequests;
      const hits = reads === 0 ? '' : `; pcache read hits ${(100 * (after.readHitRequests - before.readHitRequests) / reads).toFixed(1)}%`;
      console.log(`  ${workload.name}: ratio ${ratio.toFixed(2)}, target >= ${workload.target.toFixed(1)}: ${ratio >= workload.target ? 'met' : 'MISSED'}${hits}; runs pcache ${results.pcache.map(Math.round).join(' ')} | nbdkit ${results.nbdkit.map(Math.round).join(' ')} | no cache ${results.nocache.map(Math.round).join(' ')}`);
    }
    console.log(`load average at end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  } finally {
    for (const server of servers) await stopChild(server.child);
    removeScratch(dir);
  }
}

await main();
