// CacheWorker: what writeback and GC share — a background loop that is kicked, never polled,
// and rounds that never overlap, whether the loop or an explicit step() runs them.
//
// With background work off (tests, the crash simulator), only urgent kicks start the loop: a
// writer short of space needs writeback and GC to make room even then.

import { BackgroundTask, SerialSection } from '../lib/background_task.js';
import type { CacheCore } from './cache_core.js';

export abstract class CacheWorker {
  protected readonly core: CacheCore;
  private readonly task = new BackgroundTask(() => this.loop());
  /** Rounds from the loop and from step() run one at a time. */
  protected readonly rounds = new SerialSection();

  constructor(core: CacheCore) {
    this.core = core;
  }

  get active(): boolean {
    return this.task.running;
  }

  /** Starts (or extends) the loop, unless background work is off and this is not urgent. */
  kick(urgent: boolean): void {
    if (!this.core.background && !urgent) return;
    if (this.core.stopped() || this.core.readOnly) return;
    this.task.kick();
  }

  /** Waits until the loop (if any) has stopped; used at close. */
  idle(): Promise<void> {
    return this.task.idle();
  }

  protected abstract loop(): Promise<void>;
}
