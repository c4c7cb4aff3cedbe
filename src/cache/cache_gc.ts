// Garbage collection: reclaiming the log and the data behind it, oldest first (FIFO).
//
// GC runs when the segments in use reach gc_percent of the cache and key_tail is behind
// dirty_tail (only written-back ksets may be reclaimed). A round first makes sure the
// dirty_tail it relies on is durable (writeback writes dirty_tail without a cache sync; were
// GC's key_tail to reach the disk before it, recovery would find key_tail past dirty_tail).
// It walks ksets from key_tail, never past that durable dirty_tail, noting for every key that
// still holds a segment reference which
// segment it is, and which log segments key_tail leaves behind. It persists the advanced
// key_tail and syncs, and only then drops those references and frees those log segments:
// a segment is never reused while a key that recovery could replay still points into it.
// Freed segments get a new generation, which makes every index entry into them stale; the
// index drops stale entries lazily (readers) and in sweeps (here). A sweep walks the whole
// index, so it runs once a quarter of the cache's segments has been freed since the last
// one, not after every round: sweeping after every round (a round frees about two segments
// under 4 KiB writes) cost 4% of the event loop of a write workload with GC running, and
// after every sixteenth still 3% (docs/performance.md). Stale entries are harmless meanwhile
// (every reader checks the generation), and at most that quarter of the cache's data has them. A sweep goes a subtree
// at a time under the background slice (lib/timers.ts): on a large cache the whole index is
// millions of keys, tens of milliseconds that every volume's clients would otherwise wait out.
// A read cache's round (mostly clean, no writer waiting for space) stops once it has freed
// what fills need (readRoundTargetBytes): segments freed beyond that would stand empty.

import { isPcacheError, PcacheError } from '../lib/errors.js';
import { keyFlagZero, ksetBytesMax } from '../ondisk/kset.js';
import { gcCleanReserveSegments, type CacheContext } from './cache_context.js';
import { CacheWorker, type RoundOutcome } from './cache_worker.js';
import { positionAfter, readKsetAt } from './cache_kset.js';
import type { SecondChance } from './cache_second_chance.js';
import { isDataKey, type Subtree } from './cache_tree.js';

export const gcKsetsPerRoundMax = 64;
export const gcBackoffMs = 1000;
/**
 * A read cache's GC round aims to leave this share (1/n) of its segments free beyond
 * gcCleanReserveSegments, at least one (readRoundTargetBytes).
 */
export const gcReadRoundDivisor = 64;
/** A sweep of stale index entries runs once this share of the cache's segments has been freed. */
export const gcSweepSegmentsDivisor = 4;

export class Gc extends CacheWorker {
  private readonly scratch = new Uint8Array(ksetBytesMax);
  /** Segments freed since the last sweep of stale index entries. */
  private freedSinceSweep = 0;
  /** The sweep in progress: the subtrees it set out to visit, and how many it has. */
  private sweepIds: number[] | undefined;
  private sweepAt = 0;
  lastError: string | undefined;

  private readonly secondChance: SecondChance;
  /** Per segment, the references a round in progress will drop (zero outside a round). */
  private readonly pendingPuts: Uint32Array;

  constructor(ctx: CacheContext, secondChance: SecondChance) {
    super(ctx);
    this.secondChance = secondChance;
    this.pendingPuts = new Uint32Array(ctx.segments.count);
    ctx.spaceNeeded.add(() => { this.kick(true); });
    ctx.gcThresholdReached.add(() => { this.kick(false); });
    ctx.dirtyTailAdvanced.add(() => { this.kick(false); });
  }

  /** GC has work: reclaimable ksets and enough segments in use. */
  get due(): boolean {
    const ctx = this.ctx;
    return ctx.keyTail.lsn < ctx.dirtyTail.lsn && ctx.segments.usedCount >= ctx.gcThresholdSegments;
  }

  /** One round, if one is due, and a sweep of stale index entries; for tests and the simulator. */
  async step(): Promise<boolean> {
    await this.idle();
    if (this.ctx.stopped()) return false;
    const outcome = this.due ? await this.rounds.run(() => this.round()) : 'nothing';
    const sweeping = this.maybeSweep();
    if (sweeping !== undefined) await sweeping;
    return outcome === 'advanced';
  }

  protected async loop(): Promise<void> {
    const ctx = this.ctx;
    while (ctx.state === 'running' && ctx.failure === undefined) {
      if (this.due) {
        const outcome = await this.rounds.run(() => this.round());
        if (outcome === 'failed') {
          if (await this.backOff(gcBackoffMs)) continue;
          return;
        }
      }
      const sweeping = this.maybeSweep();
      if (sweeping !== undefined) await sweeping;
      if (!this.due) {
        this.urgent = false;
        break;
      }
      await ctx.timers.yieldToOthers();
    }
  }

  private async round(): Promise<RoundOutcome> {
    const ctx = this.ctx;
    try {
      if (ctx.durableDirtyTail.lsn < ctx.dirtyTail.lsn) {
        const dirtyTail = ctx.dirtyTail;
        await ctx.dev.sync();
        ctx.durableDirtyTail = dirtyTail;
      }
      const limit = ctx.durableDirtyTail;
      this.secondChance.forget();
      let pos = ctx.keyTail;
      const puts: number[] = [];
      const leftLogSegments: number[] = [];
      let ksets = 0;
      // A read cache's round stops once it frees what fills need (see readRoundTargetBytes).
      const targetBytes = this.readRoundTargetBytes();
      const pending = this.pendingPuts;
      const touched: number[] = [];
      let emptied = 0;
      try {
        while (ksets < gcKsetsPerRoundMax && pos.lsn < limit.lsn) {
          const kset = await readKsetAt(ctx, pos, this.scratch);
          if (!kset.ok) throw new PcacheError('CORRUPT', `gc: the kset at segment ${pos.segment} offset ${pos.offsetBytes} is invalid: ${kset.problem}`);
          if (kset.kind === 'last') {
            leftLogSegments.push(pos.segment);
          } else {
            for (const key of kset.keys) {
              // Only keys that took a reference give one back: replay skips stale keys.
              if ((key.flags & keyFlagZero) === 0 && key.gen === ctx.segments.gen[key.segment]) {
                this.secondChance.note(key, puts.length);
                puts.push(key.segment);
                if (targetBytes !== undefined) {
                  const count = (pending[key.segment] ?? 0) + 1;
                  if (count === 1) touched.push(key.segment);
                  pending[key.segment] = count;
                  if (count === ctx.segments.refs[key.segment]) emptied++;
                }
              }
            }
          }
          pos = positionAfter(pos, kset);
          ksets++;
          if (targetBytes !== undefined && (emptied + leftLogSegments.length) * ctx.dev.dataSizeBytes - this.secondChance.copyBoundBytes() >= targetBytes) break;
          const paced = ctx.timers.pace();
          if (paced !== undefined) await paced;
        }
      } finally {
        for (const segment of touched) pending[segment] = 0; // zero outside a round, however it ends
      }
      if (ksets === 0 || ctx.stopped()) return 'nothing';
      await ctx.dev.writeKeyTail({ segment: pos.segment, offsetBytes: pos.offsetBytes, seq: pos.seq, durableSeq: ctx.logDurableSeq });
      await ctx.dev.sync();
      if (ctx.stopped()) return 'nothing';
      ctx.keyTail = pos;
      let freed = 0;
      for (const segment of leftLogSegments) {
        ctx.segments.free(segment);
        freed++;
      }
      // Data read since it was stored gets a second chance: each such key is copied to the data
      // head just before its reference goes, so the segments freed by the puts before it make
      // room for the copy (cache_second_chance.ts). Clean copies: a crash loses at most them.
      await this.secondChance.relogAndPut(puts, (segment) => { if (ctx.segments.put(segment)) freed++; });
      ctx.stats.gcKsets += ksets;
      ctx.stats.gcSegmentsFreed += freed;
      this.freedSinceSweep += freed;
      ctx.assertKeyTailBehindDirtyTail();
      this.lastError = undefined;
      return 'advanced';
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      ctx.stats.gcErrors++;
      this.lastError = error.message;
      return 'failed';
    }
  }

  /**
   * The bytes a read cache's GC round frees, net of the copies its second chance makes, before it
   * stops; undefined for a full round. A read cache (mostly clean, no writer waiting for space)
   * runs GC only to make room for fills, and every segment freed beyond that is capacity left
   * idle until fills take it: a full round of 64 ksets of 4 KiB keys passes 32 MiB. So such a
   * round stops once the segments its passed keys empty (and the log segments it leaves),
   * less what it may copy, bring the free segments to gcCleanReserveSegments and a 64th of the
   * cache (gcReadRoundDivisor; at least one segment) beyond. Not less: fills that find no free
   * segment are not stored, and while more than admitAllFreeSegments are free every miss is
   * (cache_admission.ts), which a hot set read alongside scans needs after GC evicted part of it.
   */
  private readRoundTargetBytes(): number | undefined {
    const ctx = this.ctx;
    if (!ctx.mostlyClean || ctx.spaceWaiters > 0) return undefined;
    const slackSegments = Math.max(1, Math.ceil(ctx.segments.count / gcReadRoundDivisor));
    const neededSegments = Math.max(1, gcCleanReserveSegments + slackSegments - ctx.segments.freeCount);
    return neededSegments * ctx.dev.dataSizeBytes;
  }

  /** Drops index entries that point into segments freed since they were written, once enough were freed. */
  private maybeSweep(): Promise<void> | undefined {
    const ctx = this.ctx;
    if (this.sweepIds === undefined) {
      if (this.freedSinceSweep === 0 || this.freedSinceSweep < Math.floor(ctx.segments.count / gcSweepSegmentsDivisor)) return undefined;
      this.freedSinceSweep = 0;
      this.sweepIds = ctx.index.subtreeIds();
      this.sweepAt = 0;
    }
    return this.continueSweep();
  }

  /**
   * Sweeps subtrees until the sweep is done (undefined) or the background slice is spent (a
   * promise that finishes it). Subtrees are looked up by id, so the index may change between
   * pieces; a second caller meanwhile just takes over the cursor.
   */
  private continueSweep(): Promise<void> | undefined {
    const ctx = this.ctx;
    const ids = this.sweepIds;
    if (ids === undefined) return undefined;
    while (this.sweepAt < ids.length) {
      const id = ids[this.sweepAt++] as number;
      ctx.stats.staleKeysRemoved += ctx.index.sweepSubtree(id, this.isStale);
      const paced = ctx.timers.pace();
      if (paced !== undefined) return paced.then(() => this.continueSweep());
    }
    this.sweepIds = undefined;
    return undefined;
  }

  /** An index entry into a segment freed (and given a new generation) since it was written. */
  private readonly isStale = (subtree: Subtree, index: number): boolean =>
    isDataKey(subtree.flags(index)) && this.ctx.segments.genLow32(subtree.segment(index)) !== subtree.genLow32(index);
}
