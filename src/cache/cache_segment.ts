// The cache's segments: what each one is used for, how many keys point into it, its
// generation, and the pool of free segments.
//
// A segment is free, a data segment (holding cached extents) or a log segment (holding
// ksets). Invariants:
// - refs[s] counts the keys in the log (written or still in an open kset) whose data lives in
//   data segment s and whose generation equals gen[s], plus one while s is the data head.
//   A data segment returns to the pool exactly when its count drops to zero.
// - Counts drop only after the reason is durable (garbage collection persists key_tail and
//   syncs before dropping the references of the keys it passed), so a freed segment is never
//   still needed by a key that recovery could replay.
// - gen[s] increases when s is freed (every index entry into s becomes stale at once) and
//   again when s is handed out; the new value is written to disk before anything that records
//   it can be durable (see cache_kset.ts and cache_data_head.ts for the two orders that ensure it).
// - dirtySeq[s] is at least the seq of every kset holding a dirty (not CLEAN, not ZERO) key whose
//   data lives in s. Once dirty_tail's seq passes it, every key into s has been written back, so
//   the backing device holds what those keys hold (a read may take it from there: cache_read_gather.ts).
//   It only grows (seqs do), so after s is reused it stays an upper bound.
// - hit[s] is 1 once a read hit data in s since s was last handed out (0 again on allocate).
//   While it is 0 no index entry into s has its reference bit set, so GC's second chance need
//   not look in the index for the keys it passes there (cache_second_chance.ts).
// - One free segment is held back for the log (logReserveSegments): data allocation never
//   takes it, so the log can always move on to a new segment and let writeback and GC run.

import { assert } from '../lib/assert.js';

export const segmentKindFree = 0;
export const segmentKindData = 1;
export const segmentKindLog = 2;
export type SegmentKind = typeof segmentKindFree | typeof segmentKindData | typeof segmentKindLog;

/** Free segments that data allocation leaves for the log. */
export const logReserveSegments = 1;

export class SegmentTable {
  readonly count: number;
  readonly gen: Float64Array;
  readonly refs: Uint32Array;
  readonly kind: Uint8Array;
  /** The newest kset seq known to hold a dirty key into each segment (see the file comment). */
  readonly dirtySeq: Float64Array;
  /** Whether a read hit data in each segment since it was handed out (see the file comment). */
  readonly hit: Uint8Array;
  /** Free segments in the order they were freed (a ring buffer). */
  private readonly freeRing: Uint32Array;
  private freeStart = 0;
  private freeCountValue = 0;
  private waiters: (() => void)[] = [];

  constructor(count: number) {
    assert(count > logReserveSegments + 1, 'too few segments');
    this.count = count;
    this.gen = new Float64Array(count);
    this.refs = new Uint32Array(count);
    this.kind = new Uint8Array(count);
    this.dirtySeq = new Float64Array(count);
    this.hit = new Uint8Array(count);
    this.freeRing = new Uint32Array(count);
  }

  get freeCount(): number {
    return this.freeCountValue;
  }

  get usedCount(): number {
    return this.count - this.freeCountValue;
  }

  /** After replay: every segment that is neither log nor referenced data joins the pool. */
  rebuildFreePool(): void {
    this.freeStart = 0;
    this.freeCountValue = 0;
    for (let segment = 0; segment < this.count; segment++) {
      if (this.kind[segment] === segmentKindData && this.refs[segment] === 0) this.kind[segment] = segmentKindFree;
      if (this.kind[segment] === segmentKindFree) this.pushFree(segment);
    }
  }

  /**
   * Takes a free segment for `kind`, bumping its generation; returns undefined when the pool
   * is down to the log's reserve (for data) or empty (for the log). The caller persists the
   * new generation.
   */
  allocate(kind: typeof segmentKindData | typeof segmentKindLog): number | undefined {
    const keep = kind === segmentKindData ? logReserveSegments : 0;
    if (this.freeCountValue <= keep) return undefined;
    const segment = this.freeRing[this.freeStart];
    assert(segment !== undefined, 'free ring out of bounds');
    this.freeStart = (this.freeStart + 1) % this.count;
    this.freeCountValue--;
    assert(this.kind[segment] === segmentKindFree, 'segment handed out twice', segment);
    assert(this.refs[segment] === 0, 'free segment has references', segment);
    this.kind[segment] = kind;
    this.gen[segment] = (this.gen[segment] ?? 0) + 1;
    this.hit[segment] = 0;
    return segment;
  }

  get(segment: number): void {
    assert(this.kind[segment] === segmentKindData, 'reference to a segment that holds no data', segment);
    this.refs[segment] = (this.refs[segment] ?? 0) + 1;
  }

  /** Drops one reference; frees the segment when none are left. Returns whether it was freed. */
  put(segment: number): boolean {
    const refs = this.refs[segment] ?? 0;
    assert(refs > 0, 'segment reference count underflow', segment);
    assert(this.kind[segment] === segmentKindData, 'dropping a reference to a segment that holds no data', segment);
    this.refs[segment] = refs - 1;
    if (refs > 1) return false;
    this.free(segment);
    return true;
  }

  /** Returns a log segment the log has left behind, or a data segment with no references. */
  free(segment: number): void {
    assert(this.kind[segment] !== segmentKindFree, 'segment freed twice', segment);
    assert(this.refs[segment] === 0, 'freeing a segment that still has references', segment);
    this.kind[segment] = segmentKindFree;
    this.gen[segment] = (this.gen[segment] ?? 0) + 1;
    this.pushFree(segment);
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }

  /** Resolves at the next free(); used by writers waiting for space. */
  nextFree(): Promise<void> {
    return new Promise((resolve) => { this.waiters.push(resolve); });
  }

  /** Wakes everyone waiting for space (shutdown, failure) so they can re-check and give up. */
  wakeAll(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }

  /** A dirty key into `segment` went into the kset `seq` (seqs only grow). */
  noteDirty(segment: number, seq: number): void {
    if (seq > (this.dirtySeq[segment] ?? 0)) this.dirtySeq[segment] = seq;
  }

  genLow32(segment: number): number {
    return (this.gen[segment] ?? 0) % 0x1_0000_0000;
  }

  private pushFree(segment: number): void {
    assert(this.freeCountValue < this.count, 'free ring overflow');
    this.freeRing[(this.freeStart + this.freeCountValue) % this.count] = segment;
    this.freeCountValue++;
  }
}
