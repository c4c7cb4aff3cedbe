// `pcache drain`: asks a running server, through its control socket, to write back all dirty
// data; returns once everything written before the request is on the backing device, synced.
//
// With --progress, a second connection asks for the status every progressIntervalMs while the
// drain runs and draws dirty bytes left, the writeback rate and the time left on standard
// error. Status is answered from memory, so polling never slows the drain down.
//
// The cache counts written-back bytes when a writeback round ends, and a round can carry
// hundreds of MiB: between two ends the counter stands still although the backing device is
// busy. So the rate is the average from the drain's start (or the backing device's return) to
// the latest round's end, never a sample of one poll interval; the time left counts down from
// that round's end; and "waiting for the backing device" is said only when writeback is
// actually failing (the backing device offline or erroring).
//
// Ctrl-C (SIGINT) stops waiting and nothing else: the drain is the server's, it goes on, and
// the data stays safe in the cache either way. Exit status 130 says the wait was cut short.

import { isPcacheError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { exitInterrupted, exitOk, type DrainArgs } from './args.js';
import { controlRequest } from './control_client.js';
import type { Terminal } from './terminal.js';

const progressIntervalMs = 500;
/** Width of the bar, in characters. */
const barWidth = 24;

export async function drainCommand(args: DrainArgs, terminal: Terminal): Promise<number> {
  const startedMs = performance.now();
  let interrupted: () => void = () => undefined;
  const onInterrupt = (): void => { interrupted(); };
  process.once('SIGINT', onInterrupt);
  const progress = args.progress ? new DrainProgress(args.controlPath, terminal) : undefined;
  try {
    const outcome = await Promise.race([
      controlRequest(args.controlPath, 'drain', { timeoutMs: args.timeoutMs, volume: args.volume }).then(() => 'drained' as const),
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
  /** Where the rate is measured from: the first status, or the first after writeback last failed. */
  private baseline: { atMs: number; writebackBytes: number } | undefined;
  private rateBytesPerSecond: number | undefined;
  /** When the rate was last measured (a round had ended) and the counter then. */
  private measured: { atMs: number; writebackBytes: number } | undefined;
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
      const cache = (status as { cache?: CacheFields | null }).cache;
      const dirtyBytes = cache?.dirtyBytes;
      const writebackBytes = cache?.counters?.writebackBytes;
      if (typeof dirtyBytes !== 'number' || typeof writebackBytes !== 'number') return; // --no-cache: nothing to show
      const failing = cache?.state === 'backing-offline' || typeof cache?.writeback?.lastError === 'string';
      this.sample(writebackBytes, failing);
      this.draw(dirtyBytes);
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      // A status that fails (the server stopping) shows nothing; the drain request reports.
    } finally {
      this.polling = false;
    }
  }

  /**
   * The rate: bytes written back since the baseline over the time since, measured when the
   * counter moves (a round ended). Unknown (undefined) until a round has ended; 0 while
   * writeback fails, which also moves the baseline so that the outage does not drag the rate
   * down once the backing device is back.
   */
  private sample(writebackBytes: number, failing: boolean): void {
    const nowMs = performance.now();
    if (failing) {
      this.baseline = undefined;
      this.measured = undefined;
      this.rateBytesPerSecond = 0;
      return;
    }
    if (this.baseline === undefined) {
      this.baseline = { atMs: nowMs, writebackBytes };
      if (this.rateBytesPerSecond === 0) this.rateBytesPerSecond = undefined; // back, not yet measured
      return;
    }
    if (writebackBytes <= (this.measured?.writebackBytes ?? this.baseline.writebackBytes) || nowMs <= this.baseline.atMs) return;
    this.rateBytesPerSecond = ((writebackBytes - this.baseline.writebackBytes) * 1000) / (nowMs - this.baseline.atMs);
    this.measured = { atMs: nowMs, writebackBytes };
  }

  private draw(dirtyBytes: number): void {
    this.firstDirtyBytes ??= dirtyBytes;
    // New writes can add dirty data while the drain runs; the bar measures against the most seen.
    this.firstDirtyBytes = Math.max(this.firstDirtyBytes, dirtyBytes);
    this.drawn = true;
    const sinceSeconds = this.measured === undefined ? 0 : (performance.now() - this.measured.atMs) / 1000;
    this.terminal.progress(drainProgressLine(this.firstDirtyBytes, dirtyBytes, this.rateBytesPerSecond, sinceSeconds));
  }
}

/** What the progress reads of a status answer. */
interface CacheFields {
  readonly state?: unknown;
  readonly dirtyBytes?: unknown;
  readonly counters?: { readonly writebackBytes?: unknown };
  readonly writeback?: { readonly lastError?: unknown };
}

/**
 * `[#########...............]  38%  1.2 GiB left  210 MiB/s  6 s left`. The time left is
 * leftBytes at the rate, less `sinceSeconds` (the time since the rate and leftBytes were
 * measured), and at least 1 s while anything is left.
 */
export function drainProgressLine(totalBytes: number, leftBytes: number, rateBytesPerSecond: number | undefined, sinceSeconds = 0): string {
  const fraction = totalBytes === 0 ? 1 : Math.min(1, Math.max(0, 1 - leftBytes / totalBytes));
  const filled = Math.round(fraction * barWidth);
  const bar = `[${'#'.repeat(filled)}${'.'.repeat(barWidth - filled)}]`;
  const percent = `${Math.floor(fraction * 100)}%`.padStart(4);
  const parts = [bar, percent, `${formatSize(leftBytes)} left`];
  if (rateBytesPerSecond !== undefined) {
    parts.push(`${formatSize(Math.max(0, Math.round(rateBytesPerSecond)))}/s`);
    if (leftBytes === 0) parts.push('done');
    else if (rateBytesPerSecond > 0) parts.push(`${formatDuration(Math.max(1, leftBytes / rateBytesPerSecond - sinceSeconds))} left`);
    else parts.push('waiting for the backing device');
  }
  return parts.join('  ');
}

function formatDuration(seconds: number): string {
  if (seconds < 60) return `${Math.ceil(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.ceil(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}
