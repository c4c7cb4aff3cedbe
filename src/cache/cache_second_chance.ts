// Second chance at GC: data read since it was stored is copied to the data head instead of
// being evicted (CLOCK/SIEVE on a log).
//
// Order in a GC round: GC walks its ksets, noting here the keys worth a copy; persists key_tail
// and syncs; then drops the references of the keys it passed, in log order, through
// relogAndPut, which copies each noted key just before its reference goes. The old place is
// thus still held while it is copied, and the segments freed by the puts before a key make room
// for its copy (a full read cache has no other free segment to copy into).
//
// GC evicts the oldest segments, whatever is read in them: plain FIFO. Every index entry has
// an in-memory reference bit (keyFlagReferenced, in its flags; never written to disk), set by
// a read hit. When GC passes a key whose data the index still holds, the bit is set and the
// cache is a read cache (the data is clean: GC passes only what writeback has passed), the
// data is re-logged: read from its old place, written at the data head, and published as a
// new CLEAN key (bit clear) in the index and the log, as a read miss is filled. The old key
// then goes as GC drops it. A re-logged key must be hit again before GC reaches it next time,
// or it is evicted: the clock hand is GC's walk.
// A segment nothing was read from (SegmentTable.hit) is passed without looking in the index.
// Which hits count: a hit also records the data head's hit epoch (DataHead.hitEpoch, about an
// eighth of a lap of the log; four in-memory bits of the flags). While the admission shadows
// find that recent hits alone pay (SecondChancePolicy: a working set that moves, where data hit
// before the move would stay a lap longer than it is worth), only data hit within
// secondChanceRecentEpochs of GC passing it is re-logged; otherwise any hit since it was stored.
//
// Bounds: every data byte GC passes earns secondChancePercentMax/100 bytes of copy credit, and
// re-logging spends it, so at most that share of what GC passes is copied (GC always frees
// space, and the copying costs at most that share of the write bandwidth eviction frees). The
// credit carries over between rounds, up to 1/secondChanceCreditDivisor of the cache's data, so a
// round that meets a run of hot keys can keep them all on what colder rounds left unspent.
// Nothing is re-logged when the data head has no free segment (re-logging is optional, as a
// fill is).
// Crash safety: a re-logged key is CLEAN and its data is on the backing device (GC only walks
// behind the durable dirty_tail, and the index still holding the key means nothing newer
// superseded it, so writeback wrote it). The new key's data is written before the key is
// appended, and the committer syncs data before the kset that holds the key (docs/design.md §3).
// A crash before that kset is durable only loses a clean copy. A write that lands while the
// data is copied wins: the copy is published only over index entries that still point at the
// old place. On a cache with data CRC, only whole original extents are re-logged, and only
// after their CRC matched, so a copy never launders corrupt data with a fresh CRC.

import { crc32c } from '../lib/crc32c.js';
import { isPcacheError } from '../lib/errors.js';
import { keyFlagClean, keyFlagZero, type KeyRecord } from '../ondisk/kset.js';
import type { CacheContext } from './cache_context.js';
import { hitEpochsPerLap, type DataHead } from './cache_data_head.js';
import type { KsetLog } from './cache_kset.js';
import { hitEpochOf, isDataKey, keyFlagReferenced, keyFromRecord, newIndexKey, subtreeEnd } from './cache_tree.js';

/** Share of the data bytes GC passes that it may re-log. */
export const secondChancePercentMax = 50;
/** Copy credit carried between rounds: at most this fraction (1/n) of the cache's data capacity. */
export const secondChanceCreditDivisor = 4;

/**
 * While the policy says recent hits only, a hit earns a copy only if it came within this many
 * hit epochs (each 1/hitEpochsPerLap of a lap) of GC passing the key: about half a lap.
 */
export const secondChanceRecentEpochs = hitEpochsPerLap / 2;

/** Which hits earn a copy: all since the key was stored (CLOCK), or recent ones only (the shadows' choice, cache_admission_shadow.ts). */
export interface SecondChancePolicy {
  readonly relogRecentOnly: boolean;
}

/** A piece of a key GC passes that the index still holds, hit since it was stored. */
interface Candidate {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly segment: number;
  readonly segmentOffsetBytes: number;
  readonly genLow32: number;
  /** Data CRC of the piece (a whole original extent), on caches with data CRC. */
  readonly crc: number;
  /** The index in GC's list of references to drop of the key this piece belongs to: copied before that one goes. */
  readonly putIndex: number;
}

/** Re-logging of hit data for one GC round at a time (see the file comment). */
export class SecondChance {
  private readonly ctx: CacheContext;
  private readonly log: KsetLog;
  private readonly head: DataHead;
  private candidates: Candidate[] = [];
  private passedBytes = 0;
  /** The sum of the noted pieces' lengths. */
  private candidateBytes = 0;
  /** Bytes GC may still re-log (see the file comment). */
  private creditBytes = 0;

  private readonly policy: SecondChancePolicy;

  constructor(ctx: CacheContext, log: KsetLog, head: DataHead, policy: SecondChancePolicy) {
    this.ctx = ctx;
    this.log = log;
    this.head = head;
    this.policy = policy;
  }

  /**
   * Bytes the noted pieces would copy at most: their sum, bounded by the credit the round will
   * have (GC's cut round of a read cache subtracts it from what it frees, cache_gc.ts).
   */
  copyBoundBytes(): number {
    const creditMax = Math.floor(this.ctx.dataCapacityBytes / secondChanceCreditDivisor);
    const credit = Math.min(creditMax, this.creditBytes + Math.floor((this.passedBytes * secondChancePercentMax) / 100));
    return Math.min(credit, this.candidateBytes);
  }

  /** Forgets what an earlier round noted (GC starts every round with this). */
  forget(): void {
    this.candidates = [];
    this.candidateBytes = 0;
    this.passedBytes = 0;
  }

  /**
   * GC passes `key`, a data key that holds a segment reference. Notes the pieces of it the
   * index still holds and that were hit since they were stored.
   */
  note(key: KeyRecord, putIndex: number): void {
    const ctx = this.ctx;
    this.passedBytes += key.lengthBytes;
    if ((key.flags & keyFlagZero) !== 0) return;
    // No read hit data in the segment since it was handed out: no reference bit to look for.
    // Under a write workload this skips the index walk for nearly every key GC passes.
    if (ctx.segments.hit[key.segment] === 0) return;
    const subtree = ctx.index.subtree(key.offsetBytes, false);
    if (subtree === undefined) return;
    const end = Math.min(key.offsetBytes + key.lengthBytes, subtreeEnd(key.offsetBytes));
    const genLow32 = key.gen % 0x1_0000_0000;
    const recentOnly = this.policy.relogRecentOnly;
    const epoch = this.head.hitEpoch;
    for (let index = subtree.seek(key.offsetBytes); index < subtree.count && subtree.start(index) < end; index++) {
      const flags = subtree.flags(index);
      if ((flags & keyFlagReferenced) === 0 || !isDataKey(flags)) continue;
      if (recentOnly && ((epoch - hitEpochOf(flags)) & 0xf) > secondChanceRecentEpochs) continue;
      const start = subtree.start(index);
      if (subtree.segment(index) !== key.segment || subtree.genLow32(index) !== genLow32) continue;
      if (subtree.segmentOffset(index) !== key.segmentOffsetBytes + (start - key.offsetBytes)) continue;
      let crc = 0;
      if (ctx.dataCrc) {
        const row = subtree.read(index, newIndexKey());
        if (row.crcDeltaBytes !== 0 || row.crcLengthBytes !== row.lengthBytes) continue;
        crc = row.crc;
      }
      this.candidateBytes += subtree.length(index);
      this.candidates.push({ offsetBytes: start, lengthBytes: subtree.length(index), segment: key.segment, segmentOffsetBytes: subtree.segmentOffset(index), genLow32, crc, putIndex });
    }
  }

  /**
   * Drops GC's references (`put` each of `segments`, in order), first copying the noted pieces of
   * each key while credit lasts; forgets the round. Returns the bytes re-logged. A piece that
   * cannot be copied (no free segment, the cache stopping, an I/O error) is evicted; every
   * reference is dropped whatever happens, or its segment would never be freed.
   */
  async relogAndPut(segments: readonly number[], put: (segment: number) => void): Promise<number> {
    const candidates = this.candidates;
    const creditMax = Math.floor(this.ctx.dataCapacityBytes / secondChanceCreditDivisor);
    this.creditBytes = Math.min(creditMax, this.creditBytes + Math.floor((this.passedBytes * secondChancePercentMax) / 100));
    this.forget();
    let relogged = 0;
    let next = 0;
    let putCount = 0;
    try {
      for (let index = 0; index < segments.length; index++) {
        for (; next < candidates.length && candidates[next]?.putIndex === index; next++) {
          const candidate = candidates[next];
          if (candidate === undefined || candidate.lengthBytes > this.creditBytes) continue;
          const copied = await this.copy(candidate);
          this.creditBytes -= copied;
          relogged += copied;
        }
        put(segments[index] ?? -1);
        putCount = index + 1;
      }
    } finally {
      for (let index = putCount; index < segments.length; index++) put(segments[index] ?? -1);
    }
    return relogged;
  }

  /** Copies one piece to the data head and publishes it; returns the bytes published (0 when there was no room). */
  private async copy(candidate: Candidate): Promise<number> {
    const ctx = this.ctx;
    const data = new Uint8Array(candidate.lengthBytes);
    try {
      const io = ctx.dev.readData(data, candidate.segment, candidate.segmentOffsetBytes);
      if (io !== undefined) await io;
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      ctx.stats.cacheIoErrors++;
      return 0;
    }
    if (ctx.dataCrc && crc32c(data) !== candidate.crc) return 0; // a read hit reports it; never copy it
    let published = 0;
    for (let done = 0; done < candidate.lengthBytes;) {
      // A full log is committing: wait for room, as a writer does (a fill would give up, but
      // GC re-logs a whole run of hot keys at once, more than the sealed ksets the log queues).
      if (this.log.full) await this.log.roomAvailable();
      if (ctx.state !== 'running' || ctx.failure !== undefined) return published;
      const space = this.head.alloc(Math.min(candidate.lengthBytes - done, ctx.keyMaxBytes));
      if (space === undefined) return published;
      const bytes = data.subarray(done, done + space.lengthBytes);
      try {
        const io = ctx.dev.writeData(bytes, space.segment, space.offsetBytes);
        if (io !== undefined) await io;
        if (this.head.genWrite !== undefined) await this.head.genWrite;
      } catch (error) {
        ctx.segments.put(space.segment);
        if (!isPcacheError(error)) throw error;
        ctx.stats.cacheIoErrors++;
        return published;
      }
      published += this.publish(candidate, candidate.offsetBytes + done, bytes, space);
      done += space.lengthBytes;
    }
    return published;
  }

  /**
   * Points the index entries over [start, start + bytes.length) that still hold the
   * candidate's old place at `space`, as CLEAN keys appended to the log; entries a write
   * replaced or cut away meanwhile keep the newer data. Each key takes its own reference
   * (the allocation took one). Returns the bytes published.
   */
  private publish(candidate: Candidate, start: number, bytes: Uint8Array, space: { segment: number; offsetBytes: number; gen: number }): number {
    const ctx = this.ctx;
    const end = start + bytes.length;
    const subtree = ctx.index.subtree(start, false);
    const pieces: { offsetBytes: number; lengthBytes: number }[] = [];
    if (subtree !== undefined) {
      for (let index = subtree.seek(start); index < subtree.count && subtree.start(index) < end; index++) {
        const rowStart = subtree.start(index);
        if (!isDataKey(subtree.flags(index)) || subtree.segment(index) !== candidate.segment || subtree.genLow32(index) !== candidate.genLow32) continue;
        if (subtree.segmentOffset(index) !== candidate.segmentOffsetBytes + (rowStart - candidate.offsetBytes)) continue;
        const pieceStart = Math.max(rowStart, start);
        pieces.push({ offsetBytes: pieceStart, lengthBytes: Math.min(subtree.end(index), end) - pieceStart });
      }
      ctx.index.release(subtree);
    }
    let references = 1; // alloc took one for us
    let published = 0;
    const key = newIndexKey();
    for (const piece of pieces) {
      const delta = piece.offsetBytes - start;
      const pieceData = bytes.subarray(delta, delta + piece.lengthBytes);
      if (references === 0) ctx.segments.get(space.segment);
      else references--;
      const record: KeyRecord = {
        offsetBytes: piece.offsetBytes,
        lengthBytes: piece.lengthBytes,
        flags: keyFlagClean,
        segment: space.segment,
        segmentOffsetBytes: space.offsetBytes + delta,
        gen: space.gen,
        dataCrc: ctx.dataCrc ? crc32c(pieceData) : 0,
      };
      ctx.index.insert(keyFromRecord(key, record));
      this.log.append(record);
      published += piece.lengthBytes;
    }
    if (references > 0) ctx.segments.put(space.segment);
    ctx.stats.secondChanceKeys += pieces.length;
    ctx.stats.secondChanceBytes += published;
    return published;
  }
}
