// Direct writes: writes (and zeroings) that go to the backing device past the cache — the
// writethrough, writearound and passthrough modes and sequential writes past the cutoff
// (cache_policy.ts decides which) — and what FLUSH then owes the backing device.
//
// A direct write W of range R:
//   1. waits for every direct write overlapping R in flight (overlapping direct writes never
//      race on the backing device), and registers itself: cached writes overlapping R wait
//      for it too (cache_policy.ts), so nothing newer than W reaches the backing device first;
//   2. lets the cached writes begun before it reach the index (those queued in the write group,
//      and those still waiting for space or log room: DirectWrites.noteCachedWrite), then looks at what the index
//      holds over R. Data not yet written back there (a key that is not CLEAN while the cache
//      holds dirty data) cannot be passed: writeback would later copy the older data over W.
//      Then W is a cached write after all (counted as a fallback);
//   3. puts a barrier over R (EMPTY keys of its own ticket, cache_read.ts): reads of R go to the
//      backing device meanwhile and cannot store what they read there before W landed;
//   4. when R held logged keys (clean copies, or written-back data), appends DROP keys for R
//      and commits them before touching the backing device: after a crash, a cached copy
//      older than what the backing device may already hold must not come back;
//   5. writes the backing device (FUA: and syncs it);
//   6. writethrough: syncs the backing device (a CLEAN key must never be durable before the
//      data it copies is durable on the backing device) and stores the data as CLEAN keys over
//      what is left of the barrier; otherwise removes the barrier.
// FLUSH syncs the backing device when a direct write completed since the last sync.
// Invariants: a direct write never overtakes older data for its range on the backing device;
// no read returns, and no restart brings back, a cached copy older than a completed direct write.

import { isPcacheError } from '../lib/errors.js';
import { MiB } from '../lib/units.js';
import { keyFlagClean, keyFlagEmpty, keyFlagsDrop } from '../ondisk/kset.js';
import type { CacheContext } from './cache_context.js';
import type { KsetLog } from './cache_kset.js';
import type { ReadPath } from './cache_read.js';
import { subtreeEnd } from './cache_tree.js';
import type { WritePath } from './cache_write.js';

/** Zeroes go to the backing device in writes of at most this many bytes. */
const zeroWriteBytesMax = MiB;
let zeroChunk: Uint8Array | undefined;

interface InFlight {
  readonly start: number;
  readonly end: number;
  readonly done: Promise<void>;
}

const noop = (): void => undefined;

/**
 * Backing device syncs, one at a time: a caller joins the sync that starts after the one in
 * flight, so every sync it waits for was issued after its call (covers every write completed
 * before it). Counts the direct writes not yet covered by a successful sync.
 */
class BackingSyncs {
  private readonly ctx: CacheContext;
  private current: Promise<void> | undefined;
  private queued: Promise<void> | undefined;
  private writesCompleted = 0;
  private writesSynced = 0;

  constructor(ctx: CacheContext) {
    this.ctx = ctx;
  }

  noteWrite(): void {
    this.writesCompleted++;
  }

  get owed(): boolean {
    return this.writesCompleted > this.writesSynced;
  }

  sync(): Promise<void> {
    if (this.current === undefined) return this.start();
    this.queued ??= this.current.then(noop, noop).then(() => {
      this.queued = undefined;
      return this.start();
    });
    return this.queued;
  }

  private start(): Promise<void> {
    const covered = this.writesCompleted;
    const io = this.ctx.backing.sync().then(() => {
      this.writesSynced = Math.max(this.writesSynced, covered);
    }, (error: unknown) => {
      if (isPcacheError(error)) this.ctx.stats.backingWriteErrors++;
      throw error;
    });
    this.current = io;
    const clear = (): void => {
      if (this.current === io) this.current = undefined;
    };
    io.then(clear, clear);
    return io;
  }
}

export type DirectOutcome = 'direct' | 'cached';

export class DirectWrites {
  private readonly ctx: CacheContext;
  private readonly log: KsetLog;
  private readonly writes: WritePath;
  private readonly reads: ReadPath;
  private readonly inFlight: InFlight[] = [];
  private readonly syncs: BackingSyncs;
  /**
   * Cached writes that did not reach the write group at once (waiting for space or log room, in
   * several pieces, FUA, zeroing): a direct write begun after them waits for them, so none can
   * publish over its range, and be written back, while its backing write is in flight.
   */
  private readonly cachedWrites = new Set<Promise<void>>();

  constructor(ctx: CacheContext, log: KsetLog, writes: WritePath, reads: ReadPath) {
    this.ctx = ctx;
    this.log = log;
    this.writes = writes;
    this.reads = reads;
    this.syncs = new BackingSyncs(ctx);
  }

  /** True while any direct write is in flight (cached writes must then check for overlaps). */
  get busy(): boolean {
    return this.inFlight.length > 0;
  }

  /** Notes a cached write that may publish later than the write group's next turn (see cachedWrites). */
  readonly noteCachedWrite = (io: Promise<void>): Promise<void> => {
    const settled = io.then(noop, noop);
    this.cachedWrites.add(settled);
    void settled.then(() => { this.cachedWrites.delete(settled); });
    return io;
  };

  /** Resolves once no direct write overlapping [start, end) is in flight. */
  async waitClear(start: number, end: number): Promise<void> {
    for (let other = this.overlapping(start, end); other !== undefined; other = this.overlapping(start, end)) await other.done;
  }

  /** The sync a FLUSH owes the backing device, or undefined when no direct write needs one. */
  flushBacking(): Promise<void> | undefined {
    return this.syncs.owed ? this.syncs.sync() : undefined;
  }

  /**
   * Writes `source` (zeroes when undefined) at `offsetBytes` to the backing device, past the
   * cache; `keepCopy` (writethrough) also stores it in the cache as CLEAN keys. Returns
   * 'cached' when the range held data not yet written back and the write went to the cache.
   */
  async write(source: Uint8Array | undefined, offsetBytes: number, lengthBytes: number, fua: boolean, keepCopy: boolean): Promise<DirectOutcome> {
    this.ctx.checkWritable();
    const end = offsetBytes + lengthBytes;
    await this.waitClear(offsetBytes, end);
    let release = noop;
    const entry: InFlight = { start: offsetBytes, end, done: new Promise<void>((resolve) => { release = resolve; }) };
    this.inFlight.push(entry);
    try {
      return await this.writeRegistered(source, offsetBytes, lengthBytes, fua, keepCopy);
    } finally {
      this.inFlight.splice(this.inFlight.indexOf(entry), 1);
      release();
    }
  }

  private async writeRegistered(source: Uint8Array | undefined, offsetBytes: number, lengthBytes: number, fua: boolean, keepCopy: boolean): Promise<DirectOutcome> {
    const ctx = this.ctx;
    if (this.cachedWrites.size > 0) await Promise.all([...this.cachedWrites]);
    await this.writes.group.published();
    ctx.checkWritable();
    const found = this.lookAt(offsetBytes, offsetBytes + lengthBytes);
    if ((found.unwritten && ctx.stats.dirtyBytes > 0) || (found.logged && !ctx.dev.layout.extendedKsets)) {
      ctx.stats.bypassFallbacks++;
      if (source === undefined) await this.writes.zero(offsetBytes, lengthBytes, fua);
      else await this.writes.write(source, offsetBytes, fua, this.noteCachedWrite);
      return 'cached';
    }
    const ticket = this.reads.placeBarrier(offsetBytes, lengthBytes);
    try {
      if (found.logged) await this.dropDurably(offsetBytes, offsetBytes + lengthBytes);
      await this.writeBacking(source, offsetBytes, lengthBytes);
      if (fua || keepCopy) await this.syncs.sync();
      if (keepCopy && source !== undefined) await this.reads.fillBarrier(ticket, offsetBytes, source);
    } finally {
      this.reads.dropBarrier(ticket, offsetBytes, lengthBytes);
    }
    return 'direct';
  }

  /** What the index holds over [start, end): any logged key; any key that may not be written back. */
  private lookAt(start: number, end: number): { logged: boolean; unwritten: boolean } {
    const index = this.ctx.index;
    let logged = false;
    let unwritten = false;
    for (let position = start; position < end; position = subtreeEnd(position)) {
      const subtree = index.subtree(position, false);
      if (subtree === undefined) continue;
      const stop = Math.min(end, subtreeEnd(position));
      for (let at = subtree.seek(position); at < subtree.count && subtree.start(at) < stop; at++) {
        const flags = subtree.flags(at);
        if ((flags & keyFlagEmpty) !== 0) continue;
        logged = true;
        if ((flags & keyFlagClean) === 0) unwritten = true;
      }
    }
    return { logged, unwritten };
  }

  /** DROP keys for [start, end), durable before the promise resolves. */
  private async dropDurably(start: number, end: number): Promise<void> {
    const ctx = this.ctx;
    let seq = 0;
    for (let position = start; position < end;) {
      if (this.log.full) await this.log.roomAvailable();
      ctx.checkWritable();
      const pieceEnd = Math.min(end, subtreeEnd(position));
      seq = this.log.append({ offsetBytes: position, lengthBytes: pieceEnd - position, flags: keyFlagsDrop, segment: 0, segmentOffsetBytes: 0, gen: 0, dataCrc: 0 });
      position = pieceEnd;
    }
    await this.log.commit(seq);
  }

  private async writeBacking(source: Uint8Array | undefined, offsetBytes: number, lengthBytes: number): Promise<void> {
    const ctx = this.ctx;
    try {
      if (source !== undefined) {
        await ctx.backing.write(source, offsetBytes);
      } else {
        zeroChunk ??= new Uint8Array(zeroWriteBytesMax);
        for (let done = 0; done < lengthBytes; done += zeroWriteBytesMax) {
          await ctx.backing.write(zeroChunk.subarray(0, Math.min(zeroWriteBytesMax, lengthBytes - done)), offsetBytes + done);
        }
      }
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      ctx.stats.backingWriteErrors++;
      if (error.code === 'ENODEV') ctx.backingOffline(error.message);
      throw error;
    }
    this.syncs.noteWrite();
  }

  private overlapping(start: number, end: number): InFlight | undefined {
    for (const other of this.inFlight) if (other.start < end && start < other.end) return other;
    return undefined;
  }
}
