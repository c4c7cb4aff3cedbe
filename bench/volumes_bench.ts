// Isolation of volumes (issue 14): with one volume under sustained random writes, do another
// volume's QD1 4 KiB read hits stay within 2x of their latency when it is alone? Both volumes'
// engines, writeback and GC share one process (one event loop) on a shared machine, so the
// question is whether A's background work delays B's hits.
//
// Setup, through the real CLI: `pcache serve --cache NEW --cache-size ... --segment-size ...
// --tuning sequential_cutoff_bytes=0` with no --backing (a pool; the cache file does not exist
// before, so it is created sparse), then `pcache volume add` twice:
// - A: the writer. Its backing device is either a file on tmpfs behind nbdkit's delay filter
//   (1 ms per read/write/zero/trim: a remote store, so A's writeback is slow and never ends;
//   store `delay`) or the tmpfs file itself (writeback as fast as the CPU allows, the most
//   CPU A can take from B; store `file`). PCACHE_BENCH_STORE picks (default: both, one after
//   the other, each with its own server).
// - B: the reader. A tmpfs file of random data; its read set (a quarter of its share) is read
//   through pcache once in order, so every measured read is a hit (the hit rate is printed).
//
// Three layouts of the same two volumes (same shares, settings and kinds of backing device):
// `shared`, one pool served by one `pcache serve` as it starts by default, each volume in a
// volume process of its own (--volume-processes on); `in-process`, the same pool served with
// --volume-processes off, both engines on the serve process's one event loop; and the peer,
// `split`, each volume in a pool of its own served by its own `pcache serve` process (volumes in
// process) — the same load on the machine, but no shared event loop. Each round measures B six
// times, in rotated order: each layout alone (A idle and drained) or together (A taking 4 KiB random writes at QD32
// over twice its share; B's run starts once A's writeback has written to A's backing device and
// its GC has freed a segment, and `leadSeconds` more, so that both run throughout). B's run: fio
// (nbd engine, one job) 4 KiB random reads at QD1 over its read set for `seconds`; fio's
// completion-latency percentiles p50 and p99. After each together phase A is drained. What is
// reported, per layout: medians over the rounds of B's p50 and p99, alone and together, and
// their ratios (goal <= 2); A's write rate, writeback and GC during B's runs (pcache's
// counters); pcache's CPU in each phase (every process of the layout) and how long the main
// thread of the process serving B (its volume process, in `shared`) waited, runnable, for a
// CPU (/proc: how loaded the machine was); and shared and in-process against split with A
// writing (what sharing one pool, or one event loop, costs B).
//
// Environment: PCACHE_BENCH_STORE (delay, file or delay,file), PCACHE_BENCH_SECONDS (B's run,
// default 10), PCACHE_BENCH_ROUNDS (default 5), PCACHE_BENCH_TUNING (more --tuning pairs),
// PCACHE_BENCH_LOOP_PROBE=1 (bench/loop_probe.ts preloaded into every server: the event loop's
// delay in B's server during each of B's runs, printed per phase).
// PCACHE_BENCH_SMOKE=1: tiny sizes, one short round per store (the test suite runs that).

import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { controlRequest } from '../src/cli/control_client.js';
import { median, param, report, smoke } from './harness.js';
import { fill, fioJob, makeScratch, removeScratch, requireTool, run, runPcacheCli, startNbdkitServer, startPcacheServe, stopChild, track, version } from './processes.js';
import { cpuTicks, userHz } from './sustained_series.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const segmentMiB = param(4, 16);
const shareAMiB = param(32, 256);
const shareBMiB = param(32, 128);
/** A writes over twice its share, so GC must free segments all the time. */
const rangeABytes = 2 * shareAMiB * MiB;
/** B's read set: a quarter of its share, so it stays whole in the cache. */
const readSetBytes = (shareBMiB / 4) * MiB;
const seconds = Number(process.env.PCACHE_BENCH_SECONDS ?? param(1, 10));
const rounds = Number(process.env.PCACHE_BENCH_ROUNDS ?? param(1, 5));
/** How long A writes before B's run once its writeback and GC have both begun. */
const leadSeconds = param(0, 2);
/** The longest A may write before its writeback and GC have both begun (else the run fails). */
const backgroundWaitMs = 120_000;
const writerDepth = 32;
const stores = (process.env.PCACHE_BENCH_STORE ?? 'delay,file').split(',').filter((text) => text !== '');
const extraTuning = (process.env.PCACHE_BENCH_TUNING ?? '').split(',').filter((text) => text !== '');
const delay = '1ms';
const delayedOps = ['read', 'write', 'zero', 'trim'];
const goal = 2;
/** bench/loop_probe.ts, preloaded into the servers when PCACHE_BENCH_LOOP_PROBE=1. */
const loopProbe = process.env.PCACHE_BENCH_LOOP_PROBE === '1' ? fileURLToPath(new URL('./loop_probe.js', import.meta.url)) : undefined;

interface VolumeStatus {
  name: string;
  cache: {
    dirtyBytes: number;
    counters: { readRequests: number; readHitRequests: number; writeRequests: number; writebackBackingBytes: number; gcSegmentsFreed: number };
  } | null;
}

/**
 * Where the two volumes are served. `shared`: one `pcache serve` of a pool holding both (what
 * is measured). `split`: the peer, each volume in a pool of its own in its own `pcache serve`
 * process, same shares and settings: the same load on the machine, but no shared event loop.
 */
interface Layout {
  readonly name: 'shared' | 'in-process' | 'split';
  readonly socketOf: Readonly<Record<'A' | 'B', string>>;
  readonly controlOf: Readonly<Record<'A' | 'B', string>>;
  /** The process serving B first (its volume process, or its server), then every other process of the layout. */
  readonly pids: readonly number[];
  /** Where the loop probe in B's server writes (PCACHE_BENCH_LOOP_PROBE=1). */
  readonly probeFileOfB: string | undefined;
}

interface LoopDelay {
  readonly p50Ms: number;
  readonly p99Ms: number;
  readonly maxMs: number;
}

/** Asks the loop probe in B's server for the delays since it last asked (SIGUSR2) and waits for its answer. */
async function loopDelay(layout: Layout): Promise<LoopDelay | undefined> {
  const file = layout.probeFileOfB;
  if (file === undefined) return undefined;
  const lines = (): string[] => (existsSync(file) ? readFileSync(file, 'utf8').split('\n').filter((line) => line !== '') : []);
  const before = lines().length;
  process.kill(layout.pids[0] ?? 0, 'SIGUSR2');
  for (let attempt = 0; attempt < 500 && lines().length === before; attempt++) await new Promise((resolve) => setTimeout(resolve, 10));
  const now = lines();
  const last = now.at(-1);
  if (last === undefined || now.length === before) throw new Error(`the loop probe in pid ${layout.pids[0] ?? 0} did not answer`);
  return JSON.parse(last) as LoopDelay;
}

interface Snapshot {
  readonly atMs: number;
  readonly cpuTicks: number;
  /** Nanoseconds the main thread of B's server has waited, runnable, for a CPU (/proc/PID/schedstat). */
  readonly bRunqueueWaitNs: number;
  readonly volumes: Map<string, NonNullable<VolumeStatus['cache']>>;
}

/** The main thread's time spent runnable but waiting for a CPU, in ns (the second field of schedstat). */
function runqueueWaitNs(pid: number): number {
  return Number(readFileSync(`/proc/${pid}/task/${pid}/schedstat`, 'utf8').split(' ')[1]);
}

async function snapshot(layout: Layout): Promise<Snapshot> {
  const volumes = new Map<string, NonNullable<VolumeStatus['cache']>>();
  for (const control of new Set(Object.values(layout.controlOf))) {
    const status = await controlRequest(control, 'status') as { volumes: VolumeStatus[] };
    for (const volume of status.volumes) if (volume.cache !== null) volumes.set(volume.name, volume.cache);
  }
  return { atMs: performance.now(), cpuTicks: layout.pids.reduce((sum, pid) => sum + cpuTicks(pid), 0), bRunqueueWaitNs: runqueueWaitNs(layout.pids[0] ?? 0), volumes };
}

interface Delta {
  readonly bReads: number;
  readonly bHits: number;
  readonly aWrites: number;
  readonly aWritebackBytes: number;
  readonly aGcSegments: number;
  readonly seconds: number;
  readonly cpuPercent: number;
  readonly bRunqueueWaitMsPerS: number;
}

/** What happened between two snapshots: B's reads and hits, A's writes, writeback and GC, pcache's CPU. */
function between(a: Snapshot, b: Snapshot): Delta {
  const counters = (snap: Snapshot, name: string): NonNullable<VolumeStatus['cache']>['counters'] => {
    const cache = snap.volumes.get(name);
    if (cache === undefined) throw new Error(`volume ${name} is not serving`);
    return cache.counters;
  };
  const dt = Math.max(0.001, (b.atMs - a.atMs) / 1000);
  return {
    bReads: counters(b, 'B').readRequests - counters(a, 'B').readRequests,
    bHits: counters(b, 'B').readHitRequests - counters(a, 'B').readHitRequests,
    aWrites: counters(b, 'A').writeRequests - counters(a, 'A').writeRequests,
    aWritebackBytes: counters(b, 'A').writebackBackingBytes - counters(a, 'A').writebackBackingBytes,
    aGcSegments: counters(b, 'A').gcSegmentsFreed - counters(a, 'A').gcSegmentsFreed,
    seconds: dt,
    cpuPercent: (100 * (b.cpuTicks - a.cpuTicks)) / userHz / dt,
    bRunqueueWaitMsPerS: (b.bRunqueueWaitNs - a.bRunqueueWaitNs) / 1e6 / dt,
  };
}

interface Latency {
  readonly p50Us: number;
  readonly p99Us: number;
  readonly iops: number;
}

/** B's measured run: QD1 4 KiB random reads over its read set; fio's completion-latency percentiles. */
async function readRun(socket: string): Promise<Latency> {
  const output = await run('fio', [
    '--name=hits', '--ioengine=nbd', `--uri=nbd+unix:///B?socket=${socket}`, '--rw=randread', '--bs=4k', '--iodepth=1',
    '--numjobs=1', '--thread', `--size=${readSetBytes}`, '--time_based', `--runtime=${seconds}`, '--norandommap', '--randrepeat=0',
    '--output-format=json',
  ]);
  const job = fioJob(output, 'B random reads') as unknown as { read: { iops: number; clat_ns: { percentile: Record<string, number> } } };
  const percentile = job.read.clat_ns.percentile;
  return { p50Us: (percentile['50.000000'] ?? Number.NaN) / 1000, p99Us: (percentile['99.000000'] ?? Number.NaN) / 1000, iops: job.read.iops };
}

/**
 * A's load: fio 4 KiB random writes at QD32 over twice its share, until stopped (SIGINT, after
 * which fio exits on its own). Its rate is taken from pcache's counters, over B's run.
 */
function startWriter(socket: string): ChildProcess {
  return track(spawn('fio', [
    '--name=writer', '--ioengine=nbd', `--uri=nbd+unix:///A?socket=${socket}`, '--rw=randwrite', '--bs=4k', `--iodepth=${writerDepth}`,
    '--numjobs=1', '--thread', `--size=${rangeABytes}`, '--time_based', '--runtime=3600', '--norandommap', '--randrepeat=0',
  ], { stdio: 'ignore' }));
}

/** Waits until A's writeback has written to its backing device and GC has freed a segment since `from`. */
async function untilBackgroundWork(layout: Layout, from: Snapshot, writer: ChildProcess): Promise<void> {
  const deadline = performance.now() + backgroundWaitMs;
  for (;;) {
    if (writer.exitCode !== null) throw new Error(`the writer (fio on A) exited with ${writer.exitCode}`);
    const d = between(from, await snapshot(layout));
    if (d.aWritebackBytes > 0 && d.aGcSegments > 0) return;
    if (performance.now() > deadline) throw new Error(`A's writeback and GC did not both start within ${backgroundWaitMs / 1000} s of its writes (written back ${d.aWritebackBytes} bytes, ${d.aGcSegments} segments freed)`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function stopWriter(writer: ChildProcess): Promise<void> {
  if (writer.exitCode !== null || writer.signalCode !== null) return;
  const exited = new Promise((resolve) => writer.once('exit', resolve));
  writer.kill('SIGINT');
  const timer = setTimeout(() => writer.kill('SIGKILL'), 30_000);
  await exited;
  clearTimeout(timer);
}

interface Phase {
  readonly latency: Latency;
  readonly loop: LoopDelay | undefined;
  readonly hitPercent: number;
  readonly aIops: number;
  readonly aWritebackMiBs: number;
  readonly aGcSegments: number;
  readonly cpuPercent: number;
  readonly bRunqueueWaitMsPerS: number;
}

function phaseOf(latency: Latency, d: Delta, loop: LoopDelay | undefined): Phase {
  return {
    latency,
    loop,
    hitPercent: d.bReads === 0 ? 0 : (100 * d.bHits) / d.bReads,
    aIops: d.aWrites / d.seconds,
    aWritebackMiBs: d.aWritebackBytes / MiB / d.seconds,
    aGcSegments: d.aGcSegments,
    cpuPercent: d.cpuPercent,
    bRunqueueWaitMsPerS: d.bRunqueueWaitMsPerS,
  };
}

function describePhase(round: number, what: string, phase: Phase): void {
  console.log(`  round ${round} ${what.padEnd(19)}: B p50 ${phase.latency.p50Us.toFixed(1).padStart(7)} us, p99 ${phase.latency.p99Us.toFixed(1).padStart(7)} us, ` +
    `${Math.round(phase.latency.iops)} IOPS, hits ${phase.hitPercent.toFixed(1)}%; A ${Math.round(phase.aIops)} writes/s, ` +
    `written back ${phase.aWritebackMiBs.toFixed(1)} MiB/s, GC freed ${phase.aGcSegments} segments; pcache CPU ${phase.cpuPercent.toFixed(0)}%, ` +
    `B's server waited for a CPU ${phase.bRunqueueWaitMsPerS.toFixed(0)} ms/s` +
    (phase.loop === undefined ? '' : `; its loop's ticks p50 ${phase.loop.p50Ms.toFixed(2)} ms, p99 ${phase.loop.p99Ms.toFixed(2)} ms, max ${phase.loop.maxMs.toFixed(1)} ms`));
}

/** B measured alone (`writing` false) or while A takes its writes and runs writeback and GC. */
async function measure(layout: Layout, writing: boolean): Promise<Phase> {
  if (!writing) {
    await loopDelay(layout);
    const before = await snapshot(layout);
    const latency = await readRun(layout.socketOf.B);
    const d = between(before, await snapshot(layout));
    return phaseOf(latency, d, await loopDelay(layout));
  }
  const writer = startWriter(layout.socketOf.A);
  let phase: Phase;
  try {
    await untilBackgroundWork(layout, await snapshot(layout), writer);
    await new Promise((resolve) => setTimeout(resolve, leadSeconds * 1000));
    await loopDelay(layout);
    const before = await snapshot(layout);
    const latency = await readRun(layout.socketOf.B);
    const d = between(before, await snapshot(layout));
    phase = phaseOf(latency, d, await loopDelay(layout));
  } finally {
    await stopWriter(writer);
  }
  // A idle again for the next alone phase: everything written back.
  await controlRequest(layout.controlOf.A, 'drain', { volume: 'A' });
  return phase;
}

/** Starts a `pcache serve` of a new pool (a sparse cache file it creates) holding the given volumes. */
async function startPool(dir: string, name: string, volumes: readonly { name: 'A' | 'B'; backing: string; shareMiB: number }[], volumeProcesses: boolean): Promise<{ child: ChildProcess; socket: string; control: string; probeFile: string | undefined; volumePids: Partial<Record<'A' | 'B', number>> }> {
  const socket = path.join(dir, `${name}.sock`);
  const control = path.join(dir, `${name}.ctl`);
  const probeFile = loopProbe === undefined ? undefined : path.join(dir, `${name}.loop`);
  const env: Record<string, string> = loopProbe === undefined || probeFile === undefined ? {} : {
    NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --import ${pathToFileURL(loopProbe).href}`.trim(),
    PCACHE_LOOP_PROBE_FILE: probeFile,
  };
  const sizeMiB = volumes.reduce((sum, volume) => sum + volume.shareMiB, 0) + 2 * segmentMiB;
  const child = await startPcacheServe(`pcache serve (${name})`, dir, socket, [
    '--cache', path.join(dir, `${name}.img`), '--cache-size', `${sizeMiB}M`, '--segment-size', `${segmentMiB}M`, '--control', control,
    '--tuning', ['sequential_cutoff_bytes=0', ...extraTuning].join(','), '--volume-processes', volumeProcesses ? 'on' : 'off',
  ], env);
  for (const volume of volumes) {
    await runPcacheCli(['volume', 'add', '--control', control, '--name', volume.name, '--backing', volume.backing, '--cache-size', `${volume.shareMiB}M`]);
  }
  const status = await controlRequest(control, 'status') as { volumes: { name: 'A' | 'B'; pid?: number | null }[] };
  const volumePids: Partial<Record<'A' | 'B', number>> = {};
  for (const volume of status.volumes) if (typeof volume.pid === 'number') volumePids[volume.name] = volume.pid;
  return { child, socket, control, probeFile, volumePids };
}

/** Warms B: one pass in order brings its read set into its share. */
async function warm(socket: string): Promise<void> {
  await run('fio', ['--name=warm', '--ioengine=nbd', `--uri=nbd+unix:///B?socket=${socket}`, '--rw=read', '--bs=1m', '--iodepth=4', '--numjobs=1', '--thread', `--size=${readSetBytes}`, '--output-format=json']);
}

interface Summary {
  readonly p50Alone: number;
  readonly p99Alone: number;
  readonly p50Together: number;
  readonly p99Together: number;
}

function summarize(store: string, layout: Layout['name'], alone: readonly Phase[], together: readonly Phase[]): Summary {
  const summary = {
    p50Alone: median(alone.map((phase) => phase.latency.p50Us)),
    p99Alone: median(alone.map((phase) => phase.latency.p99Us)),
    p50Together: median(together.map((phase) => phase.latency.p50Us)),
    p99Together: median(together.map((phase) => phase.latency.p99Us)),
  };
  const tag = `${store} ${layout}`;
  report({ bench: 'volumes', metric: `B 4K read hit QD1 p50 ${tag}`, value: summary.p50Together, unit: 'us', peer: 'B alone', peerValue: summary.p50Alone });
  report({ bench: 'volumes', metric: `B 4K read hit QD1 p99 ${tag}`, value: summary.p99Together, unit: 'us', peer: 'B alone', peerValue: summary.p99Alone });
  report({ bench: 'volumes', metric: `A 4K rand write QD${writerDepth} ${tag}`, value: median(together.map((phase) => phase.aIops)), unit: 'IOPS' });
  const verdict = (ratio: number): string => (ratio <= goal ? 'met' : 'MISSED');
  const p50Ratio = summary.p50Together / summary.p50Alone;
  const p99Ratio = summary.p99Together / summary.p99Alone;
  console.log(`  ${tag}: B's QD1 read hits, alone vs with A writing: p50 ${summary.p50Alone.toFixed(1)} vs ${summary.p50Together.toFixed(1)} us = ${p50Ratio.toFixed(2)}x (goal <= ${goal}: ${verdict(p50Ratio)}); ` +
    `p99 ${summary.p99Alone.toFixed(1)} vs ${summary.p99Together.toFixed(1)} us = ${p99Ratio.toFixed(2)}x (goal <= ${goal}: ${verdict(p99Ratio)}); ` +
    `A ${Math.round(median(together.map((phase) => phase.aIops)))} writes/s, written back ${median(together.map((phase) => phase.aWritebackMiBs)).toFixed(1)} MiB/s; ` +
    `pcache CPU ${median(alone.map((phase) => phase.cpuPercent)).toFixed(0)}% alone, ${median(together.map((phase) => phase.cpuPercent)).toFixed(0)}% together; ` +
    `B's server waited for a CPU ${median(alone.map((phase) => phase.bRunqueueWaitMsPerS)).toFixed(0)} ms/s alone, ${median(together.map((phase) => phase.bRunqueueWaitMsPerS)).toFixed(0)} ms/s together` +
    (loopProbe === undefined ? '' : `; its loop's ticks p99 ${median(alone.map((phase) => phase.loop?.p99Ms ?? 0)).toFixed(2)} ms alone, ${median(together.map((phase) => phase.loop?.p99Ms ?? 0)).toFixed(2)} ms together`) + ' (medians)');
  return summary;
}

async function runStore(base: string, store: string): Promise<void> {
  if (store !== 'delay' && store !== 'file') throw new Error(`PCACHE_BENCH_STORE: ${store} is neither delay nor file`);
  const dir = makeScratch(base, `pcache-bench-volumes-${store}-`);
  const started: ChildProcess[] = [];
  try {
    // Each layout's volumes have backing devices of their own (a backing device serves one volume).
    const backing: Record<'A' | 'B', Record<Layout['name'], string>> = { A: { shared: '', 'in-process': '', split: '' }, B: { shared: '', 'in-process': '', split: '' } };
    for (const layoutName of ['shared', 'in-process', 'split'] as const) {
      const fileA = path.join(dir, `a-${layoutName}.img`);
      const fileB = path.join(dir, `b-${layoutName}.img`);
      fill(fileA, rangeABytes, true);
      fill(fileB, readSetBytes, true);
      backing.A[layoutName] = fileA;
      backing.B[layoutName] = fileB;
      if (store === 'delay') {
        const storeSocket = path.join(dir, `nbdkit-${layoutName}.sock`);
        started.push(await startNbdkitServer(dir, storeSocket, ['-f', '--exit-with-parent', '--filter=delay', 'file', `file=${fileA}`, ...delayedOps.map((op) => `delay-${op}=${delay}`)]));
        backing.A[layoutName] = `nbd+unix:///?socket=${storeSocket}`;
      }
    }
    const pool = await startPool(dir, 'pool', [{ name: 'A', backing: backing.A.shared, shareMiB: shareAMiB }, { name: 'B', backing: backing.B.shared, shareMiB: shareBMiB }], true);
    started.push(pool.child);
    const inProcess = await startPool(dir, 'pool-in-process', [{ name: 'A', backing: backing.A['in-process'], shareMiB: shareAMiB }, { name: 'B', backing: backing.B['in-process'], shareMiB: shareBMiB }], false);
    started.push(inProcess.child);
    const poolA = await startPool(dir, 'pool-a', [{ name: 'A', backing: backing.A.split, shareMiB: shareAMiB }], false);
    started.push(poolA.child);
    const poolB = await startPool(dir, 'pool-b', [{ name: 'B', backing: backing.B.split, shareMiB: shareBMiB }], false);
    started.push(poolB.child);
    const { A: volumeA, B: volumeB } = pool.volumePids;
    if (volumeA === undefined || volumeB === undefined) throw new Error('the shared pool reports no volume processes');
    const layouts: Layout[] = [
      { name: 'shared', socketOf: { A: pool.socket, B: pool.socket }, controlOf: { A: pool.control, B: pool.control }, pids: [volumeB, pool.child.pid ?? 0, volumeA], probeFileOfB: pool.probeFile },
      { name: 'in-process', socketOf: { A: inProcess.socket, B: inProcess.socket }, controlOf: { A: inProcess.control, B: inProcess.control }, pids: [inProcess.child.pid ?? 0], probeFileOfB: inProcess.probeFile },
      { name: 'split', socketOf: { A: poolA.socket, B: poolB.socket }, controlOf: { A: poolA.control, B: poolB.control }, pids: [poolB.child.pid ?? 0, poolA.child.pid ?? 0], probeFileOfB: poolB.probeFile },
    ];
    for (const layout of layouts) await warm(layout.socketOf.B);
    console.log(`store ${store}: A's backing ${store === 'delay' ? `a file on ${base} behind nbdkit's delay filter (${delay} per ${delayedOps.join('/')} request)` : `a file on ${base}`}, ` +
      `A's share ${shareAMiB} MiB, writes over ${rangeABytes / MiB} MiB; B's backing a file on ${base}, share ${shareBMiB} MiB, read set ${readSetBytes / MiB} MiB; ` +
      `${segmentMiB} MiB segments; ${rounds} round(s), B's runs ${seconds} s, starting ${leadSeconds} s after A's writeback and GC have begun${smoke ? ' (smoke)' : ''}`);

    const phases = layouts.flatMap((_layout, index) => [{ layout: index, writing: false }, { layout: index, writing: true }]);
    const results = layouts.map(() => ({ alone: [] as Phase[], together: [] as Phase[] }));
    for (let round = 1; round <= rounds; round++) {
      // Rotate the order, so no phase always follows the same one.
      for (let index = 0; index < phases.length; index++) {
        const step = phases[(index + round - 1) % phases.length];
        const layout = step === undefined ? undefined : layouts[step.layout];
        const into = step === undefined ? undefined : results[step.layout];
        if (step === undefined || layout === undefined || into === undefined) continue;
        const phase = await measure(layout, step.writing);
        (step.writing ? into.together : into.alone).push(phase);
        describePhase(round, `${layout.name} ${step.writing ? 'together' : 'alone'}`, phase);
      }
    }
    const [shared, inOne, split] = layouts.map((layout, index) => summarize(store, layout.name, results[index]?.alone ?? [], results[index]?.together ?? []));
    if (shared !== undefined && inOne !== undefined && split !== undefined) {
      console.log(`  ${store}: against two servers, with A writing: volume processes B's p50 ${(shared.p50Together / split.p50Together).toFixed(2)}x, p99 ${(shared.p99Together / split.p99Together).toFixed(2)}x; ` +
        `one process B's p50 ${(inOne.p50Together / split.p50Together).toFixed(2)}x, p99 ${(inOne.p99Together / split.p99Together).toFixed(2)}x`);
    }
  } finally {
    for (const child of started.reverse()) await stopChild(child);
    removeScratch(dir);
  }
}

async function main(): Promise<void> {
  requireTool('fio', 'fio');
  requireTool('nbdkit', 'nbdkit');
  const base = existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  console.log(`machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), Node ${process.version}, ${version('fio', ['--version'])}, ${version('nbdkit', ['--version'])}; load average at start ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  for (const store of stores) await runStore(base, store);
  console.log(`load average at end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
}

await main();
