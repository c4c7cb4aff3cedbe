// Steady state on a fast backing device (issue 16, part 3): 4 KiB random writes at QD32 long
// enough to wrap the cache several times, against nbdkit's file plugin on the same medium.
//
// What runs: a backing file of zeroes on tmpfs (/dev/shm), nbdkit's `file` plugin serving it, and
// one `pcache serve --cache-size 1G` on a cache file that does not exist yet (created sparse and
// formatted as a new user's would be), default settings. In each round fio writes 4 KiB random
// blocks at QD32 over a 1 GiB range for the run's length, once through pcache (the first half of
// the file) and once through nbdkit (the second half), in an order that rotates by round. pcache
// is not drained between rounds: its cache stays full and writeback and GC run all the time, which
// is the steady state. Each round's two runs are back to back, so their ratio is the steadier
// figure on a shared machine whose speed drifts between rounds: the target (pcache/nbdkit >= 0.9)
// is judged on the median of the per-round ratios; the ratio of the medians is printed too. Also printed: how
// many times the client's writes filled the cache, and the share of them written back, and each
// server's CPU time per client write (user + system, all its threads, writeback included).
// PCACHE_BENCH_SECONDS sets the run length (default 20); PCACHE_BENCH_PREWRITTEN=1 writes the
// cache file full of zeroes first instead. PCACHE_BENCH_SMOKE=1: tiny sizes.

import type { ChildProcess } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { controlRequest } from '../src/cli/control_client.js';
import { median, param, report, smoke } from './harness.js';
import { cacheFileKind, fill, fioJob, makeScratch, newCacheArgs, removeScratch, requireTool, run, scratchUse, startNbdkitServer, startPcacheServe, stopChild, version } from './processes.js';
import { cpuTicks, userHz } from './sustained_series.js';

const MiB = 1024 * 1024;
const rangeBytes = param(32 * MiB, 1024 * MiB);
const cacheBytes = param(128 * MiB, 1024 * MiB);
const rounds = param(1, 5);
const seconds = Number(process.env.PCACHE_BENCH_SECONDS ?? param(1, 20));
/** Extra `pcache serve` arguments, separated by spaces (`--gc-percent 85 --tuning name=value,...`), to compare settings against the defaults. */
const extraServeArgs = (process.env.PCACHE_BENCH_SERVE_ARGS ?? '').split(' ').filter((text) => text !== '');

interface Counters {
  writeBytes: number;
  writebackBackingBytes: number;
}

async function writeRun(socket: string, offsetBytes: number, what: string): Promise<number> {
  const output = await run('fio', [
    '--name=write', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${socket}`, '--rw=randwrite', '--bs=4k', '--iodepth=32',
    `--offset=${offsetBytes}`, `--size=${rangeBytes}`, '--thread', '--time_based', `--runtime=${seconds}s`, '--norandommap', '--randrepeat=0',
    '--output-format=json',
  ]);
  return fioJob(output, what).write.iops;
}

async function main(): Promise<void> {
  requireTool('fio', 'fio');
  requireTool('nbdkit', 'nbdkit');
  const base = os.platform() === 'linux' ? '/dev/shm' : os.tmpdir();
  const scratchAtStart = scratchUse(base);
  const dir = makeScratch(base, 'pcache-steady-');
  const backing = path.join(dir, 'backing.img');
  const children: ChildProcess[] = [];
  try {
    fill(backing, 2 * rangeBytes, false);
    const nbdkitSocket = path.join(dir, 'nbdkit.sock');
    children.push(await startNbdkitServer(dir, nbdkitSocket, ['-f', '--exit-with-parent', 'file', `file=${backing}`]));
    const socket = path.join(dir, 'pcache.sock');
    const control = path.join(dir, 'pcache.ctl');
    children.push(await startPcacheServe('pcache serve', dir, socket, [...newCacheArgs(path.join(dir, 'cache.img'), cacheBytes), '--backing', backing, '--control', control, ...extraServeArgs]));
    console.log(`machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), Node ${process.version}, ${version('fio', ['--version'])}, ${version('nbdkit', ['--version'])}; load average at start ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    console.log(`files on ${base} (${scratchAtStart} at start): range ${rangeBytes / MiB} MiB each, cache ${cacheBytes / MiB} MiB (${cacheFileKind()}); ${rounds} round(s) of ${seconds} s${smoke ? ' (smoke)' : ''}`);
    const results = { pcache: [] as number[], nbdkit: [] as number[] };
    /** Server CPU microseconds per client write, per run. */
    const cpuPerWrite = { pcache: [] as number[], nbdkit: [] as number[] };
    const pids = { nbdkit: children[0]?.pid ?? 0, pcache: children[1]?.pid ?? 0 };
    for (let round = 0; round < rounds; round++) {
      for (const name of round % 2 === 0 ? ['pcache', 'nbdkit'] as const : ['nbdkit', 'pcache'] as const) {
        const ticksBefore = cpuTicks(pids[name]);
        const iops = await writeRun(name === 'pcache' ? socket : nbdkitSocket, name === 'pcache' ? 0 : rangeBytes, name);
        results[name].push(iops);
        cpuPerWrite[name].push(((cpuTicks(pids[name]) - ticksBefore) / userHz) * 1e6 / Math.max(1, iops * seconds));
      }
    }
    const status = await controlRequest(control, 'status') as { cache: { counters: Counters } };
    const { writeBytes, writebackBackingBytes } = status.cache.counters;
    report({ bench: 'steady_write', metric: '4K rand write QD32, cache wrapped', value: median(results.pcache), unit: 'IOPS', peer: 'nbdkit file', peerValue: median(results.nbdkit) });
    const roundRatios = results.pcache.map((iops, round) => iops / Math.max(1, results.nbdkit[round] ?? 0));
    const ratio = median(roundRatios);
    console.log(`  per-round ratios ${roundRatios.map((r) => r.toFixed(2)).join(' ')}, median ${ratio.toFixed(3)} (judged unrounded)`);
    console.log(`  target pcache/nbdkit >= 0.9 (median of the per-round ratios): ${ratio >= 0.9 ? 'met' : 'MISSED'}; the client wrote the cache's size ${(writeBytes / cacheBytes).toFixed(1)} times over, ${(100 * writebackBackingBytes / Math.max(1, writeBytes)).toFixed(1)}% of it written back`);
    console.log(`  runs pcache ${results.pcache.map(Math.round).join(' ')} | nbdkit ${results.nbdkit.map(Math.round).join(' ')}`);
    console.log(`  server CPU per client write (median): pcache ${median(cpuPerWrite.pcache).toFixed(1)} us (writeback and GC included), nbdkit ${median(cpuPerWrite.nbdkit).toFixed(1)} us; runs pcache ${cpuPerWrite.pcache.map((v) => v.toFixed(1)).join(' ')} | nbdkit ${cpuPerWrite.nbdkit.map((v) => v.toFixed(1)).join(' ')}`);
    console.log(`load average at end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  } finally {
    for (const child of children) await stopChild(child);
    removeScratch(dir);
  }
}

await main();
