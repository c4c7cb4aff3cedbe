// `pcache drain`: asks a running server, through its control socket, to write back all dirty
// data; returns once everything written before the request is on the backing device, synced.
//
// With --progress, a second connection asks for the status every progressIntervalMs while the
// drain runs and draws dirty bytes left, the writeback rate and the time left on standard
// error. Status is answered from memory, so polling never slows the drain down.
//
// Ctrl-C (SIGINT) stops waiting and nothing else: the drain is the server's, it goes on, and
// the data stays safe in the cache either way. Exit status 130 says the wait was cut short.

import { isPcacheError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { exitInterrupted, exitOk, type DrainArgs } from './args.js';
import { controlRequest } from './control.js';
import type { Terminal } from './terminal.js';

const progressIntervalMs = 500;
/** Width of the bar, in characters. */
const barWidth = 24;
/** Weight of the newest rate sample in the smoothed rate. */
const rateSmoothing = 0.3;

export async function drainCommand(args: DrainArgs, terminal: Terminal): Promise<number> {
  const startedMs = performance.now();
  let interrupted: () => void = () => undefined;
  const onInterrupt = (): void => { interrupted(); };
  process.once('SIGINT', onInterrupt);
  const progress = args.progress ? new DrainProgress(args.controlPath, terminal) : undefined;
  try {
    const outcome = await Promise.race([
      controlRequest(args.controlPath, 'drain', args.timeoutMs).then(() => 'drained' as const),
      new Promise<'interrupted'>((resolve) => { interrupted = () => { resolve('interrupted'); }; }),
    ]);
    progress?.stop(outcome === 'drained');
    if (outcome === 'interrupted') {
      terminal.err('pcache: stopped waiting; the server goes on writing back, and nothing was lost or undone');
      return exitInterrupted;
    }
  } finally {
    progress?.stop(false);
    process.off('SIGINT', onInterrupt);
  }
  const seconds = (performance.now() - startedMs) / 1000;
  terminal.out(`drained in ${seconds.toFixed(1)} s: the backing device holds everything written before the drain, synced`);
  return exitOk;
}

/** Polls the server's status and draws the drain's progress. */
class DrainProgress {
  private readonly controlPath: string;
  private readonly terminal: Terminal;
  private readonly timer: NodeJS.Timeout;
  private firstDirtyBytes: number | undefined;
  private lastSample: { atMs: number; writebackBytes: number } | undefined;
  private rateBytesPerSecond: number | undefined;
  private polling = false;
  private stopped = false;
  private drawn = false;

  constructor(controlPath: string, terminal: Terminal) {
    this.controlPath = controlPath;
    this.terminal = terminal;
    this.timer = setInterval(() => { void this.poll(); }, progressIntervalMs);
    void this.poll();
  }

  stop(finished: boolean): void {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.timer);
    if (finished && this.firstDirtyBytes !== undefined) this.draw(0);
    if (this.drawn && this.terminal.interactive) this.terminal.progress('', true);
  }

  private isStopped(): boolean {
    return this.stopped;
  }

  private async poll(): Promise<void> {
    if (this.polling || this.stopped) return; // one status request at a time
    this.polling = true;
    try {
      const status = await controlRequest(this.controlPath, 'status');
      if (this.isStopped()) return; // the drain ended while status was asked for
      const cache = (status as { cache?: { dirtyBytes?: unknown; counters?: { writebackBytes?: unknown } } | null }).cache;
      const dirtyBytes = cache?.dirtyBytes;
      const writebackBytes = cache?.counters?.writebackBytes;
      if (typeof dirtyBytes !== 'number' || typeof writebackBytes !== 'number') return; // --no-cache: nothing to show
      this.sample(writebackBytes);
      this.draw(dirtyBytes);
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      // A status that fails (the server stopping) shows nothing; the drain request reports.
    } finally {
      this.polling = false;
    }
  }

  private sample(writebackBytes: number): void {
    const nowMs = performance.now();
    const last = this.lastSample;
    this.lastSample = { atMs: nowMs, writebackBytes };
    if (last === undefined || nowMs <= last.atMs) return;
    const rate = ((writebackBytes - last.writebackBytes) * 1000) / (nowMs - last.atMs);
    this.rateBytesPerSecond = this.rateBytesPerSecond === undefined ? rate : rateSmoothing * rate + (1 - rateSmoothing) * this.rateBytesPerSecond;
  }

  private draw(dirtyBytes: number): void {
    this.firstDirtyBytes ??= dirtyBytes;
    // New writes can add dirty data while the drain runs; the bar measures against the most seen.
    this.firstDirtyBytes = Math.max(this.firstDirtyBytes, dirtyBytes);
    this.drawn = true;
    this.terminal.progress(drainProgressLine(this.firstDirtyBytes, dirtyBytes, this.rateBytesPerSecond));
  }
}

/** `[#########...............]  38%  1.2 GiB left  210 MiB/s  6 s left` */
export function drainProgressLine(totalBytes: number, leftBytes: number, rateBytesPerSecond: number | undefined): string {
  const fraction = totalBytes === 0 ? 1 : Math.min(1, Math.max(0, 1 - leftBytes / totalBytes));
  const filled = Math.round(fraction * barWidth);
  const bar = `[${'#'.repeat(filled)}${'.'.repeat(barWidth - filled)}]`;
  const percent = `${Math.floor(fraction * 100)}%`.padStart(4);
  const parts = [bar, percent, `${formatSize(leftBytes)} left`];
  if (rateBytesPerSecond !== undefined) {
    parts.push(`${formatSize(Math.max(0, Math.round(rateBytesPerSecond)))}/s`);
    if (leftBytes === 0) parts.push('done');
    else if (rateBytesPerSecond > 0) parts.push(`${formatDuration(leftBytes / rateBytesPerSecond)} left`);
    else parts.push('waiting for the backing device');
  }
  return parts.join('  ');
}

function formatDuration(seconds: number): string {
  if (seconds < 60) return `${Math.ceil(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.ceil(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}
