// The write path: client writes, write-zeroes and trims (dm-pcache's cache_write and
// cache_data_alloc loop), and the write group that batches the writes of one event-loop turn.
//
// A write is cut at 4 MiB subtree boundaries and at segment ends (and at keyMaxBytes with data
// CRC); each piece takes space at the data head and its data is copied into the cache device;
// then its key enters the index (newer wins) and the open kset, in one synchronous step, so the
// log's order is the index's order. FUA waits for the key's kset to be durable. Nothing touches
// the backing device. Invariants:
// - a key is never visible (index or log) before its data is in the cache device;
// - a writer never holds unpublished space while it waits for more (no deadlock on space);
// - groups publish in the order they formed, and within a group keys publish in queue order.

import { assert } from '../lib/assert.js';
import { crc32c } from '../lib/crc32c.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { SerialSection } from '../lib/background_task.js';
import { keyFlagZero, type KeyRecord } from '../ondisk/kset.js';
import type { CacheContext } from './cache_context.js';
import type { DataHead } from './cache_data_head.js';
import type { KsetLog } from './cache_kset.js';
import { keyFromRecord, newIndexKey, subtreeEnd } from './cache_tree.js';
import type { Space } from './cache_types.js';

/** A piece of a write: space taken at the data head, its data, and the key to publish. */
interface GroupedPiece {
  readonly record: KeyRecord;
  readonly data: Uint8Array;
  readonly write: GroupedWrite;
}

/** A write request whose pieces wait in a write group. */
interface GroupedWrite {
  failure: unknown;
  /** The kset seq carrying its last published key (for FUA). */
  seq: number;
  resolve(): void;
  reject(error: unknown): void;
}

/**
 * The write group: the writes of one event-loop turn reach the cache device together.
 *
 * A write takes its space at the data head at once (so the writes of a turn sit back to back in
 * the segment) and queues its data here. One microtask later — after every request of the
 * socket chunk being served has been dispatched — each contiguous run of queued data goes to the
 * cache device in one call (pwritev), and then, in queue order, every key whose data was written
 * enters the index and the open kset, and the writes complete. A key is never visible before its
 * data is in the device, so reads need no knowledge of the group; a run that fails fails only
 * its own writes, whose keys were never published. Groups publish in the order they formed.
 */
export class WriteGroup {
  private readonly ctx: CacheContext;
  private readonly log: KsetLog;
  private readonly head: DataHead;
  private pieces: GroupedPiece[] = [];
  private writes: GroupedWrite[] = [];
  private scheduled = false;
  private readonly publishing = new SerialSection();
  private readonly scratchKey = newIndexKey();

  constructor(ctx: CacheContext, log: KsetLog, head: DataHead) {
    this.ctx = ctx;
    this.log = log;
    this.head = head;
  }

  /** Resolves once every write queued so far has been published (or failed). */
  published(): Promise<void> {
    if (!this.scheduled) return this.publishing.run(() => Promise.resolve());
    return new Promise<void>((resolve) => { queueMicrotask(() => { void this.publishing.run(() => Promise.resolve()).then(resolve); }); });
  }

  /**
   * Queues a write of one piece that needs no kset seq (not FUA): the common case, with one
   * promise and two small objects, where add() needs a closure and a copy of each piece.
   */
  addOne(record: KeyRecord, data: Uint8Array): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const write: GroupedWrite = { failure: undefined, seq: 0, resolve, reject };
      this.writes.push(write);
      this.pieces.push({ record, data, write });
      this.schedule();
    });
  }

  /** Queues a write's pieces; resolves with the seq of the kset holding its last key. */
  add(pieces: readonly { record: KeyRecord; data: Uint8Array }[]): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      const write: GroupedWrite = { failure: undefined, seq: 0, resolve: () => { resolve(write.seq); }, reject };
      this.writes.push(write);
      for (const piece of pieces) this.pieces.push({ ...piece, write });
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    queueMicrotask(this.runBound);
  }

  private readonly runBound = (): void => { void this.publishing.run(this.flushBound); };
  private readonly flushBound = (): Promise<void> => this.flush();

  private async flush(): Promise<void> {
    const ctx = this.ctx;
    const pieces = this.pieces;
    const writes = this.writes;
    this.pieces = [];
    this.writes = [];
    this.scheduled = false;
    // For writeback's idle rule: a group is the writes of one turn, so one clock read serves all.
    ctx.lastWriteMs = ctx.timers.now();
    const failed = new Set<GroupedPiece>();
    const fail = (from: number, to: number, error: unknown): void => {
      if (!isPcacheError(error)) throw error;
      ctx.stats.cacheIoErrors++;
      for (let index = from; index < to; index++) {
        const piece = pieces[index];
        if (piece === undefined) continue;
        failed.add(piece);
        piece.write.failure ??= error;
      }
    };
    for (let from = 0; from < pieces.length;) {
      const first = pieces[from];
      assert(first !== undefined, 'write group out of range');
      let to = from + 1;
      let end = first.record.segmentOffsetBytes + first.record.lengthBytes;
      for (let next = pieces[to]; next !== undefined && next.record.segment === first.record.segment && next.record.segmentOffsetBytes === end; next = pieces[to]) {
        end += next.record.lengthBytes;
        to++;
      }
      try {
        const io = ctx.dev.writeDataRun(pieces.slice(from, to).map((piece) => piece.data), first.record.segment, first.record.segmentOffsetBytes);
        if (io !== undefined) await io;
      } catch (error) {
        fail(from, to, error);
      }
      from = to;
    }
    if (this.head.genWrite !== undefined) await this.head.genWrite;
    for (const piece of pieces) {
      const refused = failed.has(piece) ? undefined : ctx.failure ?? (ctx.stopped() ? new PcacheError('ESHUTDOWN', 'the cache stopped') : undefined);
      if (failed.has(piece) || refused !== undefined) {
        ctx.segments.put(piece.record.segment);
        piece.write.failure ??= refused;
        continue;
      }
      // A stale neighbour's row is taken rather than a row opened (cache_index.ts).
      ctx.index.insertTakingStale(keyFromRecord(this.scratchKey, piece.record));
      piece.write.seq = this.log.append(piece.record);
    }
    for (const write of writes) {
      if (write.failure === undefined) write.resolve();
      else write.reject(write.failure);
    }
  }
}

/** Client writes, write-zeroes and trims. */
export class WritePath {
  private readonly ctx: CacheContext;
  private readonly log: KsetLog;
  private readonly head: DataHead;
  readonly group: WriteGroup;

  constructor(ctx: CacheContext, log: KsetLog, head: DataHead) {
    this.ctx = ctx;
    this.log = log;
    this.head = head;
    this.group = new WriteGroup(ctx, log, head);
  }

  /**
   * A client write. The common case — not FUA, the backing device online, room in the log, and
   * the whole write fitting one key and the current data segment — is served without an async
   * function: one allocation at the head, one entry in the write group, one promise. Everything
   * else (splits, waits for space, FUA) takes writeInParts, which handles the general case and
   * is counted by `track` (the Cache's in-flight count, which close() waits for).
   */
  write(source: Uint8Array, offsetBytes: number, fua: boolean, track: (io: Promise<void>) => Promise<void>): Promise<void> {
    const ctx = this.ctx;
    try {
      ctx.checkWritable();
    } catch (error) {
      return Promise.reject(error instanceof Error ? error : new Error(String(error)));
    }
    ctx.stats.writeRequests++;
    ctx.stats.writeBytes += source.length;
    // No clock read here: the write group notes the time of the last write once per group.
    if (fua || ctx.backingOfflineSinceMs !== undefined || this.log.full) return track(this.writeInParts(source, offsetBytes, fua, ctx.timers.now(), undefined));
    const wanted = Math.min(source.length, subtreeEnd(offsetBytes) - offsetBytes, ctx.keyMaxBytes);
    const space = this.head.alloc(wanted);
    if (space === undefined || space.lengthBytes !== source.length) return track(this.writeInParts(source, offsetBytes, fua, ctx.timers.now(), space));
    // Not tracked: close() waits for the write group itself (published), which saves a promise per write.
    return this.group.addOne(this.record(offsetBytes, space, source), source);
  }

  /** The general write: any number of pieces, waiting for room and space, FUA. `first` is space already allocated for the first piece. */
  private async writeInParts(source: Uint8Array, offsetBytes: number, fua: boolean, startedMs: number, first: Space | undefined): Promise<void> {
    const ctx = this.ctx;
    if (first === undefined) {
      if (ctx.backingOfflineSinceMs !== undefined) await ctx.admitWrite(startedMs);
      if (this.log.full) await this.log.roomAvailable();
    }
    let pieces: { record: KeyRecord; data: Uint8Array }[] = [];
    const parts: Promise<number>[] = [];
    let allocated = first;
    for (let done = 0; done < source.length;) {
      const position = offsetBytes + done;
      const wanted = Math.min(source.length - done, subtreeEnd(position) - position, ctx.keyMaxBytes);
      let space = allocated ?? this.head.alloc(wanted);
      allocated = undefined;
      while (space === undefined) {
        // Never hold space while waiting for more: what this write has so far goes to the write
        // group now (so it reaches the log and can be written back and reclaimed like any other
        // key), and everything queued must be published before sealing can help.
        if (pieces.length > 0) {
          parts.push(this.group.add(pieces));
          pieces = [];
        }
        await this.group.published();
        // Space may have been freed during that await: try again before waiting for the next free
        // (the check and the wait's registration must run without an await between them).
        space = this.head.alloc(wanted);
        if (space !== undefined) break;
        await ctx.waitForSpace(startedMs);
        ctx.checkWritable();
        space = this.head.alloc(wanted);
      }
      const data = source.subarray(done, done + space.lengthBytes);
      pieces.push({ data, record: this.record(position, space, data) });
      done += space.lengthBytes;
    }
    parts.push(this.group.add(pieces));
    const seqs = await Promise.all(parts);
    if (fua) await this.log.commit(Math.max(...seqs));
  }

  /** WRITE_ZEROES and TRIM: ZERO keys carry no data and are ordered with the log like writes. */
  async zero(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    const ctx = this.ctx;
    ctx.checkWritable();
    ctx.stats.zeroRequests++;
    ctx.stats.zeroBytes += lengthBytes;
    ctx.lastWriteMs = ctx.timers.now();
    if (ctx.backingOfflineSinceMs !== undefined) await ctx.admitWrite(ctx.timers.now());
    const key = newIndexKey();
    let seq = 0;
    for (let position = offsetBytes; position < offsetBytes + lengthBytes;) {
      if (this.log.full) await this.log.roomAvailable();
      ctx.checkWritable();
      const end = Math.min(offsetBytes + lengthBytes, subtreeEnd(position));
      const record: KeyRecord = { offsetBytes: position, lengthBytes: end - position, flags: keyFlagZero, segment: 0, segmentOffsetBytes: 0, gen: 0, dataCrc: 0 };
      ctx.index.insert(keyFromRecord(key, record));
      seq = this.log.append(record);
      position = end;
    }
    if (fua) await this.log.commit(seq);
  }

  /** The key record of `data` written at `position` into `space`. */
  private record(position: number, space: Space, data: Uint8Array): KeyRecord {
    return {
      offsetBytes: position,
      lengthBytes: space.lengthBytes,
      flags: 0,
      segment: space.segment,
      segmentOffsetBytes: space.offsetBytes,
      gen: space.gen,
      dataCrc: this.ctx.dataCrc ? crc32c(data) : 0,
    };
  }
}
