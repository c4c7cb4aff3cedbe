// Cache: the public face of the engine — open, requests, drain, settings, status, close.
//
// A Cache turns a fast cache device and a slower backing device into one cached block device
// of the backing device's size. It implements the NBD layer's Export interface structurally
// (it never imports it). Requests are validated here (range, 512-byte alignment); below this
// file the engine asserts instead. Lifecycle: open (cache_open.ts: format a blank device when
// asked; refuse a device that belongs to another backing device; replay the log) -> running ->
// close (seal and commit the open kset, let writeback and GC finish their round) or abandon
// (tests: drop everything without writing, as a crash would). It counts the requests in
// flight, so close() can wait for them, and the drains in progress, for status.

import { SerialSection } from '../lib/background_task.js';
import { isPcacheError, PcacheError } from '../lib/errors.js';
import { sectorSizeBytes } from '../lib/units.js';
import type { BlockDevice } from '../device/block_device.js';
import { gcPercentMax } from '../ondisk/layout.js';
import { checkCacheDevice, compareWithEngine } from './cache_check.js';
import { formatCacheDevice, type FormatOptions } from './cache_metadata.js';
import type { CacheEngine } from './cache_engine.js';
import { backingFingerprint } from './cache_backing.js';
import { openEngine, type BackingCheck, type CacheOpenOptions } from './cache_open.js';
import type { CacheExtentStatus } from './cache_read.js';
import type { CacheMode } from '../ondisk/cache_info.js';
import { dropCleanKeys, type ReplayResult } from './cache_replay.js';
import { CachePolicy } from './cache_policy.js';
import { cacheInfoOf, cacheStatus, type CacheStatus } from './cache_status.js';
import { tuningProblem, type CacheTuning } from './cache_tuning.js';

export type { FormatOptions } from './cache_metadata.js';
export type { BackingCheck, CacheOpenOptions } from './cache_open.js';
export type { CacheExtentStatus } from './cache_read.js';
export { describeLogDamage, type LogDamage, type ReplayResult } from './cache_replay.js';
export { dmStatusLine, type CacheStatus } from './cache_status.js';
export { defaultTuning, eagerWriteback, type CacheTuning } from './cache_tuning.js';
export { cacheModes, type CacheMode } from '../ondisk/cache_info.js';

/** Commit-and-wait passes check() makes before it compares the device with the running cache. */
const checkSettlePassesMax = 8;

/** Where the backing device stands during a checkpoint: every kset before this log position is on it. */
export interface CheckpointPoint {
  /** The seq of the first kset not on the backing device: grows with every checkpoint of a cache, across restarts. */
  readonly seq: number;
  /** The same position in bytes of log appended since this start. */
  readonly lsn: number;
}

export interface WriteOptions {
  readonly fua: boolean;
}

export interface ZeroOptions extends WriteOptions {
  readonly fastZero?: boolean;
}

const noFua: WriteOptions = { fua: false };

export class Cache {
  private readonly engine: CacheEngine;
  /** The write mode and the sequential cutoff (cache_policy.ts). */
  private readonly policy: CachePolicy;
  readonly replayResult: ReplayResult;
  /** What the start found about the backing device against the last clean stop (cache_open.ts). */
  readonly backingCheck: BackingCheck;
  private inFlight = 0;
  /** drain() calls not yet settled; status says 'draining' while there are any. */
  private drainsInProgress = 0;
  private idleWaiters: (() => void)[] = [];
  private readonly checkpoints = new SerialSection();

  private constructor(engine: CacheEngine, replayResult: ReplayResult, backingCheck: BackingCheck) {
    this.engine = engine;
    this.policy = new CachePolicy(engine);
    this.replayResult = replayResult;
    this.backingCheck = backingCheck;
  }

  /** Formats `cacheDevice` for `backingDevice`, overwriting whatever it held (the caller decides whether that is allowed). */
  static async format(cacheDevice: BlockDevice, backingDevice: BlockDevice, options: FormatOptions = {}): Promise<void> {
    await formatCacheDevice(cacheDevice, backingDevice, options);
  }

  static async open(options: CacheOpenOptions): Promise<Cache> {
    const { engine, replayResult, backingCheck } = await openEngine(options);
    return new Cache(engine, replayResult, backingCheck);
  }

  get sizeBytes(): number {
    return this.engine.ctx.dev.sb.backingSizeBytes;
  }

  /** A read; `client` identifies the sender for the sequential cutoff (the NBD server's connection number). */
  read(target: Uint8Array, offsetBytes: number, client = 0): Promise<void> | undefined {
    this.validate(offsetBytes, target.length);
    return this.track(this.engine.reads.read(target, offsetBytes, this.policy.admitRead(offsetBytes, target.length, client)));
  }

  /** A write; `client` identifies the sender for the sequential cutoff, as for read. */
  write(source: Uint8Array, offsetBytes: number, options: WriteOptions = noFua, client = 0): Promise<void> {
    this.validate(offsetBytes, source.length);
    const policy = this.policy;
    const route = policy.writeRoute(offsetBytes, source.length, client);
    if (route === 'cache' && !policy.direct.busy) return this.engine.writes.write(source, offsetBytes, options.fua, this.trackWrite);
    return this.trackAlways(policy.write(route, source, offsetBytes, options.fua));
  }

  /** Every write completed before this call is durable (in the cache log) when it resolves. */
  flush(): Promise<void> {
    const engine = this.engine;
    const ctx = engine.ctx;
    if (ctx.state !== 'running') return Promise.reject(new PcacheError('ESHUTDOWN', 'the cache is shutting down'));
    ctx.stats.flushRequests++;
    if (ctx.readOnly) return Promise.resolve();
    return this.trackAlways(this.policy.flush());
  }

  /** TRIM: the range reads as zeroes afterwards (a defined answer for "unspecified"). */
  trim(offsetBytes: number, lengthBytes: number, options: WriteOptions = noFua): Promise<void> {
    this.validate(offsetBytes, lengthBytes);
    return this.trackAlways(this.policy.zero(offsetBytes, lengthBytes, options.fua));
  }

  /** Same as trim; the name block-layer users expect. */
  discard(offsetBytes: number, lengthBytes: number, options: WriteOptions = noFua): Promise<void> {
    return this.trim(offsetBytes, lengthBytes, options);
  }

  /** WRITE_ZEROES: recorded as a ZERO key, so it is always fast (FAST_ZERO never fails). */
  writeZeroes(offsetBytes: number, lengthBytes: number, options: ZeroOptions = noFua): Promise<void> {
    this.validate(offsetBytes, lengthBytes);
    return this.trackAlways(this.policy.zero(offsetBytes, lengthBytes, options.fua));
  }

  /** Prefetches the range into the cache (NBD_CMD_CACHE). */
  cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.validate(offsetBytes, lengthBytes);
    return this.trackAlways(this.engine.reads.prefetch(offsetBytes, lengthBytes, this.policy.mode !== 'passthrough'));
  }

  blockStatus(offsetBytes: number, lengthBytes: number): CacheExtentStatus[] {
    this.validate(offsetBytes, lengthBytes);
    return this.engine.reads.blockStatus(offsetBytes, lengthBytes);
  }

  /** Writes back everything written before the call and resolves once the backing device holds it, synced. */
  async drain(): Promise<void> {
    if (this.engine.ctx.readOnly) return;
    this.drainsInProgress += 1;
    try {
      await this.drainAll();
    } finally {
      this.drainsInProgress -= 1;
    }
  }

  private async drainAll(): Promise<void> {
    await this.flush();
    await this.writeBackTo(this.engine.log.durableHead.lsn);
  }

  /**
   * A checkpoint (pcache checkpoint): brings the backing device to what the cache log held
   * durably at the call — every write whose FLUSH (or FUA) had completed, and perhaps writes
   * made durable since the last flush, which a crash at that instant would keep too: a prefix
   * of the log, so a crash-consistent state — holds writeback there while `held` runs (a
   * snapshot of the backing device, say), and resumes it when `held` settles. Clients are not
   * paused: their writes keep landing in the cache meanwhile. A round of writeback already
   * running when the call comes may have gone further; the point reports where the backing
   * device stands. `signal` gives up the wait for writeback (ETIMEDOUT); `held` then never runs.
   * Checkpoints run one at a time, in the order asked.
   */
  checkpoint<T>(held: (point: CheckpointPoint) => Promise<T>, signal?: AbortSignal): Promise<T> {
    // One at a time: a second checkpoint starts (and takes its position) once the first is released.
    return this.checkpoints.run(() => this.checkpointNow(held, signal));
  }

  private async checkpointNow<T>(held: (point: CheckpointPoint) => Promise<T>, signal: AbortSignal | undefined): Promise<T> {
    if (signal?.aborted === true) throw new PcacheError('ETIMEDOUT', 'the checkpoint was given up before it began');
    const { ctx, log, writeback } = this.engine;
    if (ctx.readOnly) return held({ seq: ctx.dirtyTail.seq, lsn: ctx.dirtyTail.lsn });
    ctx.checkWritable();
    const target = log.durableHead.lsn;
    await writeback.holdAt(target);
    try {
      await this.writeBackTo(target, signal);
      return await held({ seq: ctx.dirtyTail.seq, lsn: ctx.dirtyTail.lsn });
    } finally {
      writeback.release();
    }
  }

  /** Runs writeback until dirty_tail reaches `target` (urgently: someone waits); `signal` gives up (ETIMEDOUT). */
  private async writeBackTo(target: number, signal?: AbortSignal): Promise<void> {
    const engine = this.engine;
    const ctx = engine.ctx;
    const givenUp = (): PcacheError => new PcacheError('ETIMEDOUT', 'given up before the backing device got there');
    if (ctx.background) {
      // Waiting first: urgency lasts only while a waiter is there (cache_writeback.ts).
      const done = engine.writeback.waitFor(target);
      engine.writeback.kick(true);
      if (signal === undefined) {
        await done;
        return;
      }
      done.catch(() => undefined); // a waiter given up on may still be rejected at close
      await new Promise<void>((resolve, reject) => {
        const abort = (): void => { reject(givenUp()); };
        if (signal.aborted) abort();
        signal.addEventListener('abort', abort, { once: true });
        done.then(resolve, reject).finally(() => { signal.removeEventListener('abort', abort); });
      });
      return;
    }
    while (ctx.dirtyTail.lsn < target) {
      if (ctx.state !== 'running') throw new PcacheError('ESHUTDOWN', 'the cache is shutting down');
      if (signal?.aborted === true) throw givenUp();
      const advanced = await engine.writeback.step();
      if (!advanced) throw new PcacheError('EIO', `drain: writeback failed: ${engine.writeback.lastError ?? 'no progress'}`);
    }
  }

  /**
   * Tells the cache that its backing device is (probably) reachable again — for example, its
   * network connection came back: writeback stops waiting out its back-off and tries at once.
   * Harmless when wrong: a failed round just backs off again.
   */
  retryBackingNow(): void {
    this.engine.writeback.wakeFromBackOff();
    this.engine.writeback.kick(false);
  }

  /** Runs one writeback round now (tests and the crash simulator, with background work off). */
  writebackStep(): Promise<boolean> {
    return this.engine.writeback.step();
  }

  /** Runs one GC round now (tests and the crash simulator, with background work off). */
  gcStep(): Promise<boolean> {
    return this.engine.gc.step();
  }

  /** Changes runtime knobs (not persisted; see CacheTuning). Returns the tuning now in force. */
  setTuning(changes: Partial<CacheTuning>): CacheTuning {
    const engine = this.engine;
    const ctx = engine.ctx;
    const tuning: CacheTuning = { ...ctx.tuning, ...changes };
    const problem = tuningProblem(tuning);
    if (problem !== undefined) throw new PcacheError('EINVAL', problem);
    ctx.tuning = tuning;
    ctx.wakeAdmission();
    engine.writeback.kick(false);
    return tuning;
  }

  get tuning(): CacheTuning {
    return this.engine.ctx.tuning;
  }

  /** Changes the GC threshold and persists it in cache_info (dm-pcache's `gc_percent` message). */
  async setGcPercent(gcPercent: number): Promise<void> {
    const engine = this.engine;
    const ctx = engine.ctx;
    if (!Number.isInteger(gcPercent) || gcPercent < 0 || gcPercent > gcPercentMax) {
      throw new PcacheError('EINVAL', `gc_percent must be an integer from 0 to ${gcPercentMax}, got ${gcPercent}`);
    }
    ctx.checkWritable();
    await ctx.dev.writeCacheInfo(cacheInfoOf(ctx, gcPercent));
    await ctx.dev.sync();
    ctx.gcPercent = gcPercent;
    engine.gc.kick(false);
  }

  /** The write mode now in force. */
  get mode(): CacheMode {
    return this.policy.mode;
  }

  /**
   * Changes the write mode (a name from cacheModes; anything else is EINVAL and changes
   * nothing) and stores it in cache_info, so a restart keeps it. Leaving writeback with dirty
   * data drains it in the background; reads stay right throughout (cache_policy.ts).
   */
  setMode(mode: string): Promise<void> {
    return this.trackAlways(this.policy.setMode(mode));
  }

  status(): CacheStatus {
    return cacheStatus(this.engine, this.drainsInProgress);
  }

  /**
   * Stops cleanly: no new requests, in-flight ones finish, the open kset is committed, the
   * running writeback and GC rounds finish. Dirty data stays in the cache for the next open.
   */
  async close(): Promise<void> {
    const engine = this.engine;
    const ctx = engine.ctx;
    if (ctx.state !== 'running') return;
    ctx.state = 'stopping';
    await this.idle();
    // Writes of the common path are not in the in-flight count (cacheWrite): wait for the group.
    await this.engine.writes.group.published();
    if (!ctx.readOnly && ctx.failure === undefined) {
      engine.log.sealNow();
      await engine.log.flush();
    }
    engine.writeback.stop();
    // A failing backing device may have writeback or GC sleeping in a back-off of up to 30 s.
    engine.writeback.wakeFromBackOff();
    engine.gc.wakeFromBackOff();
    await engine.writeback.idle();
    await engine.gc.idle();
    if (!ctx.readOnly && ctx.failure === undefined) {
      try {
        if (ctx.dev.layout.extendedKsets) {
          // key_tail records how far the log is durable, so a next open that finds the log's
          // last ksets damaged knows it (cache_replay.ts).
          await ctx.dev.writeKeyTail({ ...ctx.keyTail, durableSeq: ctx.logDurableSeq });
          await this.recordBackingAtStop();
        }
        // Both copies of every record updated last hold its value at rest (cache_dev.ts, sync).
        await ctx.dev.settleMirrors();
      } catch (error) {
        ctx.fail(error, 'recording the state of the log and the backing device at close');
      }
    }
    engine.log.stop();
    engine.writeback.stop();
    ctx.state = 'stopped';
    const shutdown = new PcacheError('ESHUTDOWN', 'the cache was closed');
    engine.writeback.abort(shutdown);
    engine.log.abort(shutdown);
    ctx.segments.wakeAll();
  }

  /**
   * Drops every clean cached copy, durably; dirty data stays. For a backing device that
   * something else wrote to while pcache served it (at a stop, pcache notices by itself): the
   * next reads of those ranges go to the backing device. Returns the bytes dropped. Copies
   * being filled while it runs may still land, so run it when no client reads the changed
   * ranges. Needs format version 2 (the drop is a marker in the log).
   */
  invalidate(): Promise<number> {
    return this.trackAlways(this.invalidateClean());
  }

  private async invalidateClean(): Promise<number> {
    const { ctx, log, writes } = this.engine;
    ctx.checkWritable();
    if (!ctx.dev.layout.extendedKsets) throw new PcacheError('ENOTSUP', 'invalidate needs a cache of format version 2 (drain it and format it again)');
    // The writes of this turn reach the index first, so the marker comes after their keys.
    await writes.group.published();
    const seq = log.appendInvalidate();
    const bytes = dropCleanKeys(ctx);
    await log.commit(seq);
    return bytes;
  }

  /**
   * Detaches the cache from its backing device and closes it: writes everything back, drops
   * every clean copy, and records the cache as detached, so the backing device can be used (and
   * changed) without pcache; a later start on this cache begins with nothing cached.
   */
  async detach(): Promise<void> {
    const ctx = this.engine.ctx;
    if (!ctx.dev.layout.extendedKsets) throw new PcacheError('ENOTSUP', 'detach needs a cache of format version 2 (drain it and format it again)');
    await this.drain();
    await this.invalidate();
    ctx.backingState = 'detached';
    await this.close();
  }

  /**
   * At a clean stop: the backing device's fingerprint goes into cache_info, for the next start to
   * compare (cache_backing.ts). A detached cache stays detached. A backing device that cannot be
   * read now (offline) leaves the state unknown, which only skips the comparison.
   */
  private async recordBackingAtStop(): Promise<void> {
    const ctx = this.engine.ctx;
    if (ctx.backingState === 'unknown') {
      try {
        ctx.backingFingerprint = await backingFingerprint(ctx.backing, ctx.dev.sb.cacheUuid);
        ctx.backingState = 'clean';
      } catch (error) {
        if (!isPcacheError(error)) throw error;
        return;
      }
    }
    await ctx.dev.writeCacheInfo(cacheInfoOf(ctx, ctx.gcPercent));
  }

  /** Drops all in-memory state at once and writes nothing more, as a crash would (tests). */
  abandon(): void {
    const engine = this.engine;
    const ctx = engine.ctx;
    ctx.state = 'stopped';
    engine.log.stop();
    engine.writeback.stop();
    const shutdown = new PcacheError('ESHUTDOWN', 'the cache was abandoned');
    engine.writeback.abort(shutdown);
    engine.log.abort(shutdown);
    ctx.segments.wakeAll();
  }

  /**
   * Commits everything, waits for background work, then runs the structural checker on the
   * cache device and compares what it rebuilds with this cache's own state. For quiesced
   * caches (tests, the crash simulator): concurrent requests would make the two differ.
   */
  async check(): Promise<string[]> {
    const { ctx, log, writeback, gc } = this.engine;
    const policy = this.policy;
    // Three actors move the tails: writeback, GC, and the drain a switch out of writeback starts
    // (cache_policy.ts), which kicks writeback again after each of its log flushes, so writeback
    // idle says nothing about the drain. GC may append (it re-logs data a second chance keeps)
    // and its commits kick writeback. So: commit, wait for all three, and go round again until
    // nothing is pending and none of them runs; comparing earlier finds the device a round
    // behind (a round persists dirty_tail before the running cache takes it). A failed cache's
    // drain may wait on writeback for good (nothing rejects its waiter before close): not awaited.
    for (let pass = 0; pass < checkSettlePassesMax; pass++) {
      if (!ctx.readOnly && ctx.failure === undefined) await log.flush();
      if (ctx.failure === undefined) await policy.drainIdle();
      await writeback.idle();
      await gc.idle();
      if (ctx.readOnly || ctx.failure !== undefined) break;
      if (log.pendingKsetCount === 0 && !policy.draining && !writeback.active && !gc.active) break;
    }
    return compareWithEngine(await checkCacheDevice(ctx.dev.device), this.engine);
  }

  /** Internal parts, for the structural checker and tests. */
  get internals(): CacheEngine {
    return this.engine;
  }

  private validate(offsetBytes: number, lengthBytes: number): void {
    const size = this.engine.ctx.dev.sb.backingSizeBytes;
    if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0 || offsetBytes % sectorSizeBytes !== 0) {
      throw new PcacheError('EINVAL', `offset ${offsetBytes} is not a multiple of ${sectorSizeBytes}`);
    }
    if (!Number.isSafeInteger(lengthBytes) || lengthBytes < 0 || lengthBytes % sectorSizeBytes !== 0) {
      throw new PcacheError('EINVAL', `length ${lengthBytes} is not a multiple of ${sectorSizeBytes}`);
    }
    if (offsetBytes + lengthBytes > size) throw new PcacheError('EINVAL', `range ${offsetBytes}+${lengthBytes} ends past the device end ${size}`);
  }

  private track(io: Promise<void> | undefined): Promise<void> | undefined {
    if (io === undefined) return undefined;
    return this.trackAlways(io);
  }

  private trackAlways<T>(io: Promise<T>): Promise<T> {
    this.inFlight++;
    // then() with two preallocated callbacks rather than finally(): one promise and no
    // closures per request (finally() wraps its callback in two more of each).
    return io.then(this.settledValue as (value: T) => T, this.settledError);
  }

  /** A write that left the common path (cache_write.ts): counted for close(), and noted for direct writes (cache_direct.ts). */
  private readonly trackWrite = (io: Promise<void>): Promise<void> => this.trackAlways(this.policy.direct.noteCachedWrite(io));

  private readonly settledValue = (value: unknown): unknown => {
    this.settled();
    return value;
  };

  private readonly settledError = (error: unknown): never => {
    this.settled();
    throw error;
  };

  private settled(): void {
    this.inFlight--;
    if (this.inFlight === 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const wake of waiters) wake();
    }
  }

  private idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => { this.idleWaiters.push(resolve); });
  }
}
