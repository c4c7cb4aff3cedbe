// Busy polling: once a connection has answered everything it was asked, the event loop keeps
// polling the sockets for a short window instead of going to sleep.
//
// Why: a client at queue depth 1 sends its next request a few tens of microseconds after our
// reply. If the event loop is asleep in epoll_wait by then, the kernel has to wake it, and on a
// virtual machine waking a sleeping vCPU costs tens of microseconds: measured here, 14,300 4 KiB
// reads per second at QD1 with a sleeping loop against 26,800 with a polling one
// (docs/performance.md). While an immediate is queued libuv polls with a zero timeout, so a
// chain of immediates that ends when input arrives or the window closes is all it takes.
//
// What it costs, and the bounds on that:
// - At most windowUs of CPU per idle moment, and only after a short busy period (at most
//   busyRequestsMax requests since the connection was last idle). A deep-queue client keeps
//   requests in flight and needs no help; polling between its batches took CPU from it
//   (4 KiB writes at QD32: 0.87x when every idle moment polled).
// - A window that closes without input is a miss. After each consecutive miss the following
//   2^misses - 1 idle moments are not polled (at most missSkipMax), so a client that pauses
//   between requests costs almost nothing; input during a window resets the count.
// - One window at a time for the whole server, whatever the number of connections. A
//   connection that goes idle while the window is open (its request arrived during the window
//   and was answered at once, inside the same turn) counts the window's hit and restarts it
//   from now, instead of leaving the window to close on that input: a client at QD1 whose
//   replies leave without waiting for the turn's end must still find the loop polling.

import { assert } from '../../lib/assert.js';

/** Default polling window; 0 turns busy polling off. */
export const busyPollWindowDefaultUs = 100;
/** Largest window accepted: beyond this a sleeping loop's wake-up is the smaller cost. */
export const busyPollWindowMaxUs = 10_000;
/** A connection idle after more requests than this was not waiting on us; no window. */
export const busyRequestsMax = 4;
/** Consecutive misses beyond this change nothing... */
const missesCountedMax = 6;
/** ...so after repeated misses at most this many idle moments in a row go unpolled. */
export const missSkipMax = 2 ** missesCountedMax - 1;

export interface BusyPollCounters {
  /** Windows in which input arrived. */
  busyPollHitsTotal: number;
  /** Windows that closed without input. */
  busyPollMissesTotal: number;
}

/** How a window waits and reads time: real immediates and clock, or a test's. */
export interface BusyPollClock {
  nowMs(): number;
  schedule(callback: () => void): void;
}

const realClock: BusyPollClock = {
  nowMs: () => performance.now(),
  schedule: (callback) => { setImmediate(callback); },
};

export class BusyPoll {
  readonly counters: BusyPollCounters = { busyPollHitsTotal: 0, busyPollMissesTotal: 0 };
  private readonly windowMs: number;
  private readonly clock: BusyPollClock;
  private polling = false;
  private inputSeen = false;
  private deadlineMs = 0;
  private misses = 0;
  /** Idle moments still to pass unpolled after the last miss. */
  private skip = 0;
  private stopped = false;
  private readonly stepBound = (): void => { this.step(); };

  constructor(windowUs: number, clock: BusyPollClock = realClock) {
    assert(Number.isSafeInteger(windowUs) && windowUs >= 0 && windowUs <= busyPollWindowMaxUs, 'busy poll window out of range (us)', windowUs);
    this.windowMs = windowUs / 1000;
    this.clock = clock;
  }

  /** Whether a window is open now. */
  get active(): boolean {
    return this.polling;
  }

  /** Bytes arrived on some connection (cheap: called for every socket read). */
  noteInput(): void {
    this.inputSeen = true;
  }

  /** A connection has answered every request of a busy period of `requests` requests. */
  idle(requests: number): void {
    if (this.windowMs === 0 || this.stopped || requests > busyRequestsMax) return;
    if (this.polling) {
      // The step already queued keeps running; it now waits for input after this moment.
      if (this.inputSeen) this.hit();
      this.inputSeen = false;
      this.deadlineMs = this.clock.nowMs() + this.windowMs;
      return;
    }
    if (this.skip > 0) {
      this.skip -= 1;
      return;
    }
    this.polling = true;
    this.inputSeen = false;
    this.deadlineMs = this.clock.nowMs() + this.windowMs;
    this.clock.schedule(this.stepBound);
  }

  /** No more windows; an open one closes at its next step. */
  stop(): void {
    this.stopped = true;
  }

  private step(): void {
    if (this.inputSeen) {
      this.polling = false;
      this.hit();
      return;
    }
    if (this.stopped) {
      this.polling = false;
      return;
    }
    if (this.clock.nowMs() >= this.deadlineMs) {
      this.polling = false;
      this.counters.busyPollMissesTotal += 1;
      this.misses = Math.min(this.misses + 1, missesCountedMax);
      this.skip = 2 ** this.misses - 1;
      return;
    }
    this.clock.schedule(this.stepBound);
  }

  private hit(): void {
    this.misses = 0;
    this.counters.busyPollHitsTotal += 1;
  }
}
