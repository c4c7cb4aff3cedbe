// CacheTuning: the runtime knobs of an open cache — writeback watermarks, idle and age limits,
// the dirty high-water mark, when the backing device counts as offline, how long a held write
// may wait, the sequential cutoff, when a fragmented read goes to the backing device or is
// rewritten — with their defaults and the one check of a complete set.
//
// This module imports nothing, so the command line can know the defaults (`serve --tuning`,
// `pcache set`) without loading the engine.

/** Runtime knobs of an open cache (not stored on disk; `Cache.setTuning` changes them). */
export interface CacheTuning {
  /** How long a write may be held (no free space, or the backing device offline at the dirty high-water mark) before it fails with ETIMEDOUT; 0 holds it until it can go on. */
  readonly spaceWaitTimeoutMs: number;
  /** While the backing device is offline, writes are held once dirty data reaches this percentage of the cache's data capacity. */
  readonly dirtyHighWaterPercent: number;
  /** Writeback failing without a break for this long marks the backing device offline (ENODEV marks it at once). */
  readonly backingOfflineAfterMs: number;
  /** Writeback starts when dirty data reaches this percentage of the cache's data capacity... */
  readonly writebackStartPercent: number;
  /** ...and once started goes on until dirty data is down to this percentage. 0 and 0: write back at once, always. */
  readonly writebackStopPercent: number;
  /** After this long without a client write, everything dirty is written back. */
  readonly writebackIdleMs: number;
  /** Data dirty for longer than this is written back even while clients keep writing. */
  readonly writebackMaxAgeMs: number;
  /**
   * strict: the backing device alone always holds a prefix of the client's flush epochs (the
   * last one possibly in part); a writeback round never crosses an epoch boundary, and skips
   * superseded data only within the epoch still open. relaxed: rounds cross epoch boundaries
   * and skip any superseded data; the backing device alone is consistent only once writeback
   * has caught up with a flush (cache and backing device together always are).
   */
  readonly writebackOrdering: WritebackOrdering;
  /**
   * A sequential stream (one client's requests each starting where its previous one ended)
   * longer than this bypasses the cache: its writes go to the backing device, its reads are not
   * cached (bcache's sequential_cutoff). 0 turns it off.
   */
  readonly sequentialCutoffBytes: number;
  /**
   * A read of at least 64 KiB, all of it cached, with at least this many pieces already written
   * back, is read from the backing device in one request, with the pieces not yet written back
   * (at most 64) copied over it from the cache: cheaper than a cache read per piece when random
   * small writes laid the data down (cache_read_gather.ts). 0 turns it off.
   */
  readonly fragmentedReadPieces: number;
  /**
   * A read of at most 4 MiB served wholly from the cache, from at least this many pieces not yet
   * written back, stores what it read again as one piece at the data head, so the next read of
   * the range is one cache read (cache_read_rewrite.ts); only in writeback mode and while the
   * cache has room to spare. 0 turns it off.
   */
  readonly fragmentedRewritePieces: number;
  /**
   * A read of at least 64 KiB served from at least this many cached pieces reads them in one
   * batch on the cache device's own thread (where the device has one and the reply buffer is
   * shared memory), so the event loop sends other replies meanwhile instead of making a system
   * call per piece (cache_read.ts). 0 turns it off: every piece is read on the event loop.
   */
  readonly fragmentedThreadPieces: number;
}

export type WritebackOrdering = 'strict' | 'relaxed';
export const writebackOrderings: readonly WritebackOrdering[] = ['strict', 'relaxed'];

/** The largest sequential cutoff accepted: 1 TiB (a stream is counted in a double, exact far past it). */
export const sequentialCutoffBytesMax = 2 ** 40;

export const defaultTuning: CacheTuning = {
  spaceWaitTimeoutMs: 0,
  dirtyHighWaterPercent: 75,
  backingOfflineAfterMs: 10_000,
  writebackStartPercent: 80,
  writebackStopPercent: 70,
  writebackIdleMs: 1000,
  writebackMaxAgeMs: 30_000,
  writebackOrdering: 'strict',
  sequentialCutoffBytes: 4 * 1024 * 1024,
  fragmentedReadPieces: 16,
  fragmentedRewritePieces: 16,
  fragmentedThreadPieces: 16,
};

/** The largest fragmentedReadPieces accepted (a 32 MiB NBD read holds at most 65,536 sectors). */
export const fragmentedReadPiecesMax = 65_536;

/** Writeback as soon as anything is dirty (tests that watch writeback happen). */
export const eagerWriteback: Partial<CacheTuning> = { writebackStartPercent: 0, writebackStopPercent: 0 };

/** Why a tuning is unacceptable, or undefined. */
export function tuningProblem(tuning: CacheTuning): string | undefined {
  type NumericKnob = Exclude<keyof CacheTuning, 'writebackOrdering'>;
  // (also for counts: an integer from 0 to max)
  const percent = (name: NumericKnob, max: number): string | undefined => {
    const value = tuning[name];
    return Number.isInteger(value) && value >= 0 && value <= max ? undefined : `${name} must be an integer from 0 to ${max}, got ${value}`;
  };
  const duration = (name: NumericKnob): string | undefined => {
    const value = tuning[name];
    return Number.isSafeInteger(value) && value >= 0 ? undefined : `${name} must be a whole number of milliseconds, got ${value}`;
  };
  if (!writebackOrderings.includes(tuning.writebackOrdering)) return `writebackOrdering must be ${writebackOrderings.join(' or ')}, got ${JSON.stringify(tuning.writebackOrdering)}`;
  return percent('dirtyHighWaterPercent', 100) ?? percent('writebackStartPercent', 100) ?? percent('writebackStopPercent', 100) ??
    (tuning.writebackStopPercent > tuning.writebackStartPercent ? 'writebackStopPercent must not exceed writebackStartPercent' : undefined) ??
    duration('spaceWaitTimeoutMs') ?? duration('backingOfflineAfterMs') ?? duration('writebackIdleMs') ?? duration('writebackMaxAgeMs') ??
    (Number.isSafeInteger(tuning.sequentialCutoffBytes) && tuning.sequentialCutoffBytes >= 0 && tuning.sequentialCutoffBytes <= sequentialCutoffBytesMax
      ? undefined
      : `sequentialCutoffBytes must be an integer from 0 to ${sequentialCutoffBytesMax}, got ${tuning.sequentialCutoffBytes}`) ??
    percent('fragmentedReadPieces', fragmentedReadPiecesMax) ?? percent('fragmentedRewritePieces', fragmentedReadPiecesMax) ??
    percent('fragmentedThreadPieces', fragmentedReadPiecesMax);
}

