// Fragmented reads (issue 16, part 4): 1 MiB sequential reads at QD8 of data that random 4 KiB
// writes laid down, against nbdkit's file plugin on the same file and against pcache's own
// figure for the same range written sequentially.
//
// What runs: a backing file of random data on tmpfs (/dev/shm), nbdkit's `file` plugin serving
// it, and `pcache serve` started by the real CLI on a cache file that does not exist yet (created
// sparse by `--cache-size` and formatted as a new user's would be). In every round:
// 1. a fresh pcache with rewrites off (`fragmented_rewrite_pieces=0`); fio writes the range in
//    4 KiB random writes at QD32, every block once (fio's random map), so a 1 MiB range of the
//    disk lies in 256 pieces scattered over the log;
// 2. "not written back, piece by piece": 1 MiB sequential reads at QD8 over the range, all
//    pieces still dirty, each read from the cache on its own: by the default, in one batch per
//    request on the cache device's own thread, and ("on the event loop") with
//    `fragmented_thread_pieces=0`, one pread per piece on the event loop, the two in an order
//    that alternates by round;
// 3. drain (everything written back), then, in an order that rotates by round, "written back"
//    (the default: one backing read per request, dirty pieces copied over it), the same reads
//    with `fragmented_read_pieces=0` (the read served piece by piece from the cache), nbdkit,
//    and `pcache serve --no-cache` on the same file (pcache's NBD server with no cache: the
//    floor a read that goes to the backing device can reach in this server);
// 4. a second fresh pcache with the default settings, laid down the same way: "not written
//    back, first read" is one pass over the range (fio not time-based), read piece by piece;
//    "second read", another pass, during which each fragmented read, now seen twice, is stored
//    again as one piece (cache_read_rewrite.ts); then "read again", the timed reads over the
//    same, still dirty, range;
// 5. a third fresh pcache; fio writes the range in 1 MiB sequential writes at QD8; drain; the
//    same reads: "sequential" (the unfragmented figure).
// Every pcache runs with sequential_cutoff_bytes=0 (else the 1 MiB sequential writes of step 5
// would go past the cache and the figure would not be the cache's) and writeback held back
// (writeback_idle_ms and writeback_max_age_ms an hour: steps 2 and 4 measure dirty data, and
// the drains decide when writeback runs). Each of the four judged series ("written back", "not
// written back, piece by piece" on the thread, "read again", "sequential") runs right beside an
// nbdkit run of its own (before it in odd rounds, after it in even ones), and its per-round ratio
// is to that run; targets: >= 0.8x nbdkit and >= 0.7x sequential (the per-round ratio over the
// sequential one's), judged on the medians over the rounds, for data written back, for data read
// again before writeback, and for the first pass over it on the thread. The medians of each
// column are reported too (every nbdkit run in the nbdkit column). The hit
// rate of the reads, the share served by one backing read (readGathers) and the share of the
// range each pass of step 4 stored again (fragmentRewriteBytes) are printed.
// PCACHE_BENCH_PREWRITTEN=1: every cache file written full of zeroes first instead.
// PCACHE_BENCH_SMOKE=1: tiny sizes, one short round (the test suite runs that).

import type { ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { controlRequest } from '../src/cli/control_client.js';
import { median, param, report, smoke } from './harness.js';
import { cacheFileKind, fill, fioJob, makeScratch, newCacheArgs, removeScratch, requireTool, run, startNbdkitServer, startPcacheServe, stopChild, version } from './processes.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** The range laid down and read; the backing file is twice as large. */
const rangeBytes = param(16 * MiB, 256 * MiB);
const backingBytes = 2 * rangeBytes;
const cacheBytes = param(256 * MiB, 1024 * MiB);
const rounds = param(1, 5);
const runtime = param('300ms', '5s');
const rampTime = param('0', '1s');
const heldWritebackMs = 3_600_000;
const tuning = `sequential_cutoff_bytes=0,writeback_idle_ms=${heldWritebackMs},writeback_max_age_ms=${heldWritebackMs}`;
const noRewrites = 'fragmented_rewrite_pieces=0';

interface Counters {
  readRequests: number;
  readHitRequests: number;
  readGathers: number;
  threadReadBatches: number;
  fragmentRewriteBytes: number;
}

async function counters(control: string): Promise<Counters> {
  const status = await controlRequest(control, 'status') as { cache: { counters: Counters } };
  return status.cache.counters;
}

function uri(socket: string): string {
  return `nbd+unix:///?socket=${socket}`;
}

/** Lays the range down through `socket`: 4 KiB random writes at QD32 (each block once), or 1 MiB sequential writes at QD8. */
async function layDown(socket: string, how: 'random' | 'sequential'): Promise<void> {
  const [rw, blockSize, depth] = how === 'random' ? ['randwrite', '4k', 32] : ['write', '1m', 8];
  const output = await run('fio', [
    '--name=lay', '--ioengine=nbd', `--uri=${uri(socket)}`, `--rw=${rw}`, `--bs=${blockSize}`, `--iodepth=${depth}`,
    `--size=${rangeBytes}`, '--thread', '--output-format=json',
  ]);
  fioJob(output, `laying the range down (${how})`);
}

/** 1 MiB sequential reads at QD8 over the range, for `runtime` or (`once`) one pass; IOPS. */
async function readRun(socket: string, what: string, once = false): Promise<number> {
  const timing = once ? [] : ['--time_based', `--runtime=${runtime}`, `--ramp_time=${rampTime}`];
  const output = await run('fio', [
    '--name=read', '--ioengine=nbd', `--uri=${uri(socket)}`, '--rw=read', '--bs=1m', '--iodepth=8', `--size=${rangeBytes}`,
    '--thread', ...timing, '--output-format=json',
  ]);
  return fioJob(output, what).read.iops;
}

interface Pcache {
  readonly child: ChildProcess;
  readonly socket: string;
  readonly control: string;
}

async function startPcache(dir: string, backing: string, name: string, extraTuning?: string): Promise<Pcache> {
  const socket = path.join(dir, `${name}.sock`);
  const control = path.join(dir, `${name}.ctl`);
  const cache = path.join(dir, `${name}.cache`);
  const knobs = extraTuning === undefined ? tuning : `${tuning},${extraTuning}`;
  const child = await startPcacheServe(`pcache serve (${name})`, dir, socket, [...newCacheArgs(cache, cacheBytes), '--backing', backing, '--control', control, '--tuning', knobs]);
  return { child, socket, control };
}

/** readRun on `pcache`, with how much each counter moved over it. */
async function countedRun(pcache: Pcache, what: string): Promise<{ iops: number; change: (counter: keyof Counters) => number }> {
  const start = await counters(pcache.control);
  const iops = await readRun(pcache.socket, what);
  const end = await counters(pcache.control);
  return { iops, change: (counter) => end[counter] - start[counter] };
}

async function stopPcache(dir: string, pcache: Pcache, name: string): Promise<void> {
  await stopChild(pcache.child);
  rmSync(path.join(dir, `${name}.cache`), { force: true });
}

type Series =
  | 'written back' | 'written back, piece by piece' | 'not written back, piece by piece' | 'not written back, on the event loop'
  | 'not written back, first read' | 'not written back, second read' | 'not written back, read again'
  | 'sequential' | 'nbdkit' | 'no cache';

/** The series measured beside an nbdkit run of their own, whose ratios the targets are judged on. */
type PairedSeries = 'written back' | 'not written back, piece by piece' | 'not written back, read again' | 'sequential';

async function main(): Promise<void> {
  requireTool('fio', 'fio');
  requireTool('nbdkit', 'nbdkit');
  const base = os.platform() === 'linux' ? '/dev/shm' : os.tmpdir();
  const dir = makeScratch(base, 'pcache-frag-');
  const backing = path.join(dir, 'backing.img');
  let nbdkit: ChildProcess | undefined;
  let noCache: ChildProcess | undefined;
  try {
    fill(backing, backingBytes, true);
    const nbdkitSocket = path.join(dir, 'nbdkit.sock');
    nbdkit = await startNbdkitServer(dir, nbdkitSocket, ['-f', '--exit-with-parent', 'file', `file=${backing}`]);
    const noCacheSocket = path.join(dir, 'nocache.sock');
    noCache = await startPcacheServe('pcache serve --no-cache', dir, noCacheSocket, ['--no-cache', '--backing', backing]);
    console.log(`machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), Node ${process.version}, ${version('fio', ['--version'])}, ${version('nbdkit', ['--version'])}; load average at start ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    console.log(`files on ${base}: range ${rangeBytes / MiB} MiB, backing ${backingBytes / MiB} MiB, cache ${cacheBytes / MiB} MiB (${cacheFileKind()}, new each time); ${rounds} round(s) of ${runtime} per run${smoke ? ' (smoke)' : ''}`);
    const results: Record<Series, number[]> = {
      'written back': [], 'written back, piece by piece': [], 'not written back, piece by piece': [], 'not written back, on the event loop': [], 'not written back, first read': [], 'not written back, second read': [], 'not written back, read again': [],
      sequential: [], nbdkit: [], 'no cache': [],
    };
    let reads = 0;
    let hits = 0;
    let gathers = 0;
    let gatheredReads = 0;
    let dirtyReads = 0;
    let threadBatches = 0;
    const rewrittenBytes = [0, 0];
    // Per round, each judged series over the nbdkit run just before or after it (see the file comment).
    const pairedRatios: Record<PairedSeries, number[]> = { 'written back': [], 'not written back, piece by piece': [], 'not written back, read again': [], sequential: [] };
    const paired = async <T>(series: PairedSeries, round: number, measure: () => Promise<T>, iopsOf: (result: T) => number): Promise<T> => {
      const peerFirst = round % 2 === 1;
      const peerBefore = peerFirst ? await readRun(nbdkitSocket, 'nbdkit') : 0;
      const result = await measure();
      const peer = peerFirst ? peerBefore : await readRun(nbdkitSocket, 'nbdkit');
      results.nbdkit.push(peer);
      pairedRatios[series].push(iopsOf(result) / peer);
      return result;
    };
    for (let round = 0; round < rounds; round++) {
      const frag = await startPcache(dir, backing, 'frag', noRewrites);
      await layDown(frag.socket, 'random');
      const dirtyTurns = ['not written back, piece by piece', 'not written back, on the event loop'] as const;
      for (let turn = 0; turn < dirtyTurns.length; turn++) {
        const series = dirtyTurns[(round + turn) % dirtyTurns.length] ?? 'not written back, piece by piece';
        const onLoop = series === 'not written back, on the event loop';
        await controlRequest(frag.control, 'set', { body: { fragmented_thread_pieces: onLoop ? 0 : 16 } });
        const counted = onLoop ? await countedRun(frag, series) : await paired(series, round, () => countedRun(frag, series), (c) => c.iops);
        results[series].push(counted.iops);
        if (!onLoop) {
          dirtyReads += counted.change('readRequests');
          threadBatches += counted.change('threadReadBatches');
        }
      }
      await controlRequest(frag.control, 'set', { body: { fragmented_thread_pieces: 16 } });
      await controlRequest(frag.control, 'drain');
      const before = await counters(frag.control);
      const turns: Series[] = ['written back', 'written back, piece by piece', 'nbdkit', 'no cache'];
      for (let turn = 0; turn < turns.length; turn++) {
        const series = turns[(round + turn) % turns.length] ?? 'nbdkit';
        if (series === 'nbdkit' || series === 'no cache') {
          results[series].push(await readRun(series === 'nbdkit' ? nbdkitSocket : noCacheSocket, series));
          continue;
        }
        const pieceByPiece = series === 'written back, piece by piece';
        if (pieceByPiece) await controlRequest(frag.control, 'set', { body: { fragmented_read_pieces: 0 } });
        const counted = pieceByPiece ? await countedRun(frag, series) : await paired('written back', round, () => countedRun(frag, series), (c) => c.iops);
        results[series].push(counted.iops);
        if (!pieceByPiece) {
          gatheredReads += counted.change('readRequests');
          gathers += counted.change('readGathers');
        }
        if (pieceByPiece) await controlRequest(frag.control, 'set', { body: { fragmented_read_pieces: 16 } });
      }
      const after = await counters(frag.control);
      reads += after.readRequests - before.readRequests;
      hits += after.readHitRequests - before.readHitRequests;
      await stopPcache(dir, frag, 'frag');

      const rewrite = await startPcache(dir, backing, 'rewrite');
      await layDown(rewrite.socket, 'random');
      const passes = ['not written back, first read', 'not written back, second read'] as const;
      for (let pass = 0; pass < passes.length; pass++) {
        const series = passes[pass] ?? 'not written back, first read';
        const before = (await counters(rewrite.control)).fragmentRewriteBytes;
        results[series].push(await readRun(rewrite.socket, series, true));
        rewrittenBytes[pass] = (rewrittenBytes[pass] ?? 0) + (await counters(rewrite.control)).fragmentRewriteBytes - before;
      }
      results['not written back, read again'].push(await paired('not written back, read again', round, () => readRun(rewrite.socket, 'not written back, read again'), (iops) => iops));
      await stopPcache(dir, rewrite, 'rewrite');

      const sequential = await startPcache(dir, backing, 'seq');
      await layDown(sequential.socket, 'sequential');
      await controlRequest(sequential.control, 'drain');
      results.sequential.push(await paired('sequential', round, () => readRun(sequential.socket, 'sequential'), (iops) => iops));
      await stopPcache(dir, sequential, 'seq');
    }
    const value = (series: Series): number => median(results[series]);
    report({ bench: 'frag_read', metric: '1M seq read QD8, fragmented vs nbdkit', value: value('written back'), unit: 'IOPS', peer: 'nbdkit file', peerValue: value('nbdkit') });
    report({ bench: 'frag_read', metric: '1M seq read QD8, fragmented vs sequential', value: value('written back'), unit: 'IOPS', peer: 'pcache, laid down sequentially', peerValue: value('sequential') });
    report({ bench: 'frag_read', metric: '1M seq read QD8, piece by piece vs nbdkit', value: value('written back, piece by piece'), unit: 'IOPS', peer: 'nbdkit file', peerValue: value('nbdkit') });
    report({ bench: 'frag_read', metric: '1M seq read QD8, fragmented vs no cache', value: value('written back'), unit: 'IOPS', peer: 'pcache --no-cache', peerValue: value('no cache') });
    report({ bench: 'frag_read', metric: '1M seq read QD8, not written back, piece by piece vs nbdkit', value: value('not written back, piece by piece'), unit: 'IOPS', peer: 'nbdkit file', peerValue: value('nbdkit') });
    report({ bench: 'frag_read', metric: '1M seq read QD8, not written back, on the event loop vs nbdkit', value: value('not written back, on the event loop'), unit: 'IOPS', peer: 'nbdkit file', peerValue: value('nbdkit') });
    report({ bench: 'frag_read', metric: '1M seq read QD8, not written back, thread vs event loop', value: value('not written back, piece by piece'), unit: 'IOPS', peer: 'pcache, pieces read on the event loop', peerValue: value('not written back, on the event loop') });
    report({ bench: 'frag_read', metric: '1M seq read QD8, not written back, first read vs nbdkit', value: value('not written back, first read'), unit: 'IOPS', peer: 'nbdkit file', peerValue: value('nbdkit') });
    report({ bench: 'frag_read', metric: '1M seq read QD8, not written back, second read vs nbdkit', value: value('not written back, second read'), unit: 'IOPS', peer: 'nbdkit file', peerValue: value('nbdkit') });
    report({ bench: 'frag_read', metric: '1M seq read QD8, not written back, read again vs nbdkit', value: value('not written back, read again'), unit: 'IOPS', peer: 'nbdkit file', peerValue: value('nbdkit') });
    report({ bench: 'frag_read', metric: '1M seq read QD8, not written back, read again vs sequential', value: value('not written back, read again'), unit: 'IOPS', peer: 'pcache, laid down sequentially', peerValue: value('sequential') });
    // Judged on the medians of the per-round ratios: the series and its nbdkit run lie seconds
    // apart, where the medians of whole columns lie minutes apart on a host whose speed drifts.
    const target = (what: string, series: PairedSeries): void => {
      const ratios = pairedRatios[series];
      const toNbdkit = median(ratios);
      const toSequential = median(ratios.map((ratio, round) => ratio / (pairedRatios.sequential[round] ?? Number.NaN)));
      console.log(`  targets, ${what} (medians of per-round ratios): /nbdkit ${toNbdkit.toFixed(2)} (>= 0.8: ${toNbdkit >= 0.8 ? 'met' : 'MISSED'}), /sequential ${toSequential.toFixed(2)} (>= 0.7: ${toSequential >= 0.7 ? 'met' : 'MISSED'}); per round /nbdkit ${ratios.map((r) => r.toFixed(2)).join(' ')}`);
    };
    target('written back', 'written back');
    target('not written back, read again', 'not written back, read again');
    target('not written back, first pass on the thread', 'not written back, piece by piece');
    console.log(`  sequential per round /nbdkit: ${pairedRatios.sequential.map((r) => r.toFixed(2)).join(' ')}`);
    console.log(`  written-back reads: hits ${reads === 0 ? '-' : (100 * hits / reads).toFixed(1)}%, served by one backing read ${gatheredReads === 0 ? '-' : (100 * gathers / gatheredReads).toFixed(1)}%`);
    console.log(`  not written back, piece by piece: ${dirtyReads === 0 ? '-' : (100 * threadBatches / dirtyReads).toFixed(1)}% of the reads read their pieces on the cache device's thread`);
    const share = (bytes: number | undefined): string => (100 * (bytes ?? 0) / (rounds * rangeBytes)).toFixed(1);
    console.log(`  data not written back, stored again as one piece per read: first read ${share(rewrittenBytes[0])}% of the range, second read ${share(rewrittenBytes[1])}%`);
    for (const [series, values] of Object.entries(results)) console.log(`  runs ${series}: ${values.map(Math.round).join(' ')}`);
    console.log(`load average at end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  } finally {
    if (nbdkit !== undefined) await stopChild(nbdkit);
    if (noCache !== undefined) await stopChild(noCache);
    removeScratch(dir);
  }
}

await main();
