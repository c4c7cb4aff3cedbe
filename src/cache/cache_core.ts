// CacheCore: the parts of one open cache and the few rules that tie them together.
//
// It owns the cache device, the backing device, the segment table, the index, the kset log,
// the data head, writeback and GC, the persisted tails, the counters and the sticky failure.
// Request paths (cache_req.ts), writeback (cache_writeback.ts), GC (cache_gc.ts) and replay
// (cache_replay.ts) all work on a CacheCore; the public Cache (cache.ts) wraps it.
// Background work is kicked, never polled: a durable kset kicks writeback, an advanced
// dirty_tail kicks GC, a writer short of space kicks all three. With `background` off (tests
// and the crash simulator) nothing runs on its own except what a waiting writer needs.

import { assert } from '../lib/assert.js';
import { dataCrcKeyMaxBytes, segmentDataSizeBytes, subtreeSizeBytes } from '../ondisk/layout.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import type { Timers } from '../lib/timers.js';
import type { BlockDevice } from '../device/block_device.js';
import { CacheDev, type CacheMetadata } from './cache_dev.js';
import type { CacheTuning } from './cache_tuning.js';
import type { KsetLog, LogPos } from './cache_kset.js';
import { SegmentTable } from './cache_segment.js';
import { KeyIndex } from './cache_tree.js';
import type { DataHead, WriteGroup } from './cache_req.js';
import type { Writeback } from './cache_writeback.js';
import type { Gc } from './cache_gc.js';

export interface CacheStats {
  readRequests: number;
  readHitRequests: number;
  readMissRequests: number;
  readHitBytes: number;
  readMissBytes: number;
  writeRequests: number;
  writeBytes: number;
  zeroRequests: number;
  zeroBytes: number;
  flushRequests: number;
  /** Bytes appended to the log that writeback has not yet applied to the backing device. */
  dirtyBytes: number;
  ksetsWritten: number;
  writebackBytes: number;
  writebackKsets: number;
  writebackRounds: number;
  gcKsets: number;
  gcSegmentsFreed: number;
  staleKeysRemoved: number;
  fillsStored: number;
  fillsSkipped: number;
  cacheIoErrors: number;
  backingReadErrors: number;
  backingWriteErrors: number;
  dataCrcErrors: number;
  writebackErrors: number;
  gcErrors: number;
}

export function newStats(): CacheStats {
  return {
    readRequests: 0, readHitRequests: 0, readMissRequests: 0, readHitBytes: 0, readMissBytes: 0,
    writeRequests: 0, writeBytes: 0, zeroRequests: 0, zeroBytes: 0, flushRequests: 0,
    dirtyBytes: 0, ksetsWritten: 0, writebackBytes: 0, writebackKsets: 0, writebackRounds: 0,
    gcKsets: 0, gcSegmentsFreed: 0, staleKeysRemoved: 0, fillsStored: 0, fillsSkipped: 0,
    cacheIoErrors: 0, backingReadErrors: 0, backingWriteErrors: 0, dataCrcErrors: 0, writebackErrors: 0, gcErrors: 0,
  };
}

export type CacheState = 'running' | 'stopping' | 'stopped';

export interface CoreOptions {
  readonly dataCrc: boolean;
  readonly gcPercent: number;
  readonly readOnly: boolean;
  readonly background: boolean;
  readonly tuning: CacheTuning;
}

export class CacheCore {
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
  state: CacheState = 'running';
  /** Set once a metadata commit failed: every later flush, FUA and write fails with it. */
  failure: PcacheError | undefined;
  failureContext: string | undefined;
  /** Monotonic and wall-clock time the backing device was found offline; undefined while online. */
  backingOfflineSinceMs: number | undefined;
  backingOfflineSinceWallMs: number | undefined;
  backingOfflineReason: string | undefined;
  private admissionWaiters: (() => void)[] = [];
  /** Writers waiting for free space: while any do, writeback and GC run whatever the policy. */
  spaceWaiters = 0;
  keyTail: LogPos;
  dirtyTail: LogPos;
  /** The newest dirty_tail known durable on the cache device; GC never passes it. */
  durableDirtyTail: LogPos;
  private ticket = 0;
  // Set right after construction (they need the core themselves).
  log!: KsetLog;
  head!: DataHead;
  writes!: WriteGroup;
  writeback!: Writeback;
  gc!: Gc;

  constructor(parts: { dev: CacheDev; backing: BlockDevice; segments: SegmentTable; index: KeyIndex; timers: Timers; keyTail: LogPos; dirtyTail: LogPos }, options: CoreOptions) {
    this.dev = parts.dev;
    this.backing = parts.backing;
    this.segments = parts.segments;
    this.index = parts.index;
    this.timers = parts.timers;
    this.keyTail = parts.keyTail;
    this.dirtyTail = parts.dirtyTail;
    this.durableDirtyTail = parts.dirtyTail;
    this.dataCrc = options.dataCrc;
    this.keyMaxBytes = options.dataCrc ? dataCrcKeyMaxBytes : subtreeSizeBytes;
    this.gcPercent = options.gcPercent;
    this.readOnly = options.readOnly;
    this.background = options.background;
    this.tuning = options.tuning;
    this.lastWriteMs = parts.timers.now();
  }

  /** True once close or abandon began; re-read after every await (narrowing would hide a change). */
  stopped(): boolean {
    return this.state === 'stopped';
  }

  /** A fresh ticket for an EMPTY placeholder (never 0, wraps at 2^32). */
  nextTicket(): number {
    this.ticket = (this.ticket % 0xffff_fffe) + 1;
    return this.ticket;
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
    this.log.abort(this.failure);
    this.segments.wakeAll();
    this.wakeAdmission();
  }

  /** A writer (or the log) is short of free segments. */
  needSpace(): void {
    this.log.sealNow();
    this.writeback.kick(true);
    this.gc.kick(true);
  }

  /** Called when the log up to `durableHead` became durable. */
  logAdvanced(durableHead: LogPos): void {
    this.writeback.noteDurable(durableHead.lsn, this.timers.now());
    this.writeback.kick(false);
  }

  /** Called when dirty_tail moved forward. */
  dirtyTailAdvanced(): void {
    this.gc.kick(false);
  }

  /**
   * Called after a segment was taken from the free list. GC is started when the segments in
   * use reach gc_percent, not only when dirty_tail moves: after a drain, dirty_tail stands
   * still while new writes fill the cache, and without this kick GC would wait until a writer
   * ran out of space (and then make that writer wait).
   */
  segmentTaken(): void {
    if (this.segments.usedCount >= this.gcThresholdSegments) this.gc.kick(false);
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

  /** Writeback or recovery changed something a held write waits for. */
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

  /** Segments in use at which GC starts (dm-pcache: seg_total * gc_percent / 100). */
  get gcThresholdSegments(): number {
    return Math.floor((this.segments.count * this.gcPercent) / 100);
  }

  assertTailOrder(): void {
    assert(this.keyTail.lsn <= this.dirtyTail.lsn, 'key_tail passed dirty_tail');
    assert(this.dirtyTail.lsn <= this.log.durableHead.lsn, 'dirty_tail passed the durable log head');
  }
}

/** Builds the engine's parts over validated metadata; the caller replays and wires. */
export function buildCore(cacheDevice: BlockDevice, backingDevice: BlockDevice, metadata: CacheMetadata, options: { readOnly: boolean; background: boolean; timers: Timers; tuning: CacheTuning }): CacheCore {
  const dev = new CacheDev(cacheDevice, metadata);
  const segments = new SegmentTable(metadata.sb.segmentCount);
  metadata.gens.forEach((choice, segment) => { segments.gen[segment] = choice.value ?? 0; });
  const keyTail: LogPos = { segment: metadata.keyTail.value.segment, offsetBytes: metadata.keyTail.value.offsetBytes, lsn: 0 };
  assert(segmentDataSizeBytes(metadata.sb.segmentSizeBytes) === dev.dataSizeBytes, 'geometry mismatch');
  return new CacheCore(
    { dev, backing: backingDevice, segments, index: new KeyIndex(), timers: options.timers, keyTail, dirtyTail: keyTail },
    {
      dataCrc: metadata.cacheInfo.value.dataCrc,
      gcPercent: metadata.cacheInfo.value.gcPercent,
      readOnly: options.readOnly,
      background: options.background,
      tuning: options.tuning,
    },
  );
}

