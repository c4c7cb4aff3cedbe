// Ceph RBD backing device: pcache in front of an RBD image, against the image alone, in the same
// run. scripts/ceph_cluster.sh starts a single-node cluster (one monitor, one OSD on memstore:
// the objects live in the OSD's memory, so the store's cost is Ceph's own request path, not a
// disk) with two images, each served by qemu-nbd --cache=none (every write reaches the OSD
// before it is answered; librbd's RAM cache is off). pcache serves the first image through the
// real CLI (`pcache serve --backing nbd+unix:///?socket=...`, default tuning, its cache file on
// tmpfs); the direct runs use the second image through its own qemu-nbd, so they never change
// data behind the cache.
//
// Workloads (target ratio pcache/direct >= 10): 4 KiB random write QD1, and 4 KiB random read
// QD1 of data already in the cache (the range is read through pcache once before measuring).
// Method as bench/remote_backing_bench.ts: each round runs each workload once through pcache and
// once direct, alternating which goes first; medians over the rounds are compared; after each
// pcache write run the cache is drained (so writeback never overlaps the next run), and the
// drain's time is printed. PCACHE_BENCH_SMOKE=1: tiny sizes, one short round.

import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { controlRequest } from '../src/cli/control_client.js';
import { median, param, report, smoke } from './harness.js';
import { fill, fioJob, makeScratch, removeScratch, requireTool, run, startPcacheServe, stopChild, version } from './processes.js';

const MiB = 1024 * 1024;
const scriptPath = fileURLToPath(new URL('../../scripts/ceph_cluster.sh', import.meta.url));
const rangeBytes = param(8 * MiB, 128 * MiB);
const cacheBytes = param(128 * MiB, 1024 * MiB);
const rounds = param(1, 5);
const runtime = param('200ms', '5s');
const rampTime = param('0', '1s');
const target = 10;

type Side = 'pcache' | 'direct';

const workloads = [
  { name: '4K random read QD1 (cached)', rw: 'randread' },
  { name: '4K random write QD1', rw: 'randwrite' },
] as const;

async function fio(socket: string, rw: 'randread' | 'randwrite' | 'read', blockSize: string, depth: number, timed: boolean): Promise<number> {
  const output = await run('fio', [
    `--name=${rw}`, '--ioengine=nbd', `--uri=nbd+unix:///?socket=${socket}`, `--rw=${rw}`, `--bs=${blockSize}`, `--iodepth=${depth}`,
    '--numjobs=1', '--thread', `--size=${rangeBytes}`, ...(timed ? ['--time_based', `--runtime=${runtime}`, `--ramp_time=${rampTime}`] : []),
    '--norandommap', '--randrepeat=0', '--output-format=json',
  ]);
  const job = fioJob(output, `${rw} on ${socket}`);
  return job.read.iops + job.write.iops;
}

interface Counters { readRequests: number; readHitRequests: number; writebackBytes: number }
async function counters(control: string): Promise<{ dirtyBytes: number; counters: Counters }> {
  return ((await controlRequest(control, 'status')) as { cache: { dirtyBytes: number; counters: Counters } }).cache;
}

async function main(): Promise<void> {
  for (const [tool, debianPackage] of [['fio', 'fio'], ['ceph-mon', 'ceph-mon'], ['ceph-osd', 'ceph-osd'], ['rbd', 'ceph-common'], ['qemu-nbd', 'qemu-utils']] as const) requireTool(tool, debianPackage);
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const dir = makeScratch(base, 'pcache-bench-rbd-');
  const clusterDir = makeScratch(os.tmpdir(), 'pcache-bench-ceph-');
  const started: ChildProcess[] = [];
  const imageSize = `${rangeBytes / MiB}M`;
  try {
    await run('env', ['CEPH_OSD_STORE=memstore', 'bash', scriptPath, 'start', clusterDir, `cached:${imageSize}`, `direct:${imageSize}`]);
    const cache = path.join(dir, 'cache.img');
    fill(cache, cacheBytes, false);
    const control = path.join(dir, 'pcache.ctl');
    const socket = path.join(dir, 'pcache.sock');
    // The sequential cutoff is off (sequential_cutoff_bytes=0): the warm-up reads the range in order, and with the cutoff on those reads would not be admitted; the benchmark measures the cache's own path.
    started.push(await startPcacheServe('pcache serve', dir, socket, ['--cache', cache, '--backing', `nbd+unix:///?socket=${path.join(clusterDir, 'cached.sock')}`, '--control', control, '--tuning', 'sequential_cutoff_bytes=0']));
    const sockets: Record<Side, string> = { pcache: socket, direct: path.join(clusterDir, 'direct.sock') };
    // Both images get written once in full, so neither side reads unallocated RBD objects.
    await fio(sockets.direct, 'randwrite', '1m', 4, false);
    await fio(sockets.pcache, 'randwrite', '1m', 4, false);
    await controlRequest(control, 'drain');
    await fio(sockets.pcache, 'read', '1m', 4, false); // the whole range in the cache
    console.log(`machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), Node ${process.version}, ${version('fio', ['--version'])}, ${version('ceph-osd', ['--version']).split(' (')[0] ?? ''}, ${version('qemu-nbd', ['--version']).split('\n')[0] ?? ''}; load average at start ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    console.log(`backing: RBD image of ${rangeBytes / MiB} MiB (1 mon, 1 OSD on memstore, size 1) through qemu-nbd --cache=none; pcache cache ${cacheBytes / MiB} MiB on ${base}; ${rounds} round(s) of ${runtime} per run${smoke ? ' (smoke)' : ''}`);
    for (const workload of workloads) {
      const results: Record<Side, number[]> = { pcache: [], direct: [] };
      const drainsMs: number[] = [];
      let reads = 0;
      let hits = 0;
      for (let round = 0; round < rounds; round++) {
        const order: Side[] = round % 2 === 0 ? ['pcache', 'direct'] : ['direct', 'pcache'];
        for (const side of order) {
          const before = side === 'pcache' ? await counters(control) : undefined;
          results[side].push(await fio(sockets[side], workload.rw, '4k', 1, true));
          if (before === undefined) continue;
          const after = await counters(control);
          reads += after.counters.readRequests - before.counters.readRequests;
          hits += after.counters.readHitRequests - before.counters.readHitRequests;
          if (workload.rw !== 'randwrite') continue;
          const drainStart = performance.now();
          await controlRequest(control, 'drain');
          drainsMs.push(performance.now() - drainStart);
        }
      }
      const value = median(results.pcache);
      const direct = median(results.direct);
      report({ bench: 'rbd', metric: `${workload.name} vs direct`, value, unit: 'IOPS', peer: 'RBD via qemu-nbd --cache=none', peerValue: direct });
      const ratio = value / direct;
      const hitRate = reads === 0 ? '' : `; pcache read hits ${(100 * hits / reads).toFixed(1)}%`;
      console.log(`  ${workload.name}: ratio ${ratio.toFixed(2)}, target >= ${target.toFixed(1)}: ${ratio >= target ? 'met' : 'MISSED'}${hitRate}; ` +
        `runs pcache ${results.pcache.map(Math.round).join(' ')} | direct ${results.direct.map(Math.round).join(' ')}`);
      if (drainsMs.length > 0) console.log(`  drains after the write runs: ${drainsMs.map((ms) => `${(ms / 1000).toFixed(2)} s`).join(', ')}`);
    }
    console.log(`load average at end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  } finally {
    for (const child of started.reverse()) await stopChild(child);
    await run('bash', [scriptPath, 'stop', clusterDir]).catch((error: unknown) => { console.error(`stopping the cluster: ${String(error)}`); });
    removeScratch(dir);
    removeScratch(clusterDir);
  }
}

await main();
