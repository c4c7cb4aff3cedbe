// Writeback: applying the log to the backing device, in log order, and advancing dirty_tail.
//
// A round takes a window of ksets from dirty_tail onwards (cache_writeback_plan.ts: bounded in
// ksets and dirty bytes, never past the durable log head, and under strict ordering never past
// the end of a client flush epoch), merges its keys so only the newest data for each range
// survives, leaves out CLEAN extents and whatever newer keys supersede, writes the rest to the
// backing device in offset order, syncs the backing device, waits for the commit of the newer
// keys it relied on (if it skipped anything), and only then persists the advanced dirty_tail
// and syncs the cache device. Under strict ordering a round never spans an epoch boundary and
// skips only within the open epoch, and a round's dirty_tail is durable before the next round
// writes anything, so the backing device alone always holds a prefix of the client's flush
// epochs (the last one possibly partial), even across a crash and recovery, and even if the
// cache device is lost. Relaxed ordering gives that up for larger merges (docs/design.md §6).
// On any error nothing advances: the round is retried from the same dirty_tail with
// exponential back-off, the error is counted, and status reports the cache as degraded. A
// failed backing sync is treated like failed writes (fsyncgate): the whole round is redone.
//
// When writeback runs (the policy, as dm-writecache's watermarks and bcache's writeback delay):
// once dirty data reaches writebackStartPercent of the cache's data capacity, until it is down
// to writebackStopPercent; after writebackIdleMs without a client write; for data dirty longer
// than writebackMaxAgeMs; when GC is starved (the segments in use have reached gc_percent, GC
// has reclaimed everything behind dirty_tail, and at most gcStarvedDirtyPercentMax is dirty:
// mostly clean data waits for dirty_tail to pass it, and a full cache would turn every read
// miss away); and whenever it is urgent (a writer short of space, a drain). Writing back lazily
// keeps the backing device's I/O and the CPU for clients while the cache absorbs a burst, and
// gives overwrites a chance to be written back once instead of many times.
// How a round's extents reach the backing device (runs, batches, what is in flight):
// cache_writeback_apply.ts.
// A hold (holdAt, for checkpoints) stops rounds at a log position: writeback applies nothing at
// or past it until release(), so the backing device keeps one prefix of the log while, say, a
// snapshot of it is taken; clients go on writing into the cache meanwhile.

import { assert } from '../lib/assert.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { MiB } from '../lib/units.js';
import { ksetBytesMax } from '../ondisk/kset.js';
import type { TimerHandle } from '../lib/timers.js';
import type { CacheContext } from './cache_context.js';
import { CacheWorker, type RoundOutcome } from './cache_worker.js';
import type { KsetLog } from './cache_kset.js';
import type { LogPos } from './cache_types.js';
import { WritebackApplier } from './cache_writeback_apply.js';
import { planWrites, readWindow, readWindowPlan, type WindowBounds, type WindowLimits, type WritePlan } from './cache_writeback_plan.js';

/** A round covers at most this many ksets... */
export const writebackWindowKsetsMax = 1024;
/** ...and dirty bytes: a sixteenth of the cache's data capacity, within these bounds. */
export const writebackWindowBytesMin = 4 * MiB;
export const writebackWindowBytesMax = 64 * MiB;
const writebackWindowCacheDivisor = 16;
/** Commits closer together than this share one age entry (bounds the age queue). */
const ageGranularityMs = 100;
const ageEntriesMax = 1024;
export const writebackBackoffMinMs = 100;
export const writebackBackoffMaxMs = 30_000;
/**
 * GC starved of reclaimable ksets makes writeback run only while at most this percentage of
 * the cache's data capacity is dirty: then the log is mostly clean copies (a read-mostly
 * cache), and writing back the little dirty data to let GC free them costs little. With more
 * dirty data, the watermarks decide, so that overwrites keep being absorbed.
 */
const gcStarvedDirtyPercentMax = 5;

interface DrainWaiter {
  readonly lsn: number;
  readonly resolve: () => void;
  readonly reject: (error: unknown) => void;
}

export class Writeback extends CacheWorker {
  private readonly log: KsetLog;
  private readonly scratch = new Uint8Array(ksetBytesMax);
  private readonly applier: WritebackApplier;
  private waiters: DrainWaiter[] = [];
  backoffMs = 0;
  /** Monotonic time of the first failure of the current failing streak, if any. */
  failingSinceMs: number | undefined;
  lastError: string | undefined;

  /** When log positions became durable: ages of dirty data, oldest first, for writebackMaxAgeMs. */
  private ages: { lsnEnd: number; timeMs: number }[] = [];
  /** Dirty data passed writebackStartPercent and has not yet come down to writebackStopPercent. */
  private aboveWatermark = false;
  private wakeTimer: TimerHandle | undefined;
  /** A checkpoint's hold: rounds apply no kset at or past this lsn (undefined: no hold). */
  private holdLsn: number | undefined;

  constructor(ctx: CacheContext, log: KsetLog) {
    super(ctx);
    this.log = log;
    this.applier = new WritebackApplier(ctx);
    log.durable.add((durableHead) => {
      this.noteDurable(durableHead.lsn, ctx.timers.now());
      this.kick(false);
    });
    ctx.spaceNeeded.add(() => { this.kick(true); });
    ctx.gcThresholdReached.add(() => { this.kick(false); });
    // A failed cache runs no more rounds (loop), so a drain waiting for dirty_tail would wait
    // until close: it fails with the cache instead, as the log's waiters do.
    ctx.failed.add((failure) => { this.abort(failure); });
  }

  /** Writeback has work: durable ksets past dirty_tail (and before the hold, if any). */
  get due(): boolean {
    return this.ctx.dirtyTail.lsn < this.limitLsn();
  }

  /** Where rounds must stop: the durable log head, or the hold before it. */
  private limitLsn(): number {
    const durable = this.log.durableHead.lsn;
    return this.holdLsn === undefined ? durable : Math.min(durable, this.holdLsn);
  }

  /**
   * Holds writeback at `lsn`, a kset boundary no later than the durable log head (the durable
   * head itself, at the moment of the call): no round applies anything at or past it until
   * release(). A round already running finishes first and may have gone further; holdAt
   * resolves once it has, and then the backing device changes no more. One hold at a time.
   */
  async holdAt(lsn: number): Promise<void> {
    assert(this.holdLsn === undefined, 'writeback is already held');
    assert(lsn <= this.log.durableHead.lsn, 'a writeback hold past the durable log head');
    this.holdLsn = lsn;
    await this.rounds.run(() => Promise.resolve('nothing'));
  }

  /** Ends the hold: writeback goes on by its policy. */
  release(): void {
    this.holdLsn = undefined;
    this.kick(false);
  }

  /**
   * Applies the policy (see the file comment) and says whether writeback should run now. It
   * updates the policy's state as it goes: the watermark hysteresis (started above
   * writebackStartPercent, running until writebackStopPercent) and urgency that nobody waits
   * for any more.
   */
  updateWanted(): boolean {
    if (!this.due) {
      this.aboveWatermark = false;
      return false;
    }
    const ctx = this.ctx;
    const tuning = ctx.tuning;
    // With background work on, urgency lasts while someone waits for it: a writer (or the
    // log) short of space, or a drain. Then the watermarks decide again, instead of one space
    // wait writing back everything. Without background work it lasts until nothing is left
    // (cache_worker.ts says why).
    if (this.urgent && ctx.background && ctx.spaceWaiters === 0 && this.waiters.length === 0) this.urgent = false;
    if (this.urgent || ctx.spaceWaiters > 0 || tuning.writebackStartPercent === 0) return true;
    const dirtyPercent = (ctx.stats.dirtyBytes * 100) / ctx.dataCapacityBytes;
    if (dirtyPercent <= gcStarvedDirtyPercentMax && this.gcStarved()) return true;
    if (dirtyPercent >= tuning.writebackStartPercent) this.aboveWatermark = true;
    else if (dirtyPercent <= tuning.writebackStopPercent) this.aboveWatermark = false;
    if (this.aboveWatermark) return true;
    return this.idleDeadlineMs() <= ctx.timers.now() || this.ageDeadlineMs() <= ctx.timers.now();
  }

  /**
   * GC wants segments back but has nothing behind dirty_tail to reclaim. Passing clean ksets
   * costs writeback only their reads, and without it clean data stays until a write-idle
   * second, while fills are turned away (the policy benchmark found this).
   */
  private gcStarved(): boolean {
    const ctx = this.ctx;
    return ctx.segments.usedCount >= ctx.gcThresholdSegments && ctx.keyTail.lsn >= ctx.dirtyTail.lsn;
  }

  /** Records that the log up to `lsnEnd` became durable at `timeMs` (for the age rule). */
  noteDurable(lsnEnd: number, timeMs: number): void {
    const last = this.ages[this.ages.length - 1];
    if (last !== undefined && timeMs - last.timeMs < ageGranularityMs) {
      last.lsnEnd = lsnEnd;
    } else {
      this.ages.push({ lsnEnd, timeMs });
      // Merging the two oldest keeps the older time: data only ever looks older, never younger.
      if (this.ages.length > ageEntriesMax) this.ages.splice(1, 1);
    }
  }

  override kick(urgent: boolean): void {
    if (urgent) this.urgent = true;
    if (this.updateWanted()) super.kick(urgent);
    else this.armWake();
  }

  /** Resolves when dirty_tail reaches `lsn` (drain). */
  waitFor(lsn: number): Promise<void> {
    if (this.ctx.dirtyTail.lsn >= lsn) return Promise.resolve();
    if (this.ctx.failure !== undefined) return Promise.reject(this.ctx.failure);
    return new Promise((resolve, reject) => { this.waiters.push({ lsn, resolve, reject }); });
  }

  abort(error: PcacheError): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const waiter of waiters) waiter.reject(error);
  }

  /** One round, if one is due; returns whether dirty_tail advanced. For tests and the simulator. */
  async step(): Promise<boolean> {
    await this.idle();
    if (!this.due || this.ctx.stopped()) return false;
    return (await this.rounds.run(() => this.round())) === 'advanced';
  }

  /** When the idle rule will want writeback (Infinity when nothing is dirty). */
  private idleDeadlineMs(): number {
    return this.ctx.lastWriteMs + this.ctx.tuning.writebackIdleMs;
  }

  /** When the age rule will want writeback for the oldest dirty data still in the log. */
  private ageDeadlineMs(): number {
    const dirtyTailLsn = this.ctx.dirtyTail.lsn;
    while (this.ages.length > 0 && (this.ages[0]?.lsnEnd ?? 0) <= dirtyTailLsn) this.ages.shift();
    const oldest = this.ages[0];
    return oldest === undefined ? Number.POSITIVE_INFINITY : oldest.timeMs + this.ctx.tuning.writebackMaxAgeMs;
  }

  /** Arms one timer for the moment the idle or age rule will want writeback. */
  private armWake(): void {
    const ctx = this.ctx;
    if (this.wakeTimer !== undefined || !this.due || !ctx.background || ctx.stopped()) return;
    const deadline = Math.min(this.idleDeadlineMs(), this.ageDeadlineMs());
    if (!Number.isFinite(deadline)) return;
    this.wakeTimer = ctx.timers.after(Math.max(1, deadline - ctx.timers.now()), () => {
      this.wakeTimer = undefined;
      this.kick(false);
    });
  }

  /** Age of the oldest dirty data in the log, in milliseconds (undefined when none). */
  get oldestDirtyAgeMs(): number | undefined {
    const deadline = this.ageDeadlineMs();
    return Number.isFinite(deadline) ? this.ctx.timers.now() - (deadline - this.ctx.tuning.writebackMaxAgeMs) : undefined;
  }

  /** Stops the wake-up timer (close). */
  stop(): void {
    this.wakeTimer?.cancel();
    this.wakeTimer = undefined;
  }

  protected async loop(): Promise<void> {
    const ctx = this.ctx;
    while (this.updateWanted() && ctx.state === 'running' && ctx.failure === undefined) {
      const outcome = await this.rounds.run(() => this.round());
      if (outcome === 'advanced') await ctx.timers.yieldToOthers();
      else if (outcome === 'failed' && !(await this.backOff(this.backoffMs))) break;
    }
    if (!this.due) this.urgent = false;
    else this.armWake();
  }

  private async round(): Promise<RoundOutcome> {
    const ctx = this.ctx;
    ctx.stats.writebackRounds++;
    try {
      const { window, plan } = await this.readAndPlan();
      if (window.end.lsn === ctx.dirtyTail.lsn) return 'nothing'; // another round got here first
      // Newer keys that made parts of the window unnecessary must be durable before dirty_tail
      // passes those parts (cache_writeback_plan.ts); the commit runs alongside the writes.
      const committed = plan.skippedBytes > 0 ? this.log.commitAppended() : undefined;
      committed?.catch(() => undefined); // awaited below; a failure is the cache's failure
      await this.applier.apply(plan.parts);
      await ctx.backing.sync();
      if (committed !== undefined) await committed;
      if (ctx.stopped()) return 'nothing';
      const end = window.end;
      await ctx.dev.writeDirtyTail({ segment: end.segment, offsetBytes: end.offsetBytes, seq: end.seq, durableSeq: ctx.logDurableSeq });
      // The new dirty_tail must be durable before the next round puts newer data on the backing
      // device: were it lost in a crash, recovery would write this round's (older) epoch back
      // over the next one's, and the backing device would stop being a prefix of the epochs.
      await ctx.dev.sync();
      ctx.durableDirtyTail = end;
      ctx.dirtyTail = end;
      ctx.stats.dirtyBytes -= window.dirtyBytes;
      ctx.stats.writebackBytes += window.dirtyBytes;
      ctx.stats.writebackSkippedBytes += window.dirtyBytes - plan.bytes;
      ctx.stats.writebackKsets += window.ksets;
      ctx.assertKeyTailBehindDirtyTail();
      assert(ctx.dirtyTail.lsn <= this.log.durableHead.lsn, 'dirty_tail passed the durable log head');
      this.backoffMs = 0;
      this.failingSinceMs = undefined;
      this.lastError = undefined;
      ctx.backingOnline();
      this.wakeWaiters();
      ctx.wakeAdmission();
      ctx.dirtyTailAdvanced.call();
      return 'advanced';
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      ctx.stats.writebackErrors++;
      this.lastError = error.message;
      this.failingSinceMs ??= ctx.timers.now();
      const failingForMs = ctx.timers.now() - this.failingSinceMs;
      if (error.code === 'ENODEV') ctx.backingOffline(error.message);
      else if (failingForMs >= ctx.tuning.backingOfflineAfterMs) ctx.backingOffline(`writeback has failed for ${Math.round(failingForMs / 1000)} s: ${error.message}`);
      this.backoffMs = Math.min(writebackBackoffMaxMs, Math.max(writebackBackoffMinMs, this.backoffMs * 2));
      return 'failed';
    }
  }

  /**
   * The round's window and what to write of it: planned from the live index in one pass while
   * superseded data may be skipped, else (or when the live index cannot tell) merged in a
   * private index first (cache_writeback_plan.ts).
   */
  private async readAndPlan(): Promise<{ window: WindowBounds; plan: WritePlan }> {
    const ctx = this.ctx;
    const start = ctx.dirtyTail;
    const skipAllowed = (): boolean => this.maySkipSuperseded(start);
    if (skipAllowed()) {
      const planned = await readWindowPlan(ctx, this.log, start, this.windowLimits(), this.scratch, ctx.index, skipAllowed);
      if (planned !== undefined) return planned;
    }
    ctx.stats.writebackWindowsMerged++;
    const window = await readWindow(ctx, this.log, start, this.windowLimits(), this.scratch);
    return { window, plan: await planWrites(window, ctx.index, skipAllowed, ctx.timers) };
  }

  /** The window this round covers: bounded by ksets and dirty bytes; under strict ordering, one epoch at most. */
  private windowLimits(): WindowLimits {
    const ctx = this.ctx;
    const dirtyBytesMax = Math.min(writebackWindowBytesMax, Math.max(writebackWindowBytesMin, Math.floor(ctx.dataCapacityBytes / writebackWindowCacheDivisor)));
    return { ksetsMax: writebackWindowKsetsMax, dirtyBytesMax, stopAtEpochEnd: ctx.tuning.writebackOrdering === 'strict', endLsn: () => this.limitLsn() };
  }

  /**
   * Whether this round may leave out data that newer keys after the window supersede: always
   * under relaxed ordering; under strict ordering only while the window lies in the flush epoch
   * still open (no EPOCH_END sealed at or after its start; cache_writeback_plan.ts says why).
   */
  private maySkipSuperseded(start: LogPos): boolean {
    return this.ctx.tuning.writebackOrdering === 'relaxed' || this.log.lastEpochEndSeq < start.seq;
  }

  private wakeWaiters(): void {
    const lsn = this.ctx.dirtyTail.lsn;
    const waiting = this.waiters;
    this.waiters = [];
    for (const waiter of waiting) {
      if (waiter.lsn <= lsn) waiter.resolve();
      else this.waiters.push(waiter);
    }
  }
}
