// Small types every part of the engine shares: log positions, space taken for data, the
// counters, and the result of a device call that may complete synchronously. This module
// imports nothing from the rest of the engine, so any part may import it.

/**
 * A position in the log. `lsn` orders positions: bytes of log appended since replay began.
 * `seq` is the seq of the kset at the position (the next one to be written, at key_head): on
 * format version 2 devices the ksets carry it (kset.ts); on version 1 it only counts.
 */
export interface LogPos {
  readonly segment: number;
  readonly offsetBytes: number;
  readonly lsn: number;
  readonly seq: number;
}

export function samePosition(a: { segment: number; offsetBytes: number }, b: { segment: number; offsetBytes: number }): boolean {
  return a.segment === b.segment && a.offsetBytes === b.offsetBytes;
}

/** "segment:offset", as dm-pcache's status shows positions. */
export function formatPosition(pos: { segment: number; offsetBytes: number }): string {
  return `${pos.segment}:${pos.offsetBytes}`;
}

/**
 * The result of a cache-device call: undefined when the device completed it synchronously
 * (it offers blocking I/O), a promise otherwise, so the request path pays for a promise only
 * when the device really is asynchronous.
 */
export type Io = Promise<void> | undefined;

/** Space for one key's data at the data head, with a reference on its segment taken for the key. */
export interface Space {
  readonly segment: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly gen: number;
}

export interface CacheStats {
  readRequests: number;
  readHitRequests: number;
  readMissRequests: number;
  readHitBytes: number;
  readMissBytes: number;
  /** Reads (all cached, counted as hits) served by one backing read with the pieces not yet written back copied over it. */
  readGathers: number;
  /** Reads whose cached pieces were read in one batch on the cache device's own thread (cache_read.ts). */
  threadReadBatches: number;
  /** Fragmented reads stored again as one piece (cache_read_rewrite.ts), and the bytes published by them. */
  fragmentRewrites: number;
  fragmentRewriteBytes: number;
  writeRequests: number;
  writeBytes: number;
  zeroRequests: number;
  zeroBytes: number;
  flushRequests: number;
  /** Bytes appended to the log that writeback has not yet applied to the backing device. */
  dirtyBytes: number;
  ksetsWritten: number;
  /** Log bytes of dirty keys writeback has passed (written back, or superseded and skipped). */
  writebackBytes: number;
  /** Bytes writeback wrote to the backing device, and in how many writes. */
  writebackBackingBytes: number;
  writebackBackingWrites: number;
  /** Bytes writeback left out because newer keys superseded them. */
  writebackSkippedBytes: number;
  writebackKsets: number;
  writebackRounds: number;
  /**
   * Rounds whose window was merged in a private index before planning: skipping superseded
   * data was not allowed (strict ordering, an epoch end in or after the window), or the live
   * index alone could not tell what to write (cache_writeback_plan.ts).
   */
  writebackWindowsMerged: number;
  gcKsets: number;
  gcSegmentsFreed: number;
  staleKeysRemoved: number;
  fillsStored: number;
  fillsSkipped: number;
  /** Read requests whose misses were not stored: the write mode (passthrough) or the sequential cutoff said so. */
  fillsNotAdmitted: number;
  /** Read misses not stored because the cache was full and they had not missed recently (cache_admission.ts). */
  fillsNotRecurring: number;
  /** First misses a full read cache stored all the same, because its shadow caches found that storing every miss pays (cache_admission_shadow.ts). */
  fillsFirstMissStored: number;
  /** Keys and bytes GC re-logged instead of evicting them: read since they were stored (cache_second_chance.ts). */
  secondChanceKeys: number;
  secondChanceBytes: number;
  /** Requests that bypassed the cache because of the sequential cutoff (reads not admitted, writes sent to the backing device), and their bytes. */
  bypassCutoffRequests: number;
  bypassCutoffBytes: number;
  /** Requests that bypassed the cache because of the write mode, and their bytes. */
  bypassModeRequests: number;
  bypassModeBytes: number;
  /** Writes meant for the backing device that were cached instead: they overlapped dirty data. */
  bypassFallbacks: number;
  cacheIoErrors: number;
  backingReadErrors: number;
  backingWriteErrors: number;
  dataCrcErrors: number;
  writebackErrors: number;
  gcErrors: number;
}

export function newStats(): CacheStats {
  return {
    readRequests: 0, readHitRequests: 0, readMissRequests: 0, readHitBytes: 0, readMissBytes: 0, readGathers: 0, threadReadBatches: 0, fragmentRewrites: 0, fragmentRewriteBytes: 0,
    writeRequests: 0, writeBytes: 0, zeroRequests: 0, zeroBytes: 0, flushRequests: 0,
    dirtyBytes: 0, ksetsWritten: 0, writebackBytes: 0, writebackBackingBytes: 0, writebackBackingWrites: 0, writebackSkippedBytes: 0, writebackKsets: 0, writebackRounds: 0, writebackWindowsMerged: 0,
    gcKsets: 0, gcSegmentsFreed: 0, staleKeysRemoved: 0, fillsStored: 0, fillsSkipped: 0,
    fillsNotAdmitted: 0, fillsNotRecurring: 0, fillsFirstMissStored: 0, secondChanceKeys: 0, secondChanceBytes: 0, bypassCutoffRequests: 0, bypassCutoffBytes: 0, bypassModeRequests: 0, bypassModeBytes: 0, bypassFallbacks: 0,
    cacheIoErrors: 0, backingReadErrors: 0, backingWriteErrors: 0, dataCrcErrors: 0, writebackErrors: 0, gcErrors: 0,
  };
}
