// The kset log: appending keys, sealing ksets, and committing them to the cache device.
//
// Keys are appended to one open kset in the order their index updates happen, so the log's
// order is the index's order and replay rebuilds exactly the index that was acknowledged.
// A kset is sealed when it holds 128 keys, about a second after its first key, on FUA (the
// key's kset) and on flush (with EPOCH_END). One committer writes sealed ksets at key_head.
// Ksets sealed because they are full wait until ksetCommitBatch of them are sealed (or about a
// second): each commit costs two device syncs, and nobody waits for these ksets to be durable.
// Anything that waits (flush, FUA, a writer short of room or space) starts the committer at once.
//
// The ordering rule (docs/design.md §3): a kset must never become durable before the data its keys
// point at. pcache syncs the data first (two-phase commit): the committer loop is
//
//     sync            -- makes the data behind the next batch durable, and the previous batch
//     write batch        of ksets (so each sync is phase 2 of one batch and phase 1 of the next)
//
// and stops with a final sync once nothing is left to write. Concurrent flushes share syncs
// (group commit): a flush waits until the kset that ends its epoch is durable.
// When the log moves to a new segment, that segment's freshly bumped generation is written
// before the sync, so it is durable before the LAST kset that points at it can be.
// Seqs: every sealed kset takes the next seq, and is written in that order, so a kset's seq is
// also its number in the log; on format version 2 devices it is written into the kset with the
// seq up to which everything was durable then (durable_seq), which lets replay tell damage from
// the end of the log (kset.ts). A LAST kset carries the seq of the kset after it.
// Invariants: keyHead always has room for a LAST kset (a kset header) before the segment's
// end; keyHead.seq = writtenSeq + 1; durableSeq <= writtenSeq < seq of every sealed kset; at
// most sealedKsetsMax ksets wait.

import { assert } from '../lib/assert.js';
import { PcacheError } from '../lib/errors.js';
import { BackgroundTask } from '../lib/background_task.js';
import { Listeners } from '../lib/listeners.js';
import type { TimerHandle } from '../lib/timers.js';
import {
  decodeKset, encodeKey, encodeLastKset, keyBytes, keyFlagClean, keyFlagZero, ksetBytesMax, ksetExtendedHeaderBytes, ksetKeysMax, sealKset,
  type DecodedKset, type KeyRecord,
} from '../ondisk/kset.js';
import type { CacheContext } from './cache_context.js';
import { segmentKindLog } from './cache_segment.js';
import type { LogPos } from './cache_types.js';

export const ksetCloseDelayMs = 1000;
/** Full ksets are committed in batches of this many (or after ksetCloseDelayMs), unless someone waits. */
export const ksetCommitBatch = 8;
/** Sealed ksets waiting for the committer; writers wait when the queue is this long. */
export const sealedKsetsMax = 32;
/** A kset's bytes plus the zeroed header written after it. */
const ksetBufferBytes = ksetBytesMax + ksetExtendedHeaderBytes;

interface SealedKset {
  readonly bytes: Uint8Array;
  readonly keyCount: number;
  epochEnd: boolean;
  /** An INVALIDATE marker: replay drops every CLEAN key before it. */
  readonly invalidate: boolean;
  readonly seq: number;
}

interface DurableWaiter {
  readonly seq: number;
  readonly resolve: () => void;
  readonly reject: (error: unknown) => void;
}

export class KsetLog {
  private readonly ctx: CacheContext;
  private open = new Uint8Array(ksetBufferBytes);
  private openCount = 0;
  private openTimer: TimerHandle | undefined;
  /** Armed while full ksets wait for a batch (kickWhenBatched). */
  private commitTimer: TimerHandle | undefined;
  private sealed: SealedKset[] = [];
  /** The kset header of this device's format. */
  private readonly headerBytes: number;
  /** Seq the open kset will carry when sealed. */
  private nextSeq: number;
  private lastSealedSeq: number;
  private writtenSeq: number;
  private durableSeq: number;
  /** Keys were appended since the last EPOCH_END kset was sealed. */
  private epochOpen = false;
  /**
   * Seq of the last kset sealed (or marked) as ending a flush epoch. Unknown for the log
   * replayed at open, so it starts as if the last replayed kset ended one (the safe side for
   * writeback, which may skip superseded data under strict ordering only within the epoch
   * still open: cache_writeback_plan.ts).
   */
  lastEpochEndSeq: number;
  private readonly committer = new BackgroundTask(() => this.run());
  private durableWaiters: DurableWaiter[] = [];
  private roomWaiters: (() => void)[] = [];
  /** Where the next kset goes. */
  keyHead: LogPos;
  /** End of the last kset known durable; writeback never reads past it. */
  durableHead: LogPos;
  /** The log became durable up to the position given (writeback has new work). */
  readonly durable = new Listeners<[LogPos]>();

  constructor(ctx: CacheContext, keyHead: LogPos) {
    this.ctx = ctx;
    this.keyHead = keyHead;
    this.durableHead = keyHead;
    this.headerBytes = ctx.dev.ksetHeaderBytes;
    // Everything before key_head is durable: replay found it on the device.
    this.nextSeq = keyHead.seq;
    this.lastSealedSeq = keyHead.seq - 1;
    this.writtenSeq = keyHead.seq - 1;
    this.durableSeq = keyHead.seq - 1;
    this.lastEpochEndSeq = keyHead.seq - 1;
    ctx.logDurableSeq = this.durableSeq;
    ctx.failed.add((failure) => { this.abort(failure); });
    ctx.spaceNeeded.add(() => { this.sealNow(); });
  }

  /** True when writers should wait (roomAvailable) before appending more keys. */
  get full(): boolean {
    return this.sealed.length >= sealedKsetsMax;
  }

  get openKeyCount(): number {
    return this.openCount;
  }

  get pendingKsetCount(): number {
    return this.sealed.length + (this.openCount > 0 ? 1 : 0);
  }

  roomAvailable(): Promise<void> {
    if (!this.full) return Promise.resolve();
    return new Promise((resolve) => { this.roomWaiters.push(resolve); });
  }

  /** Appends a key to the open kset; returns the seq of the kset that carries it. */
  append(key: KeyRecord): number {
    assert(this.openCount < ksetKeysMax, 'open kset overflow');
    encodeKey(this.open, this.headerBytes + this.openCount * keyBytes, key);
    this.openCount++;
    this.epochOpen = true;
    const seq = this.nextSeq;
    if ((key.flags & keyFlagClean) === 0) {
      this.ctx.stats.dirtyBytes += key.lengthBytes;
      if ((key.flags & keyFlagZero) === 0) this.ctx.segments.noteDirty(key.segment, seq);
    }
    if (this.openCount === 1) {
      this.openTimer = this.ctx.timers.after(ksetCloseDelayMs, () => {
        this.openTimer = undefined;
        if (this.openCount > 0 && seq === this.nextSeq) {
          this.seal(false);
          this.kick();
        }
      });
    }
    if (this.openCount === ksetKeysMax) {
      this.seal(false);
      this.kickWhenBatched();
    }
    return seq;
  }

  /** Seals the open kset now (when it holds keys) and starts committing it. */
  sealNow(): void {
    if (this.openCount > 0) {
      this.seal(false);
      this.kick();
    }
  }

  /**
   * Ends a flush epoch: every key appended so far becomes durable before the promise
   * resolves, and the log records that an epoch ends here.
   */
  flush(): Promise<void> {
    if (this.ctx.failure !== undefined) return Promise.reject(this.ctx.failure);
    if (this.openCount > 0) {
      this.seal(true);
    } else if (this.epochOpen) {
      const last = this.sealed[this.sealed.length - 1];
      if (last !== undefined) {
        last.epochEnd = true;
        this.lastEpochEndSeq = last.seq;
        this.epochOpen = false;
      } else {
        this.seal(true); // An empty kset marks the end of an epoch whose keys are all written.
      }
    }
    return this.waitDurable(this.lastSealedSeq);
  }

  /**
   * Makes every key appended so far durable, without ending an epoch (writeback, before it
   * persists a dirty_tail that passed data superseded by newer keys).
   */
  commitAppended(): Promise<void> {
    if (this.ctx.failure !== undefined) return Promise.reject(this.ctx.failure);
    if (this.openCount > 0) {
      this.seal(false);
      this.kick();
    }
    return this.waitDurable(this.lastSealedSeq);
  }

  /**
   * Puts an INVALIDATE marker in the log after every key appended so far and returns its seq
   * (commit(seq) makes it durable). Replay drops every CLEAN key before the marker, so clean
   * copies dropped from the index now stay dropped after a restart. Format version 2 only.
   */
  appendInvalidate(): number {
    assert(this.ctx.dev.layout.extendedKsets, 'INVALIDATE ksets need format version 2');
    if (this.openCount > 0) this.seal(false);
    this.seal(false, true);
    this.kick();
    return this.lastSealedSeq;
  }

  /** Makes the kset `seq` (returned by append) durable: the FUA path. */
  commit(seq: number): Promise<void> {
    if (this.ctx.failure !== undefined) return Promise.reject(this.ctx.failure);
    if (seq === this.nextSeq && this.openCount > 0) this.seal(false);
    return this.waitDurable(seq);
  }

  /** Stops the kset timers; what is sealed stays queued. */
  stop(): void {
    this.openTimer?.cancel();
    this.openTimer = undefined;
    this.commitTimer?.cancel();
    this.commitTimer = undefined;
  }

  /** Rejects everyone waiting after the cache failed or shut down. */
  abort(error: PcacheError): void {
    this.stop();
    const waiters = this.durableWaiters;
    this.durableWaiters = [];
    for (const waiter of waiters) waiter.reject(error);
    this.wakeRoomWaiters();
  }

  private waitDurable(seq: number): Promise<void> {
    if (this.durableSeq >= seq) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.durableWaiters.push({ seq, resolve, reject });
      this.kick();
    });
  }

  private seal(epochEnd: boolean, invalidate = false): void {
    assert(this.openCount > 0 || epochEnd || invalidate, 'sealing an empty kset that ends no epoch');
    assert(!invalidate || this.openCount === 0, 'an INVALIDATE kset holds no keys');
    this.sealed.push({ bytes: this.open, keyCount: this.openCount, epochEnd, invalidate, seq: this.nextSeq });
    this.lastSealedSeq = this.nextSeq;
    this.nextSeq++;
    this.open = new Uint8Array(ksetBufferBytes);
    this.openCount = 0;
    if (epochEnd) {
      this.epochOpen = false;
      this.lastEpochEndSeq = this.lastSealedSeq;
    }
    this.openTimer?.cancel();
    this.openTimer = undefined;
  }

  private kick(): void {
    this.committer.kick();
  }

  /**
   * Starts the committer once a batch of ksets is sealed; until then a timer makes sure that
   * what is sealed is committed within about a second even if no more keys come.
   */
  private kickWhenBatched(): void {
    if (this.commitDue()) {
      this.kick();
      return;
    }
    this.commitTimer ??= this.ctx.timers.after(ksetCloseDelayMs, () => {
      this.commitTimer = undefined;
      this.kick();
    });
  }

  /** Whether the committer, having written what it was started for, should write more now. */
  private commitDue(): boolean {
    return this.sealed.length >= ksetCommitBatch || this.durableWaiters.length > 0 || this.roomWaiters.length > 0;
  }

  private async run(): Promise<void> {
    try {
      // A run writes what is sealed when it starts; ksets sealed meanwhile join only when
      // another batch is due (commitDue), otherwise they wait for their batch or timer.
      for (let first = true; ; first = false) {
        if (this.ctx.failure !== undefined) throw this.ctx.failure;
        let batch: SealedKset[] = [];
        let nextSegment: number | undefined;
        if (this.sealed.length > 0 && (first || this.commitDue())) {
          this.commitTimer?.cancel();
          this.commitTimer = undefined;
          ({ batch, nextSegment } = await this.planBatch());
        } else if (this.writtenSeq === this.durableSeq) {
          if (this.sealed.length > 0) this.kickWhenBatched();
          break;
        }
        const coversSeq = this.writtenSeq;
        const coversHead = this.keyHead;
        await this.ctx.dev.sync();
        this.becameDurable(coversSeq, coversHead);
        if (batch.length > 0) await this.writeBatch(batch, nextSegment);
      }
    } catch (error) {
      this.ctx.fail(error, 'committing ksets to the cache device');
    }
  }

  /**
   * Takes the sealed ksets that fit at key_head, or — when the next one does not fit — a new
   * log segment and the ksets that fit at its start. Waits for a free segment if needed.
   */
  private async planBatch(): Promise<{ batch: SealedKset[]; nextSegment: number | undefined }> {
    const dataSizeBytes = this.ctx.dev.dataSizeBytes;
    const header = this.headerBytes;
    const fits = (offsetBytes: number, kset: SealedKset): boolean =>
      offsetBytes + header + kset.keyCount * keyBytes + header <= dataSizeBytes;
    let nextSegment: number | undefined;
    let offsetBytes = this.keyHead.offsetBytes;
    const first = this.sealed[0];
    assert(first !== undefined, 'planning an empty batch');
    if (!fits(offsetBytes, first)) {
      nextSegment = await this.takeLogSegment();
      offsetBytes = 0;
    }
    let count = 0;
    for (const kset of this.sealed) {
      if (!fits(offsetBytes, kset)) break;
      offsetBytes += header + kset.keyCount * keyBytes;
      count++;
    }
    assert(count > 0, 'a kset does not fit in an empty segment');
    const batch = this.sealed.splice(0, count);
    this.wakeRoomWaiters();
    return { batch, nextSegment };
  }

  private async takeLogSegment(): Promise<number> {
    const ctx = this.ctx;
    for (;;) {
      if (ctx.failure !== undefined) throw ctx.failure;
      const segment = ctx.segments.allocate(segmentKindLog);
      if (segment !== undefined) {
        ctx.checkGcThreshold();
        await ctx.dev.writeGen(segment, ctx.segments.gen[segment] ?? 0);
        return segment;
      }
      // Out of space: make what is written durable so writeback and GC can free segments.
      if (this.writtenSeq > this.durableSeq) {
        const coversSeq = this.writtenSeq;
        const coversHead = this.keyHead;
        await ctx.dev.sync();
        this.becameDurable(coversSeq, coversHead);
      }
      const freed = ctx.segments.nextFree();
      // Counted as a space waiter, so writeback stays urgent until the log has its segment.
      ctx.spaceWaiters++;
      try {
        ctx.needSpace();
        await freed;
      } finally {
        ctx.spaceWaiters--;
      }
    }
  }

  private async writeBatch(batch: SealedKset[], nextSegment: number | undefined): Promise<void> {
    const ctx = this.ctx;
    const dev = ctx.dev;
    const extended = dev.layout.extendedKsets;
    if (nextSegment !== undefined) {
      const head = this.keyHead;
      const seqs = extended ? { seq: head.seq, durableSeq: this.durableSeq } : undefined;
      const last = encodeLastKset(nextSegment, ctx.segments.gen[head.segment] ?? 0, dev.crcSeed, seqs);
      await dev.writeData(last, head.segment, head.offsetBytes);
      this.keyHead = { segment: nextSegment, offsetBytes: 0, lsn: head.lsn + last.length, seq: head.seq };
    }
    for (const kset of batch) {
      const head = this.keyHead;
      assert(kset.seq === head.seq, 'ksets are written in seq order');
      const size = sealKset(kset.bytes, {
        keyCount: kset.keyCount,
        epochEnd: kset.epochEnd,
        invalidate: kset.invalidate,
        logGen: ctx.segments.gen[head.segment] ?? 0,
        crcSeed: dev.crcSeed,
        seqs: extended ? { seq: kset.seq, durableSeq: this.durableSeq } : undefined,
      });
      kset.bytes.fill(0, size, size + this.headerBytes);
      await dev.writeData(kset.bytes.subarray(0, size + this.headerBytes), head.segment, head.offsetBytes);
      this.keyHead = { segment: head.segment, offsetBytes: head.offsetBytes + size, lsn: head.lsn + size, seq: head.seq + 1 };
      this.writtenSeq = kset.seq;
      ctx.stats.ksetsWritten++;
    }
  }

  private becameDurable(seq: number, head: LogPos): void {
    if (seq <= this.durableSeq && head.lsn <= this.durableHead.lsn) return;
    this.durableSeq = seq;
    this.durableHead = head;
    this.ctx.logDurableSeq = seq;
    const waiting = this.durableWaiters;
    this.durableWaiters = [];
    for (const waiter of waiting) {
      if (waiter.seq <= seq) waiter.resolve();
      else this.durableWaiters.push(waiter);
    }
    this.durable.call(head);
  }

  private wakeRoomWaiters(): void {
    const waiters = this.roomWaiters;
    this.roomWaiters = [];
    for (const wake of waiters) wake();
  }
}

/**
 * Reads and decodes the kset at `pos` (replay, writeback, GC and the checker all read the log
 * through here). `scratch` must hold ksetBytesMax bytes.
 */
export async function readKsetAt(ctx: Pick<CacheContext, 'dev' | 'segments'>, pos: LogPos, scratch: Uint8Array): Promise<DecodedKset> {
  const dev = ctx.dev;
  const roomBytes = dev.dataSizeBytes - pos.offsetBytes;
  const bytes = scratch.subarray(0, Math.min(roomBytes, ksetBytesMax));
  const io = dev.readData(bytes, pos.segment, pos.offsetBytes);
  if (io !== undefined) await io;
  return decodeKset(bytes, {
    extended: dev.layout.extendedKsets,
    crcSeed: dev.crcSeed,
    logGen: ctx.segments.gen[pos.segment] ?? 0,
    roomBytes,
    segmentCount: dev.segmentCount,
    dataSizeBytes: dev.dataSizeBytes,
    backingSizeBytes: dev.sb.backingSizeBytes,
  });
}

/** The position right after a kset that decoded successfully at `pos`. */
export function positionAfter(pos: LogPos, kset: DecodedKset & { ok: true }): LogPos {
  if (kset.kind === 'last') return { segment: kset.next, offsetBytes: 0, lsn: pos.lsn + kset.sizeBytes, seq: pos.seq };
  return { segment: pos.segment, offsetBytes: pos.offsetBytes + kset.sizeBytes, lsn: pos.lsn + kset.sizeBytes, seq: pos.seq + 1 };
}
