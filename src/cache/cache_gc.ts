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
// index, so it runs once a sixteenth of the cache's segments has been freed since the last
// one, not after every round: sweeping after every round (a round frees about two segments
// under 4 KiB writes) cost 4% of the event loop of a write workload with GC running
// (docs/performance.md). Stale entries are harmless meanwhile (every reader checks the
// generation), and at most that sixteenth of the cache's data has them.

import { isPcacheError, PcacheError } from '../lib/errors.js';
import { keyFlagZero, ksetBytesMax } from '../ondisk/kset.js';
import { CacheWorker, type RoundOutcome } from './cache_worker.js';
import { positionAfter, readKsetAt } from './cache_kset.js';
import { isDataKey } from './cache_tree.js';

export const gcKsetsPerRoundMax = 64;
export const gcBackoffMs = 1000;
/** A sweep of stale index entries runs once this share of the cache's segments has been freed. */
export const gcSweepSegmentsDivisor = 16;

export class Gc extends CacheWorker {
  private readonly scratch = new Uint8Array(ksetBytesMax);
  /** Segments freed since the last sweep of stale index entries. */
  private freedSinceSweep = 0;
  lastError: string | undefined;

  /** GC has work: reclaimable ksets and enough segments in use. */
  get due(): boolean {
    const core = this.core;
    return core.keyTail.lsn < core.dirtyTail.lsn && core.segments.usedCount >= core.gcThresholdSegments;
  }

  /** One round, if one is due, and a sweep of stale index entries; for tests and the simulator. */
  async step(): Promise<boolean> {
    await this.idle();
    if (this.core.stopped()) return false;
    const outcome = this.due ? await this.rounds.run(() => this.round()) : 'nothing';
    this.maybeSweep();
    return outcome === 'advanced';
  }

  protected async loop(): Promise<void> {
    const core = this.core;
    while (core.state === 'running' && core.failure === undefined) {
      if (this.due) {
        const outcome = await this.rounds.run(() => this.round());
        if (outcome === 'failed') {
          if (await this.backOff(gcBackoffMs)) continue;
          return;
        }
      }
      this.maybeSweep();
      if (!this.due) {
        this.urgent = false;
        break;
      }
      await core.timers.yieldToOthers();
    }
  }

  private async round(): Promise<RoundOutcome> {
    const core = this.core;
    try {
      if (core.durableDirtyTail.lsn < core.dirtyTail.lsn) {
        const dirtyTail = core.dirtyTail;
        await core.dev.sync();
        core.durableDirtyTail = dirtyTail;
      }
      const limit = core.durableDirtyTail;
      let pos = core.keyTail;
      const puts: number[] = [];
      const leftLogSegments: number[] = [];
      let ksets = 0;
      while (ksets < gcKsetsPerRoundMax && pos.lsn < limit.lsn) {
        const kset = await readKsetAt(core, pos, this.scratch);
        if (!kset.ok) throw new PcacheError('CORRUPT', `gc: the kset at segment ${pos.segment} offset ${pos.offsetBytes} is invalid: ${kset.problem}`);
        if (kset.kind === 'last') {
          leftLogSegments.push(pos.segment);
        } else {
          for (const key of kset.keys) {
            // Only keys that took a reference give one back: replay skips stale keys.
            if ((key.flags & keyFlagZero) === 0 && key.gen === core.segments.gen[key.segment]) puts.push(key.segment);
          }
        }
        pos = positionAfter(pos, kset);
        ksets++;
      }
      if (ksets === 0 || core.stopped()) return 'nothing';
      await core.dev.writeKeyTail({ segment: pos.segment, offsetBytes: pos.offsetBytes });
      await core.dev.sync();
      if (core.stopped()) return 'nothing';
      core.keyTail = pos;
      let freed = 0;
      for (const segment of puts) if (core.segments.put(segment)) freed++;
      for (const segment of leftLogSegments) {
        core.segments.free(segment);
        freed++;
      }
      core.stats.gcKsets += ksets;
      core.stats.gcSegmentsFreed += freed;
      this.freedSinceSweep += freed;
      core.assertTailOrder();
      this.lastError = undefined;
      return 'advanced';
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      core.stats.gcErrors++;
      this.lastError = error.message;
      return 'failed';
    }
  }

  /** Drops index entries that point into segments freed since they were written, once enough were freed. */
  private maybeSweep(): void {
    const core = this.core;
    if (this.freedSinceSweep === 0 || this.freedSinceSweep < Math.floor(core.segments.count / gcSweepSegmentsDivisor)) return;
    this.freedSinceSweep = 0;
    core.stats.staleKeysRemoved += core.index.sweep((subtree, index) =>
      isDataKey(subtree.flags(index)) && core.segments.genLow32(subtree.segment(index)) !== subtree.genLow32(index));
  }
}
