// Ceph RBD backing device: pcache in front of an RBD image, against the image alone, in the same
// run. scripts/ceph_cluster.sh starts a single-node cluster (one monitor, one OSD) with the
// images, each served by qemu-nbd --cache=none (every write reaches the OSD before it is
// answered; librbd's RAM cache is off). The OSD's store (PCACHE_BENCH_CEPH_STORE): bluestore
// (default) over a sparse file on the temporary directory's disk, with Ceph's own cache sizing —
// what clusters run; or memstore, the objects in the OSD's memory — no disk at all, the hardest
// peer. pcache serves one image through the real CLI (`pcache serve --backing
// nbd+unix:///?socket=...`, default tuning, its cache file on tmpfs); the direct runs use another
// image through its own qemu-nbd, so they never change data behind the cache.
//
// Part "qd1" (target ratio pcache/direct >= 10): 4 KiB random write QD1, and 4 KiB random read
// QD1 of data already in the cache (the range is read through pcache once before measuring, and
// straight once, so the OSD's cache is as warm). Method as bench/remote_backing_bench.ts: each
// round runs each workload once through pcache and once direct, alternating which goes first;
// medians over the rounds are compared; after each pcache write run the cache is drained (so
// writeback never overlaps the next run), and the drain's time is printed.
// PCACHE_BENCH_RBD_FILE_PEER=1 adds a control to the read workload: a second `pcache serve` with
// the same settings in front of a tmpfs file instead of the image (written, drained and read
// through the same way), measured in the same rounds. It tells what a cached read costs when
// the backing device is not a remote NBD client with Ceph behind it (docs/performance.md).
// Part "sustained" (bench/rbd_sustained.ts): 4 KiB random writes QD16 over a range four times
// the cache, long enough to wrap it several times, through pcache and straight; per-second series.
// Environment: PCACHE_BENCH_RBD_PARTS (default qd1,sustained), PCACHE_BENCH_SECONDS (the pcache
// sustained run, default 120), PCACHE_BENCH_DIRECT_SECONDS (each of the two direct sustained
// runs, default 30), PCACHE_BENCH_SEGMENT_MIB (its cache's segment size), PCACHE_BENCH_SVG (draw
// the sustained series there).
// PCACHE_BENCH_SMOKE=1: tiny sizes, one short round, a few seconds of sustained writes.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { controlRequest } from '../src/cli/control_client.js';
import { median, param, report, smoke } from './harness.js';
import { fill, fioJob, makeScratch, removeScratch, requireTool, run, startPcacheServe, stopChild, version } from './processes.js';
import { sustainedWrites } from './rbd_sustained.js';

const MiB = 1024 * 1024;
const scriptPath = fileURLToPath(new URL('../../scripts/ceph_cluster.sh', import.meta.url));
const rangeBytes = param(8 * MiB, 128 * MiB);
const cacheBytes = param(128 * MiB, 1024 * MiB);
const rounds = param(1, 5);
const runtime = param('200ms', '5s');
const rampTime = param('0', '1s');
const target = 10;
/** Which parts run (PCACHE_BENCH_RBD_PARTS, comma list): the QD1 comparison, the sustained writes past the cache. */
const parts = new Set((process.env.PCACHE_BENCH_RBD_PARTS ?? 'qd1,sustained').split(','));
const sustainedRangeBytes = param(32 * MiB, 512 * MiB);
const sustainedCacheBytes = param(8 * MiB, 128 * MiB);
const sustainedSeconds = Number(process.env.PCACHE_BENCH_SECONDS ?? param(4, 120));
const sustainedDirectSeconds = Number(process.env.PCACHE_BENCH_DIRECT_SECONDS ?? param(2, 30));
const sustainedDepth = 16;
/** serve --segment-size of the sustained run (PCACHE_BENCH_SEGMENT_MIB; default serve's own). Smoke runs use an 8 MiB cache, so segments of 1 MiB let the log wrap within seconds. */
const sustainedSegmentBytes = process.env.PCACHE_BENCH_SEGMENT_MIB === undefined ? param<number | undefined>(MiB, undefined) : Number(process.env.PCACHE_BENCH_SEGMENT_MIB) * MiB;
/** The OSD's object store (PCACHE_BENCH_CEPH_STORE): bluestore over a file (what clusters run) or memstore (objects in the OSD's memory: the fastest peer). */
const store = process.env.PCACHE_BENCH_CEPH_STORE ?? 'bluestore';
if (store !== 'bluestore' && store !== 'memstore') throw new Error(`PCACHE_BENCH_CEPH_STORE must be bluestore or memstore, not ${store}`);

/** Whether the read workload also runs through pcache in front of a tmpfs file (PCACHE_BENCH_RBD_FILE_PEER=1). */
const filePeer = process.env.PCACHE_BENCH_RBD_FILE_PEER === '1';

type Side = 'pcache' | 'direct' | 'file';

const workloads = [
  { name: '4K random read QD1 (cached)', rw: 'randread' },
  { name: '4K random write QD1', rw: 'randwrite' },
] as const;

async function fio(socket: string, rw: 'randread' | 'randwrite' | 'read' | 'write', blockSize: string, depth: number, timed: boolean, sizeBytes = rangeBytes): Promise<number> {
  const output = await run('fio', [
    `--name=${rw}`, '--ioengine=nbd', `--uri=nbd+unix:///?socket=${socket}`, `--rw=${rw}`, `--bs=${blockSize}`, `--iodepth=${depth}`,
    '--numjobs=1', '--thread', `--size=${sizeBytes}`, ...(timed ? ['--time_based', `--runtime=${runtime}`, `--ramp_time=${rampTime}`] : []),
    '--norandommap', '--randrepeat=0', '--output-format=json',
  ]);
  const job = fioJob(output, `${rw} on ${socket}`);
  return job.read.iops + job.write.iops;
}

interface Counters { readRequests: number; readHitRequests: number; writebackBytes: number }
async function counters(control: string): Promise<{ dirtyBytes: number; counters: Counters }> {
  return ((await controlRequest(control, 'status')) as { cache: { dirtyBytes: number; counters: Counters } }).cache;
}

/** The QD1 comparison: pcache with the whole range cached in front of one image, the other image straight. */
async function qd1Comparison(dir: string, clusterDir: string): Promise<void> {
  const cache = path.join(dir, 'cache.img');
  fill(cache, cacheBytes, false);
  const control = path.join(dir, 'pcache.ctl');
  const socket = path.join(dir, 'pcache.sock');
  // The sequential cutoff is off (sequential_cutoff_bytes=0): the warm-up reads the range in order, and with the cutoff on those reads would not be admitted; the benchmark measures the cache's own path.
  const child = await startPcacheServe('pcache serve', dir, socket, ['--cache', cache, '--backing', `nbd+unix:///?socket=${path.join(clusterDir, 'cached.sock')}`, '--control', control, '--tuning', 'sequential_cutoff_bytes=0']);
  // The control: the same settings in front of a tmpfs file (its cache file is filled the same way).
  const fileControl = path.join(dir, 'file.ctl');
  const fileCache = path.join(dir, 'file-cache.img');
  let fileChild: Awaited<ReturnType<typeof startPcacheServe>> | undefined;
  try {
    const sockets: Record<Side, string> = { pcache: socket, direct: path.join(clusterDir, 'direct.sock'), file: path.join(dir, 'file.sock') };
    if (filePeer) {
      const backing = path.join(dir, 'file-backing.img');
      fill(backing, rangeBytes, true);
      fill(fileCache, cacheBytes, false);
      fileChild = await startPcacheServe('pcache serve (file backing)', dir, sockets.file, ['--cache', fileCache, '--backing', backing, '--control', fileControl, '--tuning', 'sequential_cutoff_bytes=0']);
    }
    // Both images get written once in full, so neither side reads unallocated RBD objects.
    await fio(sockets.direct, 'randwrite', '1m', 4, false);
    const warmed: [Side, string][] = [['pcache', control], ...(filePeer ? [['file', fileControl] as [Side, string]] : [])];
    for (const [side, ctl] of warmed) {
      await fio(sockets[side], 'randwrite', '1m', 4, false);
      await controlRequest(ctl, 'drain');
      await fio(sockets[side], 'read', '1m', 4, false); // the whole range in the cache
    }
    // The same read pass straight: the OSD's own cache (bluestore keeps what it reads, writes are not cached) gets the same warm-up as pcache's.
    await fio(sockets.direct, 'read', '1m', 4, false);
    console.log(`QD1: RBD images of ${rangeBytes / MiB} MiB; pcache cache ${cacheBytes / MiB} MiB on ${dir}; ${rounds} round(s) of ${runtime} per run; load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    for (const workload of workloads) {
      const results: Record<Side, number[]> = { pcache: [], direct: [], file: [] };
      const drainsMs: number[] = [];
      // Read requests and hits seen by each pcache server.
      const reads: Record<Side, number> = { pcache: 0, direct: 0, file: 0 };
      const hits: Record<Side, number> = { pcache: 0, direct: 0, file: 0 };
      const withFile = filePeer && workload.rw === 'randread';
      for (let round = 0; round < rounds; round++) {
        const order: Side[] = round % 2 === 0 ? ['pcache', 'direct'] : ['direct', 'pcache'];
        if (withFile) order.splice(round % 3, 0, 'file');
        for (const side of order) {
          const ctl = side === 'pcache' ? control : side === 'file' ? fileControl : undefined;
          const before = ctl === undefined ? undefined : await counters(ctl);
          results[side].push(await fio(sockets[side], workload.rw, '4k', 1, true));
          if (before === undefined || ctl === undefined) continue;
          const after = await counters(ctl);
          reads[side] += after.counters.readRequests - before.counters.readRequests;
          hits[side] += after.counters.readHitRequests - before.counters.readHitRequests;
          if (side === 'file') continue;
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
      const hitRate = reads.pcache === 0 ? '' : `; pcache read hits ${(100 * hits.pcache / reads.pcache).toFixed(1)}%`;
      console.log(`  ${workload.name}: ratio ${ratio.toFixed(2)}, target >= ${target.toFixed(1)}: ${ratio >= target ? 'met' : 'MISSED'}${hitRate}; ` +
        `runs pcache ${results.pcache.map(Math.round).join(' ')} | direct ${results.direct.map(Math.round).join(' ')}; load average ${os.loadavg()[0]?.toFixed(2) ?? '?'}`);
      if (withFile) {
        const file = median(results.file);
        console.log(`  the same through pcache in front of a tmpfs file (control): median ${Math.round(file)} IOPS, ${(file / value).toFixed(2)}x the RBD-backed pcache; read hits ${(100 * hits.file / Math.max(1, reads.file)).toFixed(1)}%; runs ${results.file.map(Math.round).join(' ')}`);
      }
      if (drainsMs.length > 0) console.log(`  drains after the write runs: ${drainsMs.map((ms) => `${(ms / 1000).toFixed(2)} s`).join(', ')}`);
    }
  } finally {
    await stopChild(child);
    if (fileChild !== undefined) await stopChild(fileChild);
    fs.rmSync(cache, { force: true });
    fs.rmSync(fileCache, { force: true });
  }
}

async function main(): Promise<void> {
  for (const [tool, debianPackage] of [['fio', 'fio'], ['ceph-mon', 'ceph-mon'], ['ceph-osd', 'ceph-osd'], ['rbd', 'ceph-common'], ['qemu-nbd', 'qemu-utils']] as const) requireTool(tool, debianPackage);
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const dir = makeScratch(base, 'pcache-bench-rbd-');
  const clusterDir = makeScratch(os.tmpdir(), 'pcache-bench-ceph-');
  const images = [
    ...(parts.has('qd1') ? [`cached:${rangeBytes / MiB}M`, `direct:${rangeBytes / MiB}M`] : []),
    ...(parts.has('sustained') ? [`sus-cached:${sustainedRangeBytes / MiB}M`, `sus-direct:${sustainedRangeBytes / MiB}M`] : []),
  ];
  const storeLabel = `1 mon, 1 OSD on ${store === 'bluestore' ? `bluestore over a sparse file in ${os.tmpdir()}` : 'memstore'}, pool size 1, qemu-nbd --cache=none`;
  try {
    // bluestore with Ceph's own cache sizing (autotuned to osd_memory_target), as a deployed OSD runs, not the tests' small cache.
    await run('env', [`CEPH_OSD_STORE=${store}`, 'CEPH_BLUESTORE_CACHE=ceph', 'bash', scriptPath, 'start', clusterDir, ...images]);
    console.log(`machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), Node ${process.version}, ${version('fio', ['--version'])}, ${version('ceph-osd', ['--version']).split(' (')[0] ?? ''}, ${version('qemu-nbd', ['--version']).split('\n')[0] ?? ''}; load average at start ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    console.log(`backing: ${storeLabel}${smoke ? ' (smoke)' : ''}`);
    if (parts.has('qd1')) await qd1Comparison(dir, clusterDir);
    if (parts.has('sustained')) {
      // Both images written in full first, straight (pcache starts on a new cache afterwards), so no side writes into unallocated objects.
      for (const image of ['sus-cached', 'sus-direct']) await fio(path.join(clusterDir, `${image}.sock`), 'write', '1m', 4, false, sustainedRangeBytes);
      await sustainedWrites({
        dir, cachedImageSocket: path.join(clusterDir, 'sus-cached.sock'), directImageSocket: path.join(clusterDir, 'sus-direct.sock'),
        rangeBytes: sustainedRangeBytes, cacheBytes: sustainedCacheBytes, ...(sustainedSegmentBytes === undefined ? {} : { segmentSizeBytes: sustainedSegmentBytes }), depth: sustainedDepth, pcacheSeconds: sustainedSeconds,
        directSeconds: sustainedDirectSeconds, store: `1 OSD, ${store}`, ...(process.env.PCACHE_BENCH_SVG === undefined ? {} : { svgPath: process.env.PCACHE_BENCH_SVG }),
      });
    }
    console.log(`load average at end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  } finally {
    await run('bash', [scriptPath, 'stop', clusterDir]).catch((error: unknown) => { console.error(`stopping the cluster: ${String(error)}`); });
    removeScratch(dir);
    removeScratch(clusterDir);
  }
}

await main();
