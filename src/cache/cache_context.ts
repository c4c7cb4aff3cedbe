// CacheContext: the state one open cache shares between its parts — no parts themselves.
//
// It owns the cache device, the backing device, the segment table, the index, the clock, the
// counters, the knobs, the three log positions that writeback and GC move (key_tail,
// dirty_tail and the durable dirty_tail), the lifecycle state with its sticky failure, the
// backing device's offline state, and the writers waiting for space or admission.
// The parts (data head, kset log, write group, request paths, writeback, GC) are built after
// it, in that order, by CacheEngine (cache_engine.ts); each gets this context and the parts it
// uses, so nothing here refers to a part. What a part must hear from parts built after it
// arrives through Listeners: `failed` (abort what waits on the log), `spaceNeeded` (seal the
// open kset, make writeback and GC run now), `gcThresholdReached` and `dirtyTailAdvanced`.
// Invariants: key_tail <= dirty_tail (in log order); GC never passes durableDirtyTail; once
// `failure` is set it stays set until the process restarts.

import { assert } from '../lib/assert.js';
import { Listeners } from '../lib/listeners.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import type { Timers } from '../lib/timers.js';
import type { BlockDevice } from '../device/block_device.js';
import { dataCrcKeyMaxBytes, segmentDataSizeBytes, subtreeSizeBytes } from '../ondisk/layout.js';
import { CacheDev } from './cache_dev.js';
import { type CacheMetadata } from './cache_metadata.js';
import { SegmentTable } from './cache_segment.js';
import { KeyIndex } from './cache_index.js';
import { isDataKey } from './cache_tree.js';
import type { BackingState, CacheMode } from '../ondisk/cache_info.js';
import type { CacheTuning } from './cache_tuning.js';
import { newStats, type CacheStats, type LogPos } from './cache_types.js';

export type CacheLifecycle = 'running' | 'stopping' | 'stopped';

/**
 * Free segments GC keeps while the cache is mostly clean: the one data allocation leaves for
 * the log (logReserveSegments, cache_segment.ts). A fill that finds no other free segment is
 * skipped and starts GC, which frees the oldest clean segment in one round (and its second
 * chance copies hit data into the segments the round frees, cache_second_chance.ts).
 */
export const gcCleanReserveSegments = 1;
/** At most this share of the data capacity dirty, the cache counts as mostly clean (gcThresholdSegments). */
export const gcCleanDirtyPercentMax = 5;

export interface ContextOptions {
  readonly readOnly: boolean;
  /** Run writeback, GC and the kset timer on their own; tests and the crash simulator turn it off. */
  readonly background: boolean;
  readonly timers: Timers;
  readonly tuning: CacheTuning;
}

export class CacheContext {
  readonly dev: CacheDev;
  readonly backing: BlockDevice;
  readonly segments: SegmentTable;
  readonly index: KeyIndex;
  readonly timers: Timers;
  readonly stats: CacheStats = newStats();
  readonly dataCrc: boolean;
  /** Longest key the write path creates (shorter with data CRC, see dataCrcKeyMaxBytes). */
  readonly keyMaxBytes: number;
  readonly readOnly: boolean;
  readonly background: boolean;
  tuning: CacheTuning;
  gcPercent: number;
  /** Monotonic time of the last client write, write-zeroes or trim (idle writeback). */
  lastWriteMs: number;
  state: CacheLifecycle = 'running';
  /** Set once a metadata commit failed: every later flush, FUA and write fails with it. */
  failure: PcacheError | undefined;
  failureContext: string | undefined;
  /** Monotonic and wall-clock time the backing device was found offline; undefined while online. */
  backingOfflineSinceMs: number | undefined;
  backingOfflineSinceWallMs: number | undefined;
  backingOfflineReason: string | undefined;
  /** Writers waiting for free space: while any do, writeback and GC run whatever the policy. */
  spaceWaiters = 0;
  keyTail: LogPos;
  dirtyTail: LogPos;
  /** The newest dirty_tail known durable on the cache device; GC never passes it. */
  durableDirtyTail: LogPos;
  /**
   * Every kset up to this seq is durable (the kset log keeps it). The tails carry it when they
   * are written, so a replay that ends before it knows the log was damaged (cache_replay.ts).
   */
  logDurableSeq = 0;
  /** What cache_info records about the backing device (cache_backing.ts): 'unknown' while open. */
  backingState: BackingState;
  backingFingerprint: Uint8Array;
  /** The write mode (stored in cache_info; Cache.setMode changes it; cache_direct.ts says what each does). */
  mode: CacheMode;
  /** The cache failed (see fail); called with the sticky failure. */
  readonly failed = new Listeners<[PcacheError]>();
  /** A writer or the log is short of free segments. */
  readonly spaceNeeded = new Listeners();
  /** A segment was taken while the segments in use are at gc_percent or above. */
  readonly gcThresholdReached = new Listeners();
  /** Writeback moved dirty_tail (GC may have ksets to reclaim). */
  readonly dirtyTailAdvanced = new Listeners();
  private admissionWaiters: (() => void)[] = [];

  /** Builds the shared state over validated metadata; key_tail comes from it, and replay finds dirty_tail. */
  constructor(cacheDevice: BlockDevice, backingDevice: BlockDevice, metadata: CacheMetadata, options: ContextOptions) {
    this.dev = new CacheDev(cacheDevice, metadata);
    assert(segmentDataSizeBytes(metadata.sb.segmentSizeBytes) === this.dev.dataSizeBytes, 'geometry mismatch');
    this.backing = backingDevice;
    this.segments = new SegmentTable(metadata.sb.segmentCount);
    metadata.gens.forEach((choice, segment) => { this.segments.gen[segment] = choice.value ?? 0; });
    // An entry into a segment freed since it was written is no key: an insert may take its row.
    this.index = new KeyIndex((subtree, index) => isDataKey(subtree.flags(index)) && this.segments.genLow32(subtree.segment(index)) !== subtree.genLow32(index));
    this.timers = options.timers;
    // Version 1 tails carry no kset seq: the log's seqs then just count from 1.
    const keyTail: LogPos = { segment: metadata.keyTail.value.segment, offsetBytes: metadata.keyTail.value.offsetBytes, lsn: 0, seq: Math.max(1, metadata.keyTail.value.seq) };
    this.keyTail = keyTail;
    this.dirtyTail = keyTail;
    this.durableDirtyTail = keyTail;
    this.dataCrc = metadata.cacheInfo.value.dataCrc;
    this.keyMaxBytes = this.dataCrc ? dataCrcKeyMaxBytes : subtreeSizeBytes;
    this.gcPercent = metadata.cacheInfo.value.gcPercent;
    this.backingState = metadata.cacheInfo.value.backingState;
    this.backingFingerprint = metadata.cacheInfo.value.backingFingerprint;
    this.mode = metadata.cacheInfo.value.mode;
    this.readOnly = options.readOnly;
    this.background = options.background;
    this.tuning = options.tuning;
    this.lastWriteMs = options.timers.now();
  }

  /** True once close or abandon began; re-read after every await (narrowing would hide a change). */
  stopped(): boolean {
    return this.state === 'stopped';
  }

  /** Throws unless the cache accepts new requests that change data. */
  checkWritable(): void {
    if (this.state !== 'running') throw new PcacheError('ESHUTDOWN', 'the cache is shutting down');
    if (this.readOnly) throw new PcacheError('EPERM', 'the cache is open read-only');
    if (this.failure !== undefined) throw this.failure;
  }

  checkReadable(): void {
    if (this.state !== 'running') throw new PcacheError('ESHUTDOWN', 'the cache is shutting down');
  }

  /**
   * The sticky failure: a write or sync of the log or its metadata failed, so the cache no
   * longer knows what is durable. Everything that promises durability fails from now on;
   * reads go on. Only a restart (which re-runs recovery from what is on disk) clears it.
   */
  fail(error: unknown, context: string): void {
    if (!isPcacheError(error)) throw error;
    if (this.failure === undefined) {
      this.failure = new PcacheError('EIO', `cache device failed while ${context}: ${error.message}; restart pcache to recover`, { cause: error });
      this.failureContext = context;
      this.stats.cacheIoErrors++;
    }
    this.failed.call(this.failure);
    this.segments.wakeAll();
    this.wakeAdmission();
  }

  /** A writer (or the log) is short of free segments. */
  needSpace(): void {
    this.spaceNeeded.call();
  }

  /**
   * Called after a segment was taken from the free list, and when a fill found none. GC (and
   * writeback, when GC is starved) is started when the segments in use reach gc_percent, not
   * only when dirty_tail moves: after a drain, dirty_tail stands still while new writes fill
   * the cache, and without this GC would wait until a writer ran out of space (and then make
   * that writer wait); with reads alone, fills would be turned away until a write-idle second.
   */
  checkGcThreshold(): void {
    if (this.segments.usedCount >= this.gcThresholdSegments) this.gcThresholdReached.call();
  }

  /**
   * Segments in use at which GC starts: dm-pcache's seg_total * gc_percent / 100, which leaves
   * a writer room while writeback cleans the oldest data. A cache holding little dirty data (at
   * most gcCleanDirtyPercentMax of its data capacity) needs no such reserve: GC frees its
   * oldest, clean, segments in one round without waiting for writeback, so it fills up to
   * gcCleanReserveSegments free before it evicts, and a read cache uses nearly all of its device
   * instead of leaving the gc_percent reserve idle. gc_percent 0 keeps its meaning: reclaim as
   * soon as anything is reclaimable.
   */
  get gcThresholdSegments(): number {
    const count = this.segments.count;
    const reserved = Math.floor((count * this.gcPercent) / 100);
    if (!this.mostlyClean) return reserved;
    return Math.max(reserved, count - gcCleanReserveSegments);
  }

  /**
   * The cache holds little dirty data (a read cache) and gc_percent is not 0: GC lets it fill
   * up (gcThresholdSegments), and a full one admits only recurring misses (cache_admission.ts).
   */
  get mostlyClean(): boolean {
    return this.gcPercent !== 0 && this.stats.dirtyBytes * 100 <= this.dataCapacityBytes * gcCleanDirtyPercentMax;
  }

  /** Waits until a segment is freed, the cache stops, or the space wait times out. */
  async waitForSpace(startedMs: number): Promise<void> {
    this.checkWritable();
    const freed = this.segments.nextFree();
    this.spaceWaiters++;
    try {
      this.needSpace();
      await this.waitOrTimeOut(freed, startedMs, 'no free cache space');
    } finally {
      this.spaceWaiters--;
    }
  }

  /** Bytes of data the cache's segments can hold. */
  get dataCapacityBytes(): number {
    return this.segments.count * this.dev.dataSizeBytes;
  }

  /** Bytes of dirty data at which writes are held while the backing device is offline. */
  get dirtyHighWaterBytes(): number {
    return Math.floor((this.dataCapacityBytes * this.tuning.dirtyHighWaterPercent) / 100);
  }

  /**
   * Holds a write while the backing device is offline and dirty data has reached the high-water
   * mark: the cache keeps absorbing writes up to the mark, then applies back-pressure rather
   * than fill up with data it cannot write back. Never drops anything.
   */
  async admitWrite(startedMs: number): Promise<void> {
    while (this.backingOfflineSinceMs !== undefined && this.stats.dirtyBytes >= this.dirtyHighWaterBytes) {
      this.checkWritable();
      const changed = new Promise<void>((resolve) => { this.admissionWaiters.push(resolve); });
      await this.waitOrTimeOut(changed, startedMs, `the backing device is offline and ${this.stats.dirtyBytes} bytes are dirty`);
    }
  }

  /** Writeback, recovery or a knob changed something a held write waits for. */
  wakeAdmission(): void {
    const waiters = this.admissionWaiters;
    this.admissionWaiters = [];
    for (const wake of waiters) wake();
  }

  backingOffline(reason: string): void {
    if (this.backingOfflineSinceMs !== undefined) return;
    this.backingOfflineSinceMs = this.timers.now();
    this.backingOfflineSinceWallMs = this.timers.wallClockMs();
    this.backingOfflineReason = reason;
  }

  backingOnline(): void {
    if (this.backingOfflineSinceMs === undefined) return;
    this.backingOfflineSinceMs = undefined;
    this.backingOfflineSinceWallMs = undefined;
    this.backingOfflineReason = undefined;
    this.wakeAdmission();
  }

  private async waitOrTimeOut(event: Promise<void>, startedMs: number, what: string): Promise<void> {
    const limitMs = this.tuning.spaceWaitTimeoutMs;
    if (limitMs === 0) {
      await event;
      return;
    }
    const leftMs = limitMs - (this.timers.now() - startedMs);
    if (leftMs <= 0) throw new PcacheError('ETIMEDOUT', `${what}; gave up after ${limitMs} ms`);
    let timer: { cancel(): void } | undefined;
    const timedOut = new Promise<void>((resolve) => { timer = this.timers.after(leftMs, resolve); });
    await Promise.race([event, timedOut]);
    timer?.cancel();
  }

  assertKeyTailBehindDirtyTail(): void {
    assert(this.keyTail.lsn <= this.dirtyTail.lsn, 'key_tail passed dirty_tail');
  }
}
