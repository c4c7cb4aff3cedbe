// Fragmented dirty data laid out again: a large read served from many pieces not yet written
// back, when the same range was read so before, stores what it read once more, as one piece at
// the data head, so the reads after it are one cache read each.
//
// Random small writes leave a range in pieces scattered over the log. Once writeback has passed
// them, a large read is one backing read (cache_read_gather.ts); until then every piece costs a
// cache read of its own (256 preads for a 1 MiB read of 4 KiB writes, about half of nbdkit's
// figure on the same medium: docs/performance.md). The read has just put the range together in
// its buffer, so storing it again costs one sequential write of the cache device. That write is
// not free (on a new, sparse cache file the pages are allocated as it goes, and a first pass
// that rewrote every read ran at less than half the piece-by-piece figure), so only a range read
// fragmented a second time (hot data, RecentFragmentedReads) is rewritten: a one-pass reader
// such as a backup pays nothing, and a range read again pays it back at once. A rewrite is a
// dirty key like a client write's (the bytes may not be on the backing device yet), so writeback
// writes the range once, in one piece, and skips the pieces it supersedes wherever the
// writeback ordering allows skipping.
//
// When: a read in writeback mode, of at least fragmentedRewritePieces sectors and at most
// rewriteRequestBytesMax, served wholly from the cache (no miss, no placeholder) with at least
// fragmentedRewritePieces pieces not yet written back, for the second time at that offset; and
// only while the rewrite cannot push the cache towards waiting writers: dirty data stays below
// writeback_stop_percent, GC's threshold stays unreached, and rewriteFreeSegmentsMin segments
// stay free. A rewrite is optional, as a fill is: no space, no log room or a stopping cache and
// it is dropped.
//
// Why it is safe: the rewritten bytes are what the index mapped when the read walked it. They
// are published only over index entries that still map exactly the pieces the read used (same
// segment, generation and place); wherever a write, a trim, a direct write's barrier or
// anything else changed the index meanwhile, the newer state stays. So a rewrite never changes
// what the device reads, and it enters the log after every key whose data it copies: a crash
// that keeps the rewrite keeps them too, and one that loses it loses nothing the log did not
// already hold. Its data is written before its key is visible, as every key's is.

import { crc32c } from '../lib/crc32c.js';
import { isPcacheError } from '../lib/errors.js';
import { sectorSizeBytes } from '../lib/units.js';
import { keyFlagZero, type KeyRecord } from '../ondisk/kset.js';
import type { CacheContext } from './cache_context.js';
import type { DataHead } from './cache_data_head.js';
import type { KsetLog } from './cache_kset.js';
import { isDataKey, keyFromRecord, newIndexKey, subtreeEnd } from './cache_tree.js';
import type { Space } from './cache_types.js';

/** Reads larger than this are never rewritten (bounds the piece table a read keeps: 4 MiB of sectors). */
export const rewriteRequestBytesMax = 4 * 1024 * 1024;
/** A rewrite leaves at least this many segments free. */
export const rewriteFreeSegmentsMin = 2;
/** Offsets of fragmented reads remembered until they are read again (about 4 GiB of 1 MiB reads). */
export const recentFragmentedReadsMax = 4096;

/** Numbers per piece in a PieceTable: offset, length, segment (-1: a ZERO key), place in the segment, generation's low 32 bits. */
const pieceFields = 5;
const zeroSegment = -1;

/**
 * The pieces a read was served from, in address order and back to back: where each lay in the
 * cache when the read walked the index. Grows to the largest read it recorded (bounded by
 * rewriteRequestBytesMax / sectorSizeBytes pieces).
 */
export class PieceTable {
  fields = new Float64Array(64 * pieceFields);
  count = 0;
  /** Pieces not yet written back. */
  dirty = 0;

  reset(): void {
    this.count = 0;
    this.dirty = 0;
  }

  /** Records a data piece; `segment` -1 records a ZERO key's. */
  add(offsetBytes: number, lengthBytes: number, segment: number, segmentOffsetBytes: number, genLow32: number): void {
    let at = this.count * pieceFields;
    if (at + pieceFields > this.fields.length) {
      const grown = new Float64Array(this.fields.length * 2);
      grown.set(this.fields);
      this.fields = grown;
    }
    const fields = this.fields;
    fields[at++] = offsetBytes;
    fields[at++] = lengthBytes;
    fields[at++] = segment;
    fields[at++] = segmentOffsetBytes;
    fields[at] = genLow32;
    this.count++;
  }

  /** A copy holding only the recorded pieces (the read's table is reused by the next read). */
  snapshot(): Float64Array {
    return this.fields.slice(0, this.count * pieceFields);
  }
}

/** Whether a read of `lengthBytes` should record its pieces for a possible rewrite. */
export function rewriteCandidate(ctx: CacheContext, lengthBytes: number): boolean {
  const pieces = ctx.tuning.fragmentedRewritePieces;
  return pieces > 0 && ctx.mode === 'writeback' && lengthBytes >= pieces * sectorSizeBytes && lengthBytes <= rewriteRequestBytesMax;
}

/**
 * The offsets of recent reads that qualified for a rewrite but were the first at their offset,
 * oldest first; the oldest is forgotten beyond recentFragmentedReadsMax.
 */
export class RecentFragmentedReads {
  private readonly offsets = new Set<number>();

  /** Whether a read at `offsetBytes` qualified before (and forgets it); notes it otherwise. */
  seenBefore(offsetBytes: number): boolean {
    if (this.offsets.delete(offsetBytes)) return true;
    if (this.offsets.size >= recentFragmentedReadsMax) {
      const oldest = this.offsets.values().next();
      if (oldest.done !== true) this.offsets.delete(oldest.value);
    }
    this.offsets.add(offsetBytes);
    return false;
  }
}

/** Rewrites fragmented reads (see the file comment). */
export class FragmentRewriter {
  private readonly ctx: CacheContext;
  private readonly log: KsetLog;
  private readonly head: DataHead;
  private readonly scratchKey = newIndexKey();
  private readonly recent = new RecentFragmentedReads();

  constructor(ctx: CacheContext, log: KsetLog, head: DataHead) {
    this.ctx = ctx;
    this.log = log;
    this.head = head;
  }

  /**
   * Called when a read of [offsetBytes, +data.length) was served from `pieces` alone. Starts a
   * rewrite when the rules allow (the second such read at the offset, with room to spare).
   * `data` is only read before this returns (a copy is taken when the device writes
   * asynchronously).
   */
  offer(data: Uint8Array, offsetBytes: number, pieces: PieceTable): void {
    const ctx = this.ctx;
    if (pieces.dirty < ctx.tuning.fragmentedRewritePieces || !this.recent.seenBefore(offsetBytes) || !this.roomFor(data.length)) return;
    const table = pieces.snapshot();
    // A copy when the device writes later: the reader may reuse its buffer as soon as its read
    // returns. new Uint8Array(view) copies whatever `data` is; a Buffer's slice() would not.
    const source = ctx.dev.synchronous ? data : new Uint8Array(data);
    void this.rewrite(source, offsetBytes, table).catch((error: unknown) => {
      if (!isPcacheError(error)) throw error;
      ctx.stats.cacheIoErrors++;
    });
  }

  /** Whether `lengthBytes` more of dirty data leaves the cache clear of writeback's band, GC's threshold and the free reserve. */
  private roomFor(lengthBytes: number): boolean {
    const ctx = this.ctx;
    if (ctx.state !== 'running' || ctx.readOnly || ctx.failure !== undefined || this.log.full) return false;
    if ((ctx.stats.dirtyBytes + lengthBytes) * 100 > ctx.dataCapacityBytes * ctx.tuning.writebackStopPercent) return false;
    const segmentsNeeded = Math.ceil(lengthBytes / ctx.dev.dataSizeBytes);
    if (ctx.segments.freeCount < rewriteFreeSegmentsMin + segmentsNeeded) return false;
    return ctx.gcPercent === 0 || ctx.segments.usedCount + segmentsNeeded < ctx.gcThresholdSegments;
  }

  /**
   * Writes `source` at the data head, a key's worth at a time, then publishes each part over
   * what is left of the pieces it copies. Every part's space is taken and its data written
   * before the first await, so with a blocking cache device `source` (then the reader's own
   * buffer) is not read after offer() returns; new segments' generations are waited for before
   * anything is published, as the write group does.
   */
  private async rewrite(source: Uint8Array, offsetBytes: number, table: Float64Array): Promise<void> {
    const ctx = this.ctx;
    const endBytes = offsetBytes + source.length;
    const parts: Space[] = [];
    const writes: Promise<void>[] = [];
    for (let position = offsetBytes; position < endBytes;) {
      const space = this.head.alloc(Math.min(endBytes - position, subtreeEnd(position) - position, ctx.keyMaxBytes));
      if (space === undefined) break;
      parts.push(space);
      // Every new segment's generation, not only the last one's (a rewrite may take two).
      if (this.head.genWrite !== undefined && writes[writes.length - 1] !== this.head.genWrite) writes.push(this.head.genWrite);
      position += space.lengthBytes;
    }
    try {
      let position = 0;
      for (const space of parts) {
        const io = ctx.dev.writeData(source.subarray(position, position + space.lengthBytes), space.segment, space.offsetBytes);
        if (io !== undefined) writes.push(io);
        position += space.lengthBytes;
      }
      if (writes.length > 0) await Promise.all(writes);
    } catch (error) {
      for (const space of parts) ctx.segments.put(space.segment);
      throw error;
    }
    let position = 0;
    let published = 0;
    for (const space of parts) {
      // Publishing is optional: a stopping cache or a full log simply drops the rest.
      if (ctx.state !== 'running' || ctx.failure !== undefined || this.log.full) ctx.segments.put(space.segment);
      else published += this.publish(offsetBytes + position, source.subarray(position, position + space.lengthBytes), space, table);
      position += space.lengthBytes;
    }
    if (published > 0) ctx.stats.fragmentRewrites++;
  }

  /**
   * Points the index over [start, start + bytes.length), wherever it still maps the read's
   * pieces, at `space`: one dirty key per run of such entries. Entries that changed keep their
   * newer data. Each key takes its own segment reference (the allocation took one). Returns the
   * bytes published.
   *
   *   index now:   |p1 |p2 |W  |p4 |p5 |    (W: written since the read)
   *   published:   |=======|   |=======|    two keys; W stays
   */
  private publish(start: number, bytes: Uint8Array, space: Space, table: Float64Array): number {
    const ctx = this.ctx;
    const end = start + bytes.length;
    const runs = this.unchangedRuns(start, end, table);
    let references = 1; // alloc took one for us
    let published = 0;
    for (let index = 0; index < runs.length; index += 2) {
      const runStart = runs[index] ?? 0;
      const runEnd = runs[index + 1] ?? 0;
      const delta = runStart - start;
      if (references === 0) ctx.segments.get(space.segment);
      else references--;
      const record: KeyRecord = {
        offsetBytes: runStart,
        lengthBytes: runEnd - runStart,
        flags: 0,
        segment: space.segment,
        segmentOffsetBytes: space.offsetBytes + delta,
        gen: space.gen,
        dataCrc: ctx.dataCrc ? crc32c(bytes.subarray(delta, delta + runEnd - runStart)) : 0,
      };
      ctx.index.insertTakingStale(keyFromRecord(this.scratchKey, record));
      this.log.append(record);
      published += runEnd - runStart;
    }
    if (references > 0) ctx.segments.put(space.segment);
    ctx.stats.fragmentRewriteBytes += published;
    return published;
  }

  /**
   * The runs of [start, end) (one subtree) where every index entry still maps the piece the read
   * used there, as start/end pairs. An entry matches when it is the same kind of key as the
   * piece (ZERO, or data in the same segment of the same generation) and maps each byte to the
   * same place; an entry may have been cut since, never joined to another.
   */
  private unchangedRuns(start: number, end: number, table: Float64Array): number[] {
    const ctx = this.ctx;
    const runs: number[] = [];
    const subtree = ctx.index.subtree(start, false);
    if (subtree === undefined) return runs;
    let piece = 0;
    const pieceEnd = (at: number): number => (table[at] ?? 0) + (table[at + 1] ?? 0);
    for (let index = subtree.seek(start); index < subtree.count && subtree.start(index) < end; index++) {
      const entryStart = Math.max(subtree.start(index), start);
      const entryEnd = Math.min(subtree.end(index), end);
      while (piece < table.length && pieceEnd(piece) <= entryStart) piece += pieceFields;
      if (piece >= table.length) break;
      const pieceStart = table[piece] ?? 0;
      if (pieceStart > entryStart || pieceEnd(piece) < entryEnd) continue;
      const flags = subtree.flags(index);
      const segment = table[piece + 2] ?? zeroSegment;
      const same = segment === zeroSegment
        ? (flags & keyFlagZero) !== 0
        : isDataKey(flags) && subtree.segment(index) === segment && subtree.genLow32(index) === table[piece + 4] &&
          subtree.segmentOffset(index) + (entryStart - subtree.start(index)) === (table[piece + 3] ?? 0) + (entryStart - pieceStart);
      if (!same) continue;
      if (runs.length > 0 && runs[runs.length - 1] === entryStart) runs[runs.length - 1] = entryEnd;
      else runs.push(entryStart, entryEnd);
    }
    ctx.index.release(subtree);
    return runs;
  }
}
