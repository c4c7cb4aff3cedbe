// CacheWorker: what writeback and GC share — a background loop that is kicked, never polled,
// and rounds that never overlap, whether the loop or an explicit step() runs them.
//
// With background work off (tests, the crash simulator), only urgency starts the loop: a writer
// short of space needs writeback and GC to make room even then. Urgency lasts until the worker
// has nothing left to do, because what it needs (a commit, a writeback round) may arrive only
// after the urgent kick; the ordinary kicks that announce it must then still start the loop.
// With background work on, writeback ends urgency sooner: once nobody waits for it (see
// Writeback.updateWanted), since its ordinary kicks start the loop anyway.

import { BackgroundTask, SerialSection } from '../lib/background_task.js';
import type { CacheContext } from './cache_context.js';

/** How a round went: it moved its tail, had nothing to do (another round got there), or failed. */
export type RoundOutcome = 'advanced' | 'nothing' | 'failed';

export abstract class CacheWorker {
  protected readonly ctx: CacheContext;
  private readonly task = new BackgroundTask(() => this.loop());
  /** Rounds from the loop and from step() run one at a time. */
  protected readonly rounds = new SerialSection();
  /** A writer is short of space or a drain waits; cleared once there is nothing left to do (or, for writeback with background work on, once nobody waits). */
  protected urgent = false;
  /** Ends the back-off sleep in progress, if any. */
  private endBackOff: (() => void) | undefined;

  constructor(ctx: CacheContext) {
    this.ctx = ctx;
  }

  get active(): boolean {
    return this.task.running;
  }

  /** Starts (or extends) the loop, unless background work is off and nothing is urgent. */
  kick(urgent: boolean): void {
    if (urgent) this.urgent = true;
    if (!this.ctx.background && !this.urgent && this.ctx.spaceWaiters === 0) return;
    if (this.ctx.stopped() || this.ctx.readOnly) return;
    this.task.kick();
  }

  /** Waits until the loop (if any) has stopped; used at close. */
  idle(): Promise<void> {
    return this.task.idle();
  }

  protected abstract loop(): Promise<void>;

  /**
   * After a failed round: back off before the next try. With background work off nothing may
   * wait on a timer (a test's manual clock may never move): the loop ends instead, and the next
   * kick or step tries again.
   */
  protected async backOff(delayMs: number): Promise<boolean> {
    if (!this.ctx.background) return false;
    await new Promise<void>((resolve) => {
      const timer = this.ctx.timers.after(delayMs, () => { this.wakeFromBackOff(); });
      this.endBackOff = () => {
        timer.cancel();
        resolve();
      };
    });
    return true;
  }

  /**
   * Cuts a back-off short: the next round starts now. For close (which must not wait out a
   * 30 s back-off) and for a backing device known to be back (its connection returned).
   */
  wakeFromBackOff(): void {
    const end = this.endBackOff;
    this.endBackOff = undefined;
    end?.();
  }
}
