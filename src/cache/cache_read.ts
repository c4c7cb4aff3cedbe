// The read path: client reads, prefetch (NBD_CMD_CACHE) and block status (dm-pcache's
// cache_read and its miss/fill).
//
// A read walks the index over the request; hits are copied from the cache device (generation
// checked first, data CRC verified when enabled); misses are read from the backing device, and
// the first miss of a range leaves an EMPTY placeholder in the index. When the miss completes
// and its placeholder is still there, the data is stored in the cache as a CLEAN key; a write
// that landed meanwhile has cut or replaced the placeholder and wins. Filling is optional:
// with no free space or no room in the log, the placeholder is simply dropped.
// A large read whose cached pieces are many and mostly written back is instead one backing read
// with the rest copied over it (cache_read_gather.ts decides and plans).
// A large read served from many pieces not yet written back, the second time it comes at its
// offset, is stored again as one piece (cache_read_rewrite.ts), so the reads after it are one.
// A large read served from many cached pieces reads them in one batch on the cache device's
// own thread (BlockDevice.readMany), where it has one and the target is shared memory: the
// event loop sends other replies meanwhile instead of making a system call per piece.
// Those pieces are asynchronous hits like any other: re-checked once read.
// Every await is a point where the index may change; code after one re-checks what it needs
// (a fill looks its placeholder up again by ticket; an asynchronous hit re-checks its
// segment's generation).

import { crc32c } from '../lib/crc32c.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { keyFlagEmpty, keyFlagZero, type KeyRecord } from '../ondisk/kset.js';
import { subtreeSizeBytes } from '../ondisk/layout.js';
import type { CacheContext } from './cache_context.js';
import type { DataHead } from './cache_data_head.js';
import type { KsetLog } from './cache_kset.js';
import { gatherRead, gatherRequestBytesMin, planGather, writtenBack } from './cache_read_gather.js';
import { FragmentRewriter, PieceTable, rewriteCandidate } from './cache_read_rewrite.js';
import { keyFlagsInMemory, keyFromRecord, newIndexKey, subtreeEnd, type IndexKey, type Subtree } from './cache_tree.js';
import { ReadAdmission } from './cache_admission.js';
import type { Space } from './cache_types.js';

function keyRecord(key: IndexKey): KeyRecord {
  return {
    offsetBytes: key.offsetBytes,
    lengthBytes: key.lengthBytes,
    flags: key.flags & ~keyFlagsInMemory,
    segment: key.segment,
    segmentOffsetBytes: key.segmentOffsetBytes,
    gen: key.gen,
    dataCrc: key.crc,
  };
}

/** A part of a read that goes to the backing device. */
interface Miss {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  /** The placeholder this miss inserted, or 0 when another read's placeholder covers it. */
  readonly ticket: number;
}

/** A hit read asynchronously: re-checked once the read completed. */
interface PendingHit {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly segment: number;
  readonly genLow32: number;
}

class ReadWalk {
  misses: Miss[] | undefined;
  pendingHits: PendingHit[] | undefined;
  reads: Promise<void>[] | undefined;
  hitBytes = 0;
  /** Whether misses may be stored in the cache (the write mode and the sequential cutoff decide). */
  admit = true;
  /** A client's read (not a prefetch): a full cache stores its misses only when they recur. */
  demand = true;
  readonly scratchKey = newIndexKey();
  /** The pieces served, while the read may be rewritten (cache_read_rewrite.ts); else undefined. */
  pieces: PieceTable | undefined;
  /** The table `pieces` uses when recording, kept from read to read. */
  private table: PieceTable | undefined;
  /**
   * Hits to read off the event loop once the walk is done, if they come to at least this many
   * (deferredPiecesMin); 0 when this read reads every hit as the walk meets it.
   */
  deferredPiecesMin = 0;
  /** The deferred hits: where each goes in the target, its segment, and where in that segment's data. */
  deferred: Uint8Array[] | undefined;
  deferredSegments: number[] | undefined;
  deferredOffsetsBytes: number[] | undefined;
  /** The request offset each deferred hit serves. */
  deferredPositions: number[] | undefined;
  /** The error a read of the cache device (not the backing device) failed with, once one has. */
  cacheError: unknown;
  /** Notes a failed cache-device read's error (so finishRead does not blame the backing device), and passes it on. */
  readonly cacheReadFailed = (error: unknown): never => {
    this.cacheError ??= error;
    throw error;
  };

  /** Ready for a new read (a walk is reused once its read has ended). */
  reset(admit: boolean, demand: boolean, record: boolean, deferredPiecesMin: number): void {
    this.misses = undefined;
    this.deferredPiecesMin = deferredPiecesMin;
    this.deferred = undefined;
    this.deferredSegments = undefined;
    this.deferredOffsetsBytes = undefined;
    this.deferredPositions = undefined;
    this.cacheError = undefined;
    this.pendingHits = undefined;
    this.reads = undefined;
    this.hitBytes = 0;
    this.admit = admit;
    this.demand = demand;
    this.pieces = undefined;
    if (record) {
      this.pieces = this.table ??= new PieceTable();
      this.pieces.reset();
    }
  }
}

/** One run of the block status answer. */
export interface CacheExtentStatus {
  readonly lengthBytes: number;
  readonly zero: boolean;
  readonly hole: boolean;
}

/** Maximum extents in one block status answer; the client asks again for the rest. */
export const blockStatusExtentsMax = 1024;

function ignore(): void {
  // A failure nobody waits for any more (ReadPath.abandon).
}

/** How long large reads keep going to the cache device's thread after others were last about (ReadPath.threadPiecesMin). */
const othersAboutWindowMs = 100;

/** Client reads, prefetch and block status over one cache's index. */
export class ReadPath {
  private readonly ctx: CacheContext;
  private readonly log: KsetLog;
  private readonly head: DataHead;
  /** The last ticket handed to an EMPTY placeholder. */
  private ticket = 0;
  readonly admission: ReadAdmission;
  /** A walk left by a read that ended synchronously, for the next one (walkRead). */
  private spareWalk: ReadWalk | undefined;
  /** Reads of at least gatherRequestBytesMin that returned a promise and have not settled. */
  private largeReadsPending = 0;
  private readonly largeReadSettled = (): void => { this.largeReadsPending--; };
  /** Whether a read of at least gatherRequestBytesMin came earlier in this macrotask (a microtask clears it). */
  private largeReadThisTurn = false;
  private readonly turnEnded = (): void => { this.largeReadThisTurn = false; };
  /** When (ms, the cache's clock) a large read last came with others about: a queue depth above 1 lately. */
  private othersAboutAtMs = -Infinity;
  private readonly rewriter: FragmentRewriter;

  constructor(ctx: CacheContext, log: KsetLog, head: DataHead) {
    this.ctx = ctx;
    this.log = log;
    this.head = head;
    this.rewriter = new FragmentRewriter(ctx, log, head);
    // What a full read cache holds: all but its free segment and about one of log (cache_admission_shadow.ts).
    this.admission = new ReadAdmission(ctx.dataCapacityBytes, Math.max(0, ctx.segments.count - 2) * ctx.dev.dataSizeBytes);
  }

  /** A fresh ticket for an EMPTY placeholder (never 0, wraps at 2^32). */
  private nextTicket(): number {
    this.ticket = (this.ticket % 0xffff_fffe) + 1;
    return this.ticket;
  }

  /**
   * A client read; with `admit` false its misses are read from the backing device and not
   * cached. A `demand` read's misses are stored in a full cache only when they recur
   * (cache_admission.ts); a prefetch's always are.
   */
  read(target: Uint8Array, offsetBytes: number, admit = true, demand = true): Promise<void> | undefined {
    const ctx = this.ctx;
    ctx.checkReadable();
    ctx.stats.readRequests++;
    if (admit && demand) this.admission.observe(offsetBytes);
    if (target.length < gatherRequestBytesMin) return this.walkRead(target, offsetBytes, admit, demand);
    const overlay = planGather(ctx, offsetBytes, target.length, ctx.tuning.fragmentedReadPieces);
    const io = overlay !== undefined
      ? gatherRead(ctx, target, offsetBytes, overlay, () => this.walkRead(target, offsetBytes, admit, demand, this.threadPiecesMin(target)))
      : this.walkRead(target, offsetBytes, admit, demand, this.threadPiecesMin(target));
    if (io !== undefined) {
      this.largeReadsPending++;
      // Both ways, so the derived promise never rejects (the caller handles io's rejection).
      io.then(this.largeReadSettled, this.largeReadSettled);
    }
    return io;
  }

  /** Serves a read by walking the index: hits from the cache device, misses from the backing device. */
  /** `threadPieces`: read the hits on the cache device's thread if there are at least this many (0: never; threadPiecesMin). */
  private walkRead(target: Uint8Array, offsetBytes: number, admit: boolean, demand: boolean, threadPieces = 0): Promise<void> | undefined {
    const ctx = this.ctx;
    // A walk that ends synchronously (every piece a hit from a blocking device) is left for the
    // next read: no allocation on the read-hit path.
    const walk = this.spareWalk ?? new ReadWalk();
    this.spareWalk = undefined;
    walk.reset(admit, demand, rewriteCandidate(ctx, target.length), threadPieces);
    const endBytes = offsetBytes + target.length;
    const firstEnd = subtreeEnd(offsetBytes);
    try {
      if (endBytes <= firstEnd) {
        this.readSubtree(walk, target, offsetBytes, offsetBytes, endBytes); // the common case: one subtree
      } else {
        for (let position = offsetBytes; position < endBytes;) {
          const end = Math.min(endBytes, subtreeEnd(position));
          this.readSubtree(walk, target, offsetBytes, position, end);
          position = end;
        }
      }
      if (walk.deferred !== undefined) this.readDeferred(walk);
    } catch (error) {
      this.abandon(walk);
      // Only the cache device's reads throw during the walk (a backing read fails later, unheard).
      if (isPcacheError(error)) ctx.stats.cacheIoErrors++;
      throw error;
    }
    ctx.stats.readHitBytes += walk.hitBytes;
    if (walk.misses === undefined && walk.reads === undefined) {
      ctx.stats.readHitRequests++;
      if (walk.pieces !== undefined) this.rewriter.offer(target, offsetBytes, walk.pieces);
      this.spareWalk = walk;
      return undefined;
    }
    if (walk.misses === undefined) ctx.stats.readHitRequests++;
    else {
      ctx.stats.readMissRequests++;
      if (!admit) ctx.stats.fillsNotAdmitted++;
    }
    return this.finishRead(walk, target, offsetBytes);
  }

  /**
   * Serves [position, end) of one subtree. `request` is the request's first byte. The walk over
   * existing keys T, with R the part of the request not yet served:
   *
   *   before:     R |=====|           T starts after R: all of R is a miss (placeholder).
   *                          T |==|
   *   overlap     R |=====|           the gap before T is a miss (placeholder); the part of
   *   tail:          T |=====|        R that T covers is a hit.
   *   contain:    R |=========|       the gap before T is a miss (placeholder); all of T is a
   *                   T |==|          hit; the walk goes on after T.
   *   contained:  R   |===|           all of R is a hit, at (R start - T start) inside T.
   *               T |=======|
   *   overlap     R    |=====|        [R start, T end) is a hit; the walk goes on.
   *   head:       T |=====|
   *
   * A hit on an EMPTY placeholder is a backing read without a new placeholder; a hit on a ZERO
   * key fills zeroes; a hit on a stale key deletes the key and serves that range as a gap. The
   * tail left after the last key is a miss (placeholder).
   */
  private readSubtree(walk: ReadWalk, target: Uint8Array, request: number, position: number, end: number): void {
    const ctx = this.ctx;
    const subtree = ctx.index.subtree(position, false);
    if (subtree === undefined) {
      this.addMiss(walk, target, request, position, end, true);
      return;
    }
    let index = subtree.seek(position);
    while (position < end) {
      if (index >= subtree.count || subtree.start(index) >= end) {
        this.addMiss(walk, target, request, position, end, true);
        return;
      }
      const keyStart = subtree.start(index);
      if (keyStart > position) {
        if (this.addMiss(walk, target, request, position, keyStart, true)) index++; // it went in at `index`
        position = keyStart;
        continue;
      }
      const pieceEnd = Math.min(subtree.end(index), end);
      const flags = subtree.flags(index);
      if ((flags & keyFlagEmpty) !== 0) {
        this.addMiss(walk, target, request, position, pieceEnd, false);
      } else if ((flags & keyFlagZero) !== 0) {
        target.fill(0, position - request, pieceEnd - request);
        walk.hitBytes += pieceEnd - position;
        walk.pieces?.add(position, pieceEnd - position, -1, 0, 0);
      } else {
        const segment = subtree.segment(index);
        if (ctx.segments.genLow32(segment) !== subtree.genLow32(index)) {
          subtree.removeAt(index);
          ctx.stats.staleKeysRemoved++;
          continue; // the range is a gap now
        }
        subtree.markReferenced(index, this.head.hitEpoch);
        ctx.segments.hit[segment] = 1;
        if (walk.pieces !== undefined) this.recordPiece(walk.pieces, subtree, index, position, pieceEnd, flags);
        // A hit covering the whole request (a small read inside one key) reads into the
        // target itself: no view allocated per request.
        const whole = position === request && pieceEnd - position === target.length;
        this.readHit(walk, subtree, index, whole ? target : target.subarray(position - request, pieceEnd - request), position);
      }
      position = pieceEnd;
      index++;
    }
    ctx.index.release(subtree);
  }

  /**
   * A walk that threw (a synchronous cache-device read failed; counted by the caller as the
   * cache device's error): the request fails with that error, so its placeholders go (else no
   * later read could store the range: a read meeting a placeholder reads around it) and the
   * reads it started are left to finish unheard (a failure of one then is nobody's: it must not
   * surface as an unhandled rejection).
   */
  private abandon(walk: ReadWalk): void {
    for (const miss of walk.misses ?? []) if (miss.ticket !== 0) this.removePlaceholders(miss);
    for (const io of walk.reads ?? []) io.catch(ignore);
  }

  /** Notes a hit piece for a possible rewrite, and whether it is not yet written back. */
  private recordPiece(pieces: PieceTable, subtree: Subtree, index: number, position: number, pieceEnd: number, flags: number): void {
    const ctx = this.ctx;
    const segment = subtree.segment(index);
    pieces.add(position, pieceEnd - position, segment, subtree.segmentOffset(index) + (position - subtree.start(index)), subtree.genLow32(index));
    if (!writtenBack(ctx, flags, segment)) pieces.dirty++;
  }

  private readHit(walk: ReadWalk, subtree: Subtree, index: number, piece: Uint8Array, position: number): void {
    const ctx = this.ctx;
    const segment = subtree.segment(index);
    walk.hitBytes += piece.length;
    let io;
    if (ctx.dataCrc) {
      const key = subtree.read(index, walk.scratchKey);
      io = this.verifiedRead(key, piece, key.segmentOffsetBytes + (position - key.offsetBytes));
    } else {
      // Without data CRCs only where the data lies is needed: two columns, not the whole key.
      const segmentOffset = subtree.segmentOffset(index) + (position - subtree.start(index));
      if (walk.deferredPiecesMin > 0) {
        (walk.deferred ??= []).push(piece);
        (walk.deferredSegments ??= []).push(segment);
        (walk.deferredOffsetsBytes ??= []).push(segmentOffset);
        (walk.deferredPositions ??= []).push(position);
        return;
      }
      io = ctx.dev.readData(piece, segment, segmentOffset);
    }
    this.pendOn(walk, io, position, piece.length, segment);
  }

  /** Notes an asynchronous hit (`io` undefined: it completed already), to be re-checked once read. */
  private pendOn(walk: ReadWalk, io: Promise<void> | undefined, position: number, lengthBytes: number, segment: number): void {
    if (io === undefined) return;
    (walk.reads ??= []).push(io.catch(walk.cacheReadFailed));
    this.notePending(walk, position, lengthBytes, segment);
  }

  /** Notes a hit whose read is in flight, with its segment's generation now, for finishRead to re-check. */
  private notePending(walk: ReadWalk, position: number, lengthBytes: number, segment: number): void {
    (walk.pendingHits ??= []).push({ offsetBytes: position, lengthBytes, segment, genLow32: this.ctx.segments.genLow32(segment) });
  }

  /**
   * The least number of hits a large read into `target` must have for them to be read off the
   * event loop, or 0 when they never are: the read must be without data CRCs (the checks would
   * be the event loop's again), into shared memory (a thread fills it in place), and the cache
   * device must have a thread for reads. And other reads must be about: another large read
   * pending, or one that came earlier in this macrotask (requests queued behind each other), now
   * or within othersAboutWindowMs (at a queue depth above 1 a request can still find every
   * other one answered, and reading it on the event loop would stall the ones behind it). The
   * thread pays when the event loop has other replies to send meanwhile; a read alone (queue
   * depth 1) would only add two hand-offs between threads, measured at 20-30% fewer reads per
   * second than on the event loop.
   */
  private threadPiecesMin(target: Uint8Array): number {
    const ctx = this.ctx;
    const min = ctx.tuning.fragmentedThreadPieces;
    if (min <= 0 || ctx.dataCrc || !(target.buffer instanceof SharedArrayBuffer) || !ctx.dev.readsOffThread) return 0;
    const nowMs = ctx.timers.now();
    if (this.largeReadsPending > 0 || this.largeReadThisTurn) this.othersAboutAtMs = nowMs;
    if (!this.largeReadThisTurn) {
      this.largeReadThisTurn = true;
      queueMicrotask(this.turnEnded);
    }
    return nowMs - this.othersAboutAtMs <= othersAboutWindowMs ? min : 0;
  }

  /**
   * Reads the hits the walk deferred: in one batch off the event loop when they are at least
   * deferredPiecesMin, else each here, as the walk would have. Nothing ran between the walk and
   * this (no await), so every segment still holds what the walk saw.
   */
  private readDeferred(walk: ReadWalk): void {
    const ctx = this.ctx;
    const targets = walk.deferred ?? [];
    const segments = walk.deferredSegments ?? [];
    const offsets = walk.deferredOffsetsBytes ?? [];
    const positions = walk.deferredPositions ?? [];
    walk.deferred = undefined;
    if (targets.length >= walk.deferredPiecesMin) {
      ctx.stats.threadReadBatches++;
      (walk.reads ??= []).push(ctx.dev.readDataMany(targets, segments, offsets).catch(walk.cacheReadFailed));
      for (let i = 0; i < targets.length; i++) this.notePending(walk, positions[i] ?? 0, (targets[i] as Uint8Array).length, segments[i] ?? -1);
      return;
    }
    for (let i = 0; i < targets.length; i++) {
      const target = targets[i] as Uint8Array;
      const segment = segments[i] ?? -1;
      this.pendOn(walk, ctx.dev.readData(target, segment, offsets[i] ?? 0), positions[i] ?? 0, target.length, segment);
    }
  }

  /**
   * Reads a hit and checks its data CRC. The CRC covers the key's original extent, which may be
   * larger than what is left of the key after later writes cut it; then the whole original
   * extent is read and checked, and the wanted part copied out.
   */
  private verifiedRead(key: IndexKey, piece: Uint8Array, segmentOffset: number): Promise<void> | undefined {
    const ctx = this.ctx;
    const originalOffset = key.segmentOffsetBytes - key.crcDeltaBytes;
    const whole = segmentOffset === originalOffset && piece.length === key.crcLengthBytes;
    const extent = whole ? piece : new Uint8Array(key.crcLengthBytes);
    const { crc, segment, offsetBytes, lengthBytes } = key;
    const check = (): void => {
      if (crc32c(extent) !== crc) {
        ctx.stats.dataCrcErrors++;
        throw new PcacheError('EIO', `data CRC mismatch in cached extent ${offsetBytes}+${lengthBytes} (segment ${segment})`);
      }
      if (!whole) piece.set(extent.subarray(segmentOffset - originalOffset, segmentOffset - originalOffset + piece.length));
    };
    const io = ctx.dev.readData(extent, segment, originalOffset);
    if (io === undefined) {
      check();
      return undefined;
    }
    return io.then(check);
  }

  /** Queues a backing read for [start, end); returns whether a placeholder went into the index. */
  private addMiss(walk: ReadWalk, target: Uint8Array, request: number, start: number, end: number, placeholder: boolean): boolean {
    const ctx = this.ctx;
    let ticket = 0;
    if (placeholder && walk.admit && ctx.state === 'running' && !ctx.readOnly && ctx.failure === undefined && this.admitted(walk, start)) {
      ticket = this.nextTicket();
      const empty: KeyRecord = { offsetBytes: start, lengthBytes: end - start, flags: keyFlagEmpty, segment: ticket, segmentOffsetBytes: 0, gen: 0, dataCrc: 0 };
      ctx.index.insert(keyFromRecord(walk.scratchKey, empty));
    }
    (walk.misses ??= []).push({ offsetBytes: start, lengthBytes: end - start, ticket });
    ctx.stats.readMissBytes += end - start;
    (walk.reads ??= []).push(ctx.backing.read(target.subarray(start - request, end - request), start));
    return ticket !== 0;
  }

  /** Whether a demand read's miss at `start` is stored (cache_admission.ts); counts the ones turned away. */
  private admitted(walk: ReadWalk, start: number): boolean {
    if (!walk.demand) return true;
    const ctx = this.ctx;
    const verdict = this.admission.admit(start, ctx.segments.freeCount, ctx.mostlyClean);
    if (verdict === 'stored') return true;
    if (verdict === 'first-miss') {
      ctx.stats.fillsFirstMissStored++;
      return true;
    }
    ctx.stats.fillsNotRecurring++;
    return false;
  }

  private async finishRead(walk: ReadWalk, target: Uint8Array, request: number): Promise<void> {
    const ctx = this.ctx;
    const misses = walk.misses ?? [];
    try {
      await Promise.all(walk.reads ?? []);
    } catch (error) {
      for (const miss of misses) if (miss.ticket !== 0) this.removePlaceholders(miss);
      // A cache-device read that failed is the cache device's error, not the backing device's:
      // counted as such, and never a reason to call the backing device offline.
      if (error === walk.cacheError) ctx.stats.cacheIoErrors++;
      else if (isPcacheError(error)) {
        ctx.stats.backingReadErrors++;
        if (error.code === 'ENODEV') ctx.backingOffline(error.message);
      }
      throw error;
    }
    // A hit read asynchronously may have raced with GC freeing its segment; then the data has
    // been written back, so the backing device holds it.
    let raced = false;
    for (const hit of walk.pendingHits ?? []) {
      if (ctx.segments.genLow32(hit.segment) !== hit.genLow32) {
        raced = true;
        await ctx.backing.read(target.subarray(hit.offsetBytes - request, hit.offsetBytes - request + hit.lengthBytes), hit.offsetBytes);
      }
    }
    if (walk.misses === undefined && !raced && walk.pieces !== undefined) this.rewriter.offer(target, request, walk.pieces);
    for (const miss of misses) {
      if (miss.ticket !== 0) await this.fillMiss(miss, target.subarray(miss.offsetBytes - request, miss.offsetBytes - request + miss.lengthBytes));
    }
  }

  /** Visits the EMPTY keys of `miss`'s ticket still inside its range, in order. */
  private forEachPlaceholder(miss: Miss, visit: (subtree: Subtree, index: number) => 'keep' | 'removed' | 'stop'): void {
    const ctx = this.ctx;
    const end = miss.offsetBytes + miss.lengthBytes;
    for (let position = miss.offsetBytes; position < end; position = subtreeEnd(position)) {
      const subtree = ctx.index.subtree(position, false);
      if (subtree === undefined) continue;
      const stop = Math.min(end, subtreeEnd(position));
      for (let index = subtree.seek(position); index < subtree.count && subtree.start(index) < stop;) {
        if ((subtree.flags(index) & keyFlagEmpty) !== 0 && subtree.segment(index) === miss.ticket) {
          const verdict = visit(subtree, index);
          if (verdict === 'stop') return;
          if (verdict === 'removed') continue;
        }
        index++;
      }
      ctx.index.release(subtree);
    }
  }

  /**
   * Barriers for a write that goes to the backing device directly (cache_direct.ts): EMPTY
   * keys of a fresh ticket over [offsetBytes, offsetBytes + lengthBytes) replace whatever the
   * index held there, read placeholders included, so no read can store what it read from the
   * backing device before the write landed; reads meeting a barrier read the backing device.
   * Returns the ticket, for dropBarrier or fillBarrier.
   */
  placeBarrier(offsetBytes: number, lengthBytes: number): number {
    const ticket = this.nextTicket();
    const key = newIndexKey();
    const end = offsetBytes + lengthBytes;
    for (let position = offsetBytes; position < end;) {
      const pieceEnd = Math.min(end, subtreeEnd(position));
      this.ctx.index.insert(keyFromRecord(key, { offsetBytes: position, lengthBytes: pieceEnd - position, flags: keyFlagEmpty, segment: ticket, segmentOffsetBytes: 0, gen: 0, dataCrc: 0 }));
      position = pieceEnd;
    }
    return ticket;
  }

  /** Removes what is left of a barrier (writes that landed over it since stay). */
  dropBarrier(ticket: number, offsetBytes: number, lengthBytes: number): void {
    this.removePlaceholders({ offsetBytes, lengthBytes, ticket });
  }

  /**
   * Stores `data` (what the barrier's write put on the backing device, now synced there) as
   * CLEAN keys over what is left of the barrier, as a read miss is filled; the writethrough copy.
   */
  async fillBarrier(ticket: number, offsetBytes: number, data: Uint8Array): Promise<void> {
    await this.fillMiss({ offsetBytes, lengthBytes: data.length, ticket }, data);
  }

  private removePlaceholders(miss: Miss): void {
    this.forEachPlaceholder(miss, (subtree, index) => {
      subtree.removeAt(index);
      return 'removed';
    });
  }

  /**
   * Stores a completed miss in the cache as CLEAN keys, for the parts whose placeholder is still
   * in the index. Filling is optional: with no free space, no room in the log, or a stopping
   * cache, the placeholders are simply removed.
   */
  private async fillMiss(miss: Miss, data: Uint8Array): Promise<void> {
    const ctx = this.ctx;
    const pieces: { offsetBytes: number; lengthBytes: number }[] = [];
    this.forEachPlaceholder(miss, (subtree, index) => {
      pieces.push({ offsetBytes: subtree.start(index), lengthBytes: subtree.length(index) });
      return 'keep';
    });
    for (const piece of pieces) {
      for (let done = 0; done < piece.lengthBytes;) {
        const canFill = ctx.state === 'running' && ctx.failure === undefined && !this.log.full;
        const space = canFill ? this.head.alloc(Math.min(piece.lengthBytes - done, ctx.keyMaxBytes)) : undefined;
        if (space === undefined) {
          ctx.stats.fillsSkipped++;
          // A full cache: GC (through writeback, if dirty_tail holds it back) frees segments.
          ctx.checkGcThreshold();
          this.removePlaceholders(miss);
          return;
        }
        const start = piece.offsetBytes + done;
        const bytes = data.subarray(start - miss.offsetBytes, start - miss.offsetBytes + space.lengthBytes);
        try {
          const io = ctx.dev.writeData(bytes, space.segment, space.offsetBytes);
          if (io !== undefined) await io;
          if (this.head.genWrite !== undefined) await this.head.genWrite;
        } catch (error) {
          ctx.segments.put(space.segment);
          if (!isPcacheError(error)) throw error;
          ctx.stats.cacheIoErrors++;
          this.removePlaceholders(miss);
          return;
        }
        this.storeFill(miss, { offsetBytes: start, lengthBytes: space.lengthBytes }, space, bytes);
        done += space.lengthBytes;
      }
    }
  }

  /**
   * Turns the placeholder pieces of `miss` inside `range` into CLEAN keys pointing at `space`,
   * which holds `range`'s data. Writes may have cut the placeholder while the data was being
   * stored; each surviving piece becomes its own key (with its own segment reference).
   */
  private storeFill(miss: Miss, range: { offsetBytes: number; lengthBytes: number }, space: Space, bytes: Uint8Array): void {
    const ctx = this.ctx;
    let references = 1; // alloc took one for us
    const rangeEnd = range.offsetBytes + range.lengthBytes;
    const key = newIndexKey();
    this.forEachPlaceholder(miss, (subtree, index) => {
      const start = subtree.start(index);
      if (start >= rangeEnd) return 'stop';
      if (start < range.offsetBytes) return 'keep';
      const length = Math.min(subtree.length(index), rangeEnd - start);
      const delta = start - range.offsetBytes;
      const piece = bytes.subarray(delta, delta + length);
      if (references === 0) ctx.segments.get(space.segment);
      else references--;
      const crc = ctx.dataCrc ? crc32c(piece) : 0;
      subtree.fillPlaceholder(index, { lengthBytes: length, segment: space.segment, segmentOffsetBytes: space.offsetBytes + delta, gen: space.gen, crc });
      subtree.read(index, key);
      this.log.append(keyRecord(key));
      ctx.stats.fillsStored++;
      return 'keep';
    });
    if (references > 0) ctx.segments.put(space.segment);
  }

  /** NBD_CMD_CACHE: brings the range into the cache, a bounded piece at a time. */
  async prefetch(offsetBytes: number, lengthBytes: number, admit = true): Promise<void> {
    if (!admit) return;
    const chunkBytes = subtreeSizeBytes;
    const scratch = new Uint8Array(Math.min(chunkBytes, lengthBytes));
    for (let done = 0; done < lengthBytes; done += chunkBytes) {
      const piece = scratch.subarray(0, Math.min(chunkBytes, lengthBytes - done));
      // The walk, never a gather: a prefetch of cached data needs no backing read; and not a
      // demand read: what a client asks to prefetch is always stored.
      this.ctx.checkReadable();
      this.ctx.stats.readRequests++;
      const io = this.walkRead(piece, offsetBytes + done, true, false);
      if (io !== undefined) await io;
    }
  }

  /**
   * Describes the range as the cache sees it: ZERO keys read as zeroes; everything else is
   * reported as data (the cache does not know what the backing device holds, and claiming
   * nothing is always safe).
   */
  blockStatus(offsetBytes: number, lengthBytes: number): CacheExtentStatus[] {
    const ctx = this.ctx;
    ctx.checkReadable();
    const extents: { lengthBytes: number; zero: boolean; hole: boolean }[] = [];
    const push = (length: number, zero: boolean): void => {
      const last = extents[extents.length - 1];
      if (last !== undefined && last.zero === zero) last.lengthBytes += length;
      else extents.push({ lengthBytes: length, zero, hole: false });
    };
    const endBytes = offsetBytes + lengthBytes;
    for (let position = offsetBytes; position < endBytes && extents.length < blockStatusExtentsMax;) {
      const end = Math.min(endBytes, subtreeEnd(position));
      const subtree = ctx.index.subtree(position, false);
      let cursor = position;
      if (subtree !== undefined) {
        for (let index = subtree.seek(position); index < subtree.count && subtree.start(index) < end; index++) {
          const start = Math.max(subtree.start(index), cursor);
          if (start > cursor) push(start - cursor, false);
          const pieceEnd = Math.min(subtree.end(index), end);
          push(pieceEnd - start, (subtree.flags(index) & keyFlagZero) !== 0);
          cursor = pieceEnd;
        }
      }
      if (end > cursor) push(end - cursor, false);
      position = end;
    }
    return extents;
  }
}
