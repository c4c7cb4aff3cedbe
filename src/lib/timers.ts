// The clock and timer seam.
//
// Nothing in the engine reads the wall clock or arms a timer except through a Timers object,
// so tests and the crash simulator can run the engine deterministically: ManualTimers never
// fires anything until the test advances time, and its `yieldToOthers` only lets queued
// promise callbacks run. Production uses realTimers.
//
// Pacing (`pace`): background work (writeback, GC) of every cache in the process shares one
// budget of event-loop time per turn. A client request that arrives while background work runs
// waits for the rest of the turn (one thread serves every volume's clients), so that work must
// come in short slices: once the turn's background slice is spent, the next piece of background
// work continues from setImmediate, after the poll phase has read and answered whatever clients
// sent meanwhile. One budget for the whole process, so N volumes cannot add up to N slices.

export interface TimerHandle {
  cancel(): void;
}

export interface Timers {
  /** Milliseconds on a monotonic clock. */
  now(): number;
  /** Milliseconds since the Unix epoch, for showing people when something happened. */
  wallClockMs(): number;
  /** Runs `callback` once after `delayMs`; timers never keep the process alive. */
  after(delayMs: number, callback: () => void): TimerHandle;
  /** Resolves after `delayMs`. */
  sleep(delayMs: number): Promise<void>;
  /** Lets other queued work run before continuing a long loop. */
  yieldToOthers(): Promise<void>;
  /**
   * Background work asks this before each piece: undefined while the turn's shared background
   * slice lasts (go on, no await needed), else a promise that resolves in a later turn.
   */
  pace(): Promise<void> | undefined;
}

/** Event-loop time per turn that background work of all caches in the process may take. */
export const backgroundSliceMs = 0.1;
/** When the current turn's background slice began (undefined: not yet in this turn). */
let sliceStartMs: number | undefined;
function endSlice(): void {
  sliceStartMs = undefined;
}
function nextTurn(resolve: () => void): void {
  setImmediate(resolve);
}

/**
 * realTimers.pace. The slice starts at the first background piece of a turn and ends at the
 * next check phase (setImmediate): work deferred past it is queued behind that reset, so it
 * starts a fresh slice there, and what it defers again runs only after the next poll phase.
 */
function paceReal(): Promise<void> | undefined {
  const nowMs = performance.now();
  if (sliceStartMs === undefined) {
    sliceStartMs = nowMs;
    setImmediate(endSlice);
    return undefined;
  }
  if (nowMs - sliceStartMs < backgroundSliceMs) return undefined;
  return new Promise(nextTurn);
}

export const realTimers: Timers = {
  now: () => performance.now(),
  wallClockMs: () => Date.now(),
  after(delayMs, callback) {
    const timer = setTimeout(callback, delayMs);
    timer.unref();
    return { cancel: () => { clearTimeout(timer); } };
  },
  sleep: (delayMs) => new Promise((resolve) => { setTimeout(resolve, delayMs).unref(); }),
  yieldToOthers: () => new Promise((resolve) => { setImmediate(resolve); }),
  pace: paceReal,
};

interface PendingTimer {
  readonly dueMs: number;
  readonly order: number;
  readonly callback: () => void;
  cancelled: boolean;
}

/** Deterministic timers for tests: time moves only when `advance` is called. */
export class ManualTimers implements Timers {
  private nowMs = 0;
  private order = 0;
  private pending: PendingTimer[] = [];

  now(): number {
    return this.nowMs;
  }

  /** A fixed epoch (2026-01-01) plus the manual clock, so reports are reproducible. */
  wallClockMs(): number {
    return 1_767_225_600_000 + this.nowMs;
  }

  after(delayMs: number, callback: () => void): TimerHandle {
    const timer: PendingTimer = { dueMs: this.nowMs + delayMs, order: this.order++, callback, cancelled: false };
    this.pending.push(timer);
    return { cancel: () => { timer.cancelled = true; } };
  }

  sleep(delayMs: number): Promise<void> {
    return new Promise((resolve) => { this.after(delayMs, resolve); });
  }

  yieldToOthers(): Promise<void> {
    return Promise.resolve();
  }

  /** Never defers: a test's schedule must not depend on how fast the machine is. */
  pace(): Promise<void> | undefined {
    return undefined;
  }

  /** Moves time forward, firing due timers in order; callbacks may arm new timers. */
  advance(deltaMs: number): void {
    const targetMs = this.nowMs + deltaMs;
    for (;;) {
      const due = this.pending
        .filter((timer) => !timer.cancelled && timer.dueMs <= targetMs)
        .sort((a, b) => a.dueMs - b.dueMs || a.order - b.order)[0];
      if (due === undefined) break;
      this.nowMs = Math.max(this.nowMs, due.dueMs);
      due.cancelled = true;
      due.callback();
    }
    this.nowMs = targetMs;
    this.pending = this.pending.filter((timer) => !timer.cancelled);
  }

  /** Number of armed timers (for tests). */
  get armed(): number {
    return this.pending.filter((timer) => !timer.cancelled).length;
  }
}
