// What the NBD benchmarks share about other processes: checking a tool is installed, running a
// command (or the pcache CLI) for its output, starting `pcache serve` and waiting until it listens, stopping a
// child, making and filling the test files, and parsing fio's JSON. Every child started through here is
// tracked and killed if the benchmark exits early (an error, Ctrl-C), so no run leaves a server
// behind.

import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const MiB = 1024 * 1024;
/** The package's bin, which gives `serve` its 16-thread pool (src/cli/pcache.cts). */
const cliPath = fileURLToPath(new URL('../src/cli/pcache.cjs', import.meta.url));

/** Every child process started here that has not exited yet. */
const children = new Set<ChildProcess>();
/** Directories removed when the benchmark is interrupted. */
const scratchDirs = new Set<string>();

/** Keeps `child` in the set killed on an early exit; returns it. */
export function track<T extends ChildProcess>(child: T): T {
  children.add(child);
  child.once('exit', () => { children.delete(child); });
  return child;
}

function killAll(): void {
  for (const child of children) child.kill('SIGKILL');
}

process.once('exit', killAll);
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    killAll();
    for (const dir of scratchDirs) fs.rmSync(dir, { recursive: true, force: true });
    process.exit(128 + os.constants.signals[signal]);
  });
}

/** A scratch directory under `parent`, removed by `removeScratch` or on Ctrl-C. */
export function makeScratch(parent: string, prefix: string): string {
  const dir = fs.mkdtempSync(path.join(parent, prefix));
  scratchDirs.add(dir);
  return dir;
}

/**
 * How full the file system holding `parent` is, for a benchmark's header: files left on a tmpfs
 * by other runs take memory from the benchmark's own, and slowed a fresh sparse cache's first
 * seconds to half (docs/performance.md, "At the edge").
 */
export function scratchUse(parent: string): string {
  const stats = fs.statfsSync(parent);
  const totalBytes = stats.blocks * stats.bsize;
  const usedBytes = (stats.blocks - stats.bfree) * stats.bsize;
  const GiB = 1024 ** 3;
  return `${(usedBytes / GiB).toFixed(1)} GiB of ${(totalBytes / GiB).toFixed(1)} GiB in use by other files`;
}

export function removeScratch(dir: string): void {
  fs.rmSync(dir, { recursive: true, force: true });
  scratchDirs.delete(dir);
}

export function requireTool(command: string, debianPackage: string): void {
  if (spawnSync('sh', ['-c', `command -v ${command}`]).status !== 0) {
    throw new Error(`${command} is not installed: install the Debian package ${debianPackage}`);
  }
}

/** Runs `command args` to completion and returns its standard output. */
export function run(command: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    track(execFile(command, args, { maxBuffer: 64 * MiB, encoding: 'utf8', timeout: 600_000 }, (error, stdout, stderr) => {
      if (error !== null) reject(new Error(`${command} failed: ${stderr || error.message}`));
      else resolve(stdout);
    }));
  });
}

/** The first line `command args` prints (a version string). */
export function version(command: string, args: string[]): string {
  return spawnSync(command, args, { encoding: 'utf8' }).stdout.split('\n')[0]?.trim() ?? '?';
}

/** Writes `bytes` of pseudo-random data (a random MiB, varied per MiB) or of zeroes. */
export function fill(file: string, bytes: number, random: boolean): void {
  const block = random ? randomBytes(MiB) : Buffer.alloc(MiB);
  const fd = fs.openSync(file, 'w');
  for (let offset = 0; offset < bytes; offset += MiB) {
    if (random) block.writeUInt32LE(offset / MiB, 0);
    fs.writeSync(fd, block, 0, Math.min(MiB, bytes - offset), offset);
  }
  fs.closeSync(fd);
}

/**
 * PCACHE_BENCH_PREWRITTEN=1: each new cache file is written full of zeroes first, instead of
 * created sparse by `serve --cache-size` as a new user's is (issue 16 asks for both figures).
 */
export const cachePrewritten = process.env.PCACHE_BENCH_PREWRITTEN === '1';

/** The `serve` arguments for a new cache file of `bytes` at `file`: sparse, or pre-written (cachePrewritten). */
export function newCacheArgs(file: string, bytes: number): string[] {
  if (!cachePrewritten) return ['--cache', file, '--cache-size', String(bytes)];
  fill(file, bytes, false);
  return ['--cache', file];
}

/** How a benchmark's header names its cache files. */
export function cacheFileKind(): string {
  return cachePrewritten ? 'pre-written (full of zeroes)' : 'sparse, new';
}

/**
 * Reads `file` through once, discarding the bytes. On this kind of VM the host takes back guest
 * memory left idle for a minute or two, and the first write into such a page then costs several
 * times a normal one: overwriting 2 GiB of a tmpfs file idle for 100 s took 0.57 s (random
 * contents) to 1.57 s (zeroes), against 0.28 s once the file had been read (docs/performance.md).
 * A real device has no such state, so the benchmarks read their device files back in before runs
 * that write into them.
 */
export function readThrough(file: string): void {
  const chunk = Buffer.allocUnsafe(4 * 1024 * 1024);
  const fd = fs.openSync(file, 'r');
  try {
    let position = 0;
    for (let got = fs.readSync(fd, chunk, 0, chunk.length, position); got > 0; got = fs.readSync(fd, chunk, 0, chunk.length, position)) position += got;
  } finally {
    fs.closeSync(fd);
  }
}

/** The files an NBD benchmark runs on, in a scratch directory under `base`. */
export interface BenchFiles {
  /** tmpfs (/dev/shm) when the machine has it, else the temporary directory. */
  readonly base: string;
  readonly dir: string;
  /** Random data, so that no layer can shortcut zeroes. */
  readonly backing: string;
  /** Zeroes, written in full so that the cache device has its blocks before the runs. */
  readonly cache: string;
  /** Where pcache's control socket goes. */
  readonly control: string;
}

/** Memory left for the servers, fio and the kernel once the tmpfs files exist. */
const benchHeadroomBytes = 2 * 1024 ** 3;

/** MemAvailable from /proc/meminfo, or undefined where there is none. */
function memoryAvailableBytes(): number | undefined {
  try {
    const match = /^MemAvailable:\s+(\d+) kB$/m.exec(fs.readFileSync('/proc/meminfo', 'utf8'));
    return match === null ? undefined : Number(match[1]) * 1024;
  } catch {
    return undefined;
  }
}

/**
 * Makes the scratch directory and fills its backing and cache files (removed again on failure).
 * On /dev/shm the files are memory: a machine short of it (leftovers of earlier runs, say)
 * measures the kernel's reclaim instead of the servers, so that is refused up front.
 */
export function makeBenchFiles(prefix: string, backingBytes: number, cacheBytes: number): BenchFiles {
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const available = memoryAvailableBytes();
  const needed = backingBytes + cacheBytes + benchHeadroomBytes;
  if (base === '/dev/shm' && available !== undefined && available < needed) {
    const gib = (bytes: number): string => (bytes / 1024 ** 3).toFixed(1);
    throw new Error(`bench: the files on /dev/shm need ${gib(backingBytes + cacheBytes)} GiB plus ${gib(benchHeadroomBytes)} GiB of headroom, but only ${gib(available)} GiB of memory is available (leftover files in /dev/shm?)`);
  }
  const dir = makeScratch(base, prefix);
  const files = { base, dir, backing: path.join(dir, 'backing.img'), cache: path.join(dir, 'cache.img'), control: path.join(dir, 'pcache.ctl') };
  try {
    fill(files.backing, backingBytes, true);
    fill(files.cache, cacheBytes, false);
  } catch (error) {
    removeScratch(dir);
    throw error;
  }
  return files;
}

/** Waits until `ready()` holds (a server printed its line, or wrote its pid file). */
export async function waitUntilReady(what: string, child: ChildProcess, ready: () => boolean): Promise<void> {
  for (let attempt = 0; attempt < 1000; attempt++) {
    if (child.exitCode !== null) throw new Error(`${what} exited with ${child.exitCode}`);
    if (ready()) return;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  throw new Error(`${what} did not start listening`);
}

/** Runs `pcache args...` (the package's bin, as users run it) to completion; returns its standard output. */
export function runPcacheCli(args: readonly string[]): Promise<string> {
  return run(process.execPath, [cliPath, ...args]);
}

/** Starts `pcache serve args --socket socket` (logging warnings only; `env` added to ours) and waits until it serves. */
export async function startPcacheServe(what: string, dir: string, socket: string, args: readonly string[], env: Readonly<Record<string, string>> = {}): Promise<ChildProcess> {
  const child = track(spawn(process.execPath, [cliPath, 'serve', ...args, '--socket', socket, '--log-level', 'warn'], { stdio: ['ignore', 'pipe', 'inherit'], cwd: dir, env: { ...process.env, ...env } }));
  let printed = '';
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => { printed += chunk; });
  await waitUntilReady(what, child, () => printed.startsWith('serving '));
  return child;
}

/** Starts `nbdkit -U socket ...args` and waits until it accepts connections (it writes its pid file then). */
export async function startNbdkitServer(dir: string, socket: string, args: readonly string[]): Promise<ChildProcess> {
  const pidFile = path.join(dir, `${path.basename(socket)}.pid`);
  const child = track(spawn('nbdkit', ['-U', socket, '-P', pidFile, ...args], { stdio: ['ignore', 'ignore', 'inherit'], cwd: dir }));
  await waitUntilReady('nbdkit', child, () => fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== '');
  return child;
}

/** SIGTERM, then SIGKILL if it has not exited within 30 s. */
export async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  await exited;
  clearTimeout(timer);
}

export interface FioJob {
  read: { iops: number; bw: number };
  write: { iops: number; bw: number };
  error: number;
}

/** The one job of fio's `--output-format=json` output; an error of fio's is thrown. */
export function fioJob(output: string, what: string): FioJob {
  // The nbd engine prints "fio: connected to NBD server" before the JSON.
  const job = (JSON.parse(output.slice(output.indexOf('{'))) as { jobs: FioJob[] }).jobs[0];
  if (job === undefined || job.error !== 0) throw new Error(`fio reported an error (${what})`);
  return job;
}
