// The in-memory range index: which cached extent holds each byte of the backing device.
//
// The backing device's address space is cut into 4 MiB subtrees. A subtree holds its keys
// sorted by offset in typed arrays: a row of nine u32 per key (36 bytes), which keeps the
// index compact — caches of hundreds of GiB hold tens of millions of keys — plus a dense
// column of key ends (4 bytes per key) that lookups search. The search touches one 4 KiB
// array instead of 36 KiB of rows: over the rows, every step of a bisection was a cache miss,
// and it was the largest single cost of a 4 KiB write in user space (docs/performance.md).
// Invariants of every subtree:
// - keys are sorted by offset and never overlap; every key lies inside the subtree;
// - ends[i] is always row i's offset + length (every row mutation goes through this file);
// - inserting a key cuts, splits or deletes whatever it overlaps (newer data wins).
// Keys are data keys (dirty or CLEAN), ZERO keys (no data), or EMPTY placeholders for an
// in-flight read miss, whose `segment` column holds the miss's ticket instead of a segment.
// Stale keys (segment generation moved on) are left in place and removed lazily by readers
// and by `sweepStale`.

import { assert } from '../lib/assert.js';
import { keyFlagClean, keyFlagEmpty, keyFlagZero, type KeyRecord } from '../ondisk/kset.js';
import { subtreeSizeBytes } from '../ondisk/layout.js';

const colOffset = 0; // offset inside the subtree
const colLength = 1;
const colFlags = 2;
const colSegment = 3; // data segment, or the ticket of an EMPTY placeholder
const colSegmentOffset = 4;
const colGen = 5; // low 32 bits of the data segment's generation at allocation
const colCrc = 6; // CRC32C of the key's original extent (data CRC caches only)
const colCrcDelta = 7; // bytes cut from the front of the original extent since
const colCrcLength = 8; // length of the original extent
const stride = 9;

const capacityInitialKeys = 4;
/** Up to this many ends are moved by a loop: copyWithin's call costs more than copying them. */
const endsCopyLoopMax = 32;
/** Keys are whole sectors, so a 4 MiB subtree never holds more than this many. */
const capacityMaxKeys = subtreeSizeBytes / 512;

/** An extent as the index stores it; offsets are absolute byte offsets on the backing device. */
export interface IndexKey {
  offsetBytes: number;
  lengthBytes: number;
  flags: number;
  segment: number;
  segmentOffsetBytes: number;
  gen: number;
  crc: number;
  crcDeltaBytes: number;
  crcLengthBytes: number;
}

export function newIndexKey(): IndexKey {
  return { offsetBytes: 0, lengthBytes: 0, flags: 0, segment: 0, segmentOffsetBytes: 0, gen: 0, crc: 0, crcDeltaBytes: 0, crcLengthBytes: 0 };
}

/** Fills `out` from a key record, as a whole (uncut) extent; returns `out`. */
export function keyFromRecord(out: IndexKey, record: KeyRecord): IndexKey {
  out.offsetBytes = record.offsetBytes;
  out.lengthBytes = record.lengthBytes;
  out.flags = record.flags;
  out.segment = record.segment;
  out.segmentOffsetBytes = record.segmentOffsetBytes;
  out.gen = record.gen;
  out.crc = record.dataCrc;
  out.crcDeltaBytes = 0;
  out.crcLengthBytes = record.lengthBytes;
  return out;
}

/** The end of the 4 MiB subtree holding `offsetBytes`: no key crosses it. */
export function subtreeEnd(offsetBytes: number): number {
  return Math.floor(offsetBytes / subtreeSizeBytes) * subtreeSizeBytes + subtreeSizeBytes;
}

/**
 * In-memory flag of an index entry, never written to disk: a read hit it since it was stored
 * (the reference bit GC's second chance looks at, cache_second_chance.ts). On-disk flags are
 * the low bits (kset.ts); anything that turns an entry into a key record leaves this one out.
 */
export const keyFlagReferenced = 1 << 8;
/**
 * In-memory bits 9-12 of an index entry's flags, never written to disk: the data head's epoch
 * (DataHead.hitEpoch, modulo 16) at the entry's last read hit, which tells GC's second chance
 * how long ago that hit was (cache_second_chance.ts).
 */
export const keyHitEpochShift = 9;
export const keyHitEpochMask = 0xf << keyHitEpochShift;
/** The flags an index entry has only in memory: left out of every key record. */
export const keyFlagsInMemory = keyFlagReferenced | keyHitEpochMask;

/** The hit epoch (modulo 16) recorded in an index entry's flags. */
export function hitEpochOf(flags: number): number {
  return (flags & keyHitEpochMask) >>> keyHitEpochShift;
}

export function isDataKey(flags: number): boolean {
  return (flags & (keyFlagEmpty | keyFlagZero)) === 0;
}

/** Whether row `index` of `subtree` is stale (or, for removeWhere, is to go). */
export type StaleRow = (subtree: Subtree, index: number) => boolean;

export class Subtree {
  readonly baseBytes: number;
  count = 0;
  private cols = new Uint32Array(stride * capacityInitialKeys);
  /** Relative end (offset + length) of every key, dense: what seek() searches. */
  private ends = new Uint32Array(capacityInitialKeys);

  constructor(baseBytes: number) {
    this.baseBytes = baseBytes;
  }

  start(index: number): number {
    return this.baseBytes + this.at(index, colOffset);
  }

  end(index: number): number {
    return this.baseBytes + (this.ends[index] ?? 0);
  }

  length(index: number): number {
    return this.at(index, colLength);
  }

  flags(index: number): number {
    return this.at(index, colFlags);
  }

  /** Sets the reference bit of key `index` (a read hit it) and records the hit's `epoch` (DataHead.hitEpoch). */
  markReferenced(index: number, epoch: number): void {
    const at = index * stride + colFlags;
    this.cols[at] = ((this.cols[at] ?? 0) & ~keyHitEpochMask) | keyFlagReferenced | ((epoch & 0xf) << keyHitEpochShift);
  }

  segment(index: number): number {
    return this.at(index, colSegment);
  }

  segmentOffset(index: number): number {
    return this.at(index, colSegmentOffset);
  }

  genLow32(index: number): number {
    return this.at(index, colGen);
  }

  /** Copies key `index` into `out` (absolute offsets). */
  read(index: number, out: IndexKey): IndexKey {
    assert(index >= 0 && index < this.count, 'subtree index out of range');
    const at = index * stride;
    const c = this.cols;
    out.offsetBytes = this.baseBytes + (c[at + colOffset] ?? 0);
    out.lengthBytes = c[at + colLength] ?? 0;
    out.flags = c[at + colFlags] ?? 0;
    out.segment = c[at + colSegment] ?? 0;
    out.segmentOffsetBytes = c[at + colSegmentOffset] ?? 0;
    out.gen = c[at + colGen] ?? 0;
    out.crc = c[at + colCrc] ?? 0;
    out.crcDeltaBytes = c[at + colCrcDelta] ?? 0;
    out.crcLengthBytes = c[at + colCrcLength] ?? 0;
    return out;
  }

  /**
   * Index of the first key that ends after `offsetBytes` (count if none).
   *
   * Starts from where the key would be if the subtree's keys were spread evenly, and gallops
   * from there to bracket the answer before bisecting. A subtree full of equal keys (random 4 KiB
   * writes fill them so) answers in two probes; a plain bisection of 1,024 keys takes ten, each
   * a likely branch miss.
   */
  seek(offsetBytes: number): number {
    const relative = offsetBytes - this.baseBytes;
    const count = this.count;
    const ends = this.ends;
    if (count === 0) return 0;
    // The answer lies in [low, high].
    let low = 0;
    let high = count;
    const guess = Math.min(count - 1, Math.floor((relative * count) / subtreeSizeBytes));
    if ((ends[guess] ?? 0) > relative) {
      high = guess;
      for (let step = 1; ; step *= 2) {
        const probe = high - step;
        if (probe < 0) break;
        if ((ends[probe] ?? 0) <= relative) {
          low = probe + 1;
          break;
        }
        high = probe;
      }
    } else {
      low = guess + 1;
      for (let step = 1; ; step *= 2) {
        const probe = low + step - 1;
        if (probe >= count) break;
        if ((ends[probe] ?? 0) > relative) {
          high = probe;
          break;
        }
        low = probe + 1;
      }
    }
    while (low < high) {
      const mid = (low + high) >>> 1;
      if ((ends[mid] ?? 0) > relative) high = mid;
      else low = mid + 1;
    }
    return low;
  }

  /**
   * Inserts `key`, resolving every overlap in favour of the new key. The cases, with K the
   * new key and T an existing one:
   *
   *   T contains K:      T |=========|      T keeps its front, K goes in, and a copy of T
   *                      K    |===|         cut to start at K's end follows: three keys.
   *
   *   T overlaps K's     T |=====|          T is cut back to end where K starts.
   *   head:              K    |=====|
   *
   *   T inside K:        T    |===|         T is deleted.
   *                      K  |=======|
   *
   *   T overlaps K's     T      |=====|     T is cut at the front to start where K ends.
   *   tail:              K  |=====|
   *
   *   T before or after K: untouched.
   */
  insert(key: IndexKey, isStale?: StaleRow): void {
    const keyStart = key.offsetBytes - this.baseBytes;
    const keyEnd = keyStart + key.lengthBytes;
    assert(keyStart >= 0 && keyEnd <= subtreeSizeBytes && key.lengthBytes > 0, 'key outside its subtree');
    let first = this.seek(key.offsetBytes);
    if (first < this.count && this.at(first, colOffset) < keyStart) {
      if ((this.ends[first] ?? 0) > keyEnd) {
        // T contains K: split T around K.
        this.makeRoom(first + 1, 2);
        this.copyRow(first, first + 2);
        this.cutFront(first + 2, keyEnd);
        this.store(first + 1, key);
        this.cutBack(first, keyStart);
        return;
      }
      // T overlaps K's head.
      this.cutBack(first, keyStart);
      first++;
    }
    let last = first;
    while (last < this.count && (this.ends[last] ?? 0) <= keyEnd) last++;
    // Keys first .. last-1 lie inside K. Key `last`, if it starts before K's end, overlaps K's tail.
    if (last < this.count && this.at(last, colOffset) < keyEnd) this.cutFront(last, keyEnd);
    if (last === first && isStale !== undefined) {
      // K lands in a gap. A stale neighbour is no key at all (its segment was freed): K takes
      // its row, which keeps the order (K lies between the rows either side) and moves nothing,
      // where opening a row moves every row after it.
      if (first < this.count && isStale(this, first)) {
        this.store(first, key);
        return;
      }
      if (first > 0 && isStale(this, first - 1)) {
        this.store(first - 1, key);
        return;
      }
    }
    this.replace(first, last - first, key);
  }

  /** Removes every key `remove` picks, in one pass over the rows; returns how many went. */
  removeWhere(remove: StaleRow): number {
    const count = this.count;
    let kept = 0;
    for (let index = 0; index < count; index++) {
      if (remove(this, index)) continue;
      if (kept !== index) this.copyRow(index, kept);
      kept++;
    }
    this.count = kept;
    this.maybeShrink();
    return count - kept;
  }

  /** Removes key `index`. */
  removeAt(index: number): void {
    assert(index >= 0 && index < this.count, 'subtree index out of range');
    this.moveRows(index + 1, index);
    this.count--;
    this.maybeShrink();
  }

  /** Turns an EMPTY placeholder (or its front part) into a CLEAN data key in place. */
  fillPlaceholder(index: number, fill: { lengthBytes: number; segment: number; segmentOffsetBytes: number; gen: number; crc: number }): void {
    assert((this.at(index, colFlags) & keyFlagEmpty) !== 0, 'filling a key that is not a placeholder');
    const length = this.at(index, colLength);
    assert(fill.lengthBytes > 0 && fill.lengthBytes <= length, 'fill longer than its placeholder');
    if (fill.lengthBytes < length) {
      // Split: the front becomes CLEAN, the rest stays a placeholder with the same ticket.
      this.makeRoom(index + 1, 1);
      this.copyRow(index, index + 1);
      this.set(index + 1, colOffset, this.at(index, colOffset) + fill.lengthBytes);
      this.set(index + 1, colLength, length - fill.lengthBytes);
      this.set(index, colLength, fill.lengthBytes);
      this.ends[index] = this.at(index, colOffset) + fill.lengthBytes;
    }
    this.set(index, colFlags, keyFlagClean);
    this.set(index, colSegment, fill.segment);
    this.set(index, colSegmentOffset, fill.segmentOffsetBytes);
    this.set(index, colGen, fill.gen % 0x1_0000_0000);
    this.set(index, colCrc, fill.crc);
    this.set(index, colCrcDelta, 0);
    this.set(index, colCrcLength, fill.lengthBytes);
  }

  /** Heap bytes this subtree's key storage occupies. */
  get storageBytes(): number {
    return this.cols.byteLength + this.ends.byteLength;
  }

  private at(index: number, column: number): number {
    return this.cols[index * stride + column] ?? 0;
  }

  private set(index: number, column: number, value: number): void {
    this.cols[index * stride + column] = value;
  }

  private store(index: number, key: IndexKey): void {
    const at = index * stride;
    const c = this.cols;
    c[at + colOffset] = key.offsetBytes - this.baseBytes;
    c[at + colLength] = key.lengthBytes;
    c[at + colFlags] = key.flags;
    c[at + colSegment] = key.segment;
    c[at + colSegmentOffset] = key.segmentOffsetBytes;
    c[at + colGen] = key.gen % 0x1_0000_0000;
    c[at + colCrc] = key.crc;
    c[at + colCrcDelta] = key.crcDeltaBytes;
    c[at + colCrcLength] = key.crcLengthBytes;
    this.ends[index] = key.offsetBytes - this.baseBytes + key.lengthBytes;
  }

  /** Copies row `from` (and its end) over row `to`. */
  private copyRow(from: number, to: number): void {
    this.cols.copyWithin(to * stride, from * stride, (from + 1) * stride);
    this.ends[to] = this.ends[from] ?? 0;
  }

  /** Moves rows `from` .. count-1 (and their ends) to start at `to`. */
  private moveRows(from: number, to: number): void {
    const moved = this.count - from;
    if (moved <= 0) return;
    this.cols.copyWithin(to * stride, from * stride, this.count * stride);
    const ends = this.ends;
    if (moved > endsCopyLoopMax) {
      ends.copyWithin(to, from, this.count);
    } else if (to > from) {
      for (let i = moved - 1; i >= 0; i--) ends[to + i] = ends[from + i] ?? 0;
    } else {
      for (let i = 0; i < moved; i++) ends[to + i] = ends[from + i] ?? 0;
    }
  }

  /** Cuts key `index` so that it starts at `newStart` (relative); data keys move their data pointer along. */
  private cutFront(index: number, newStart: number): void {
    const start = this.at(index, colOffset);
    const delta = newStart - start;
    assert(delta > 0 && delta < this.at(index, colLength), 'front cut out of range');
    // The end stays where it was.
    this.set(index, colOffset, newStart);
    this.set(index, colLength, this.at(index, colLength) - delta);
    if (isDataKey(this.at(index, colFlags))) {
      this.set(index, colSegmentOffset, this.at(index, colSegmentOffset) + delta);
      this.set(index, colCrcDelta, this.at(index, colCrcDelta) + delta);
    }
  }

  /** Cuts key `index` so that it ends at `newEnd` (relative). */
  private cutBack(index: number, newEnd: number): void {
    const start = this.at(index, colOffset);
    assert(newEnd > start && newEnd < start + this.at(index, colLength), 'back cut out of range');
    this.set(index, colLength, newEnd - start);
    this.ends[index] = newEnd;
  }

  /** Replaces `removeCount` keys at `index` with `key`. */
  private replace(index: number, removeCount: number, key: IndexKey): void {
    if (removeCount === 0) {
      this.makeRoom(index, 1);
    } else if (removeCount > 1) {
      this.moveRows(index + removeCount, index + 1);
      this.count -= removeCount - 1;
    }
    this.store(index, key);
  }

  /** Opens `slots` empty slots at `index`, growing the storage if needed. */
  private makeRoom(index: number, slots: number): void {
    const needed = this.count + slots;
    assert(needed <= capacityMaxKeys, 'subtree holds more keys than sectors');
    if (needed * stride > this.cols.length) {
      let capacity = this.cols.length / stride;
      while (capacity < needed) capacity *= 2;
      capacity = Math.min(capacity, capacityMaxKeys);
      const grown = new Uint32Array(capacity * stride);
      grown.set(this.cols.subarray(0, this.count * stride));
      this.cols = grown;
      const grownEnds = new Uint32Array(capacity);
      grownEnds.set(this.ends.subarray(0, this.count));
      this.ends = grownEnds;
    }
    this.moveRows(index, index + slots);
    this.count = needed;
  }

  private maybeShrink(): void {
    let capacity = this.cols.length / stride;
    if (capacity > capacityInitialKeys * 4 && this.count * 4 < capacity) {
      while (capacity > capacityInitialKeys * 4 && this.count * 4 < capacity) capacity /= 2;
      const shrunk = new Uint32Array(capacity * stride);
      shrunk.set(this.cols.subarray(0, this.count * stride));
      this.cols = shrunk;
      const shrunkEnds = new Uint32Array(capacity);
      shrunkEnds.set(this.ends.subarray(0, this.count));
      this.ends = shrunkEnds;
    }
  }
}
