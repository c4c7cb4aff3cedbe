// Opening a cache: what happens between two devices and a running engine.
//
//   probe the cache device -> format it if blank and asked to -> read and validate the
//   metadata -> refuse a cache of another backing device -> take the backing device's new
//   size if it grew (or shrank where the cache holds nothing) -> build the context -> replay
//   the log -> compare the backing device with its fingerprint from the last clean stop
//   (refuse a changed one while dirty data waits for it) -> build the engine -> zero the rest
//   of key_head's segment and sync -> drop the clean copies of a changed backing device ->
//   record the backing state as unknown (open) and sync -> start writeback and GC.
//
// Everything that can refuse (bad knobs, a blank device not to be formatted, a foreign device,
// another backing device) does so before anything is written. Replay writes nothing; the only
// write before the engine serves is the zeroing after key_head (docs/design.md, "Barriers").

import { PcacheError } from '../lib/errors.js';
import { ManualTimers, realTimers, type Timers } from '../lib/timers.js';
import { KiB, isAllZero } from '../lib/units.js';
import type { BlockDevice } from '../device/block_device.js';
import { noFingerprint } from '../ondisk/cache_info.js';
import { CacheContext } from './cache_context.js';
import { formatCacheDevice, pcacheRecordsFound, probeDevice, readCacheMetadata, rewriteSuperblock, type CacheMetadata, type FormatOptions } from './cache_metadata.js';
import { CacheEngine } from './cache_engine.js';
import { backingFingerprint, sameFingerprint } from './cache_backing.js';
import { describeLogDamage, dropCleanKeys, replay, replayStartOf, type ReplayResult } from './cache_replay.js';
import { cacheInfoOf } from './cache_status.js';
import { defaultTuning, tuningProblem, type CacheTuning } from './cache_tuning.js';
import type { LogPos } from './cache_types.js';

export interface CacheOpenOptions {
  readonly cacheDevice: BlockDevice;
  readonly backingDevice: BlockDevice;
  /** Format the cache device when it is blank (its first 8 KiB are zero), with these options. */
  readonly formatIfBlank?: FormatOptions | boolean;
  /** Serve reads only; nothing is written to either device (no writeback, no GC). */
  readonly readOnly?: boolean;
  /**
   * Open even though the backing device's identity differs from the one recorded at format
   * (for example after copying the backing device). The size must still match: a smaller or
   * larger device would make recorded extents meaningless.
   */
  readonly acceptOtherBackingIdentity?: boolean;
  /**
   * Serve a cache whose log is damaged (replay found the log going on durably past a kset that
   * fails its checks), losing every write from the damaged kset on. Without it such a cache is
   * refused (CORRUPT, reason log-damaged) and `pcache check` lists what would be lost.
   */
  readonly acceptLogLoss?: boolean;
  /**
   * Serve although the backing device changed since the last clean stop while the cache holds
   * dirty data for it: the clean copies are dropped and the dirty data is written back over the
   * changed device. Without it such a cache is refused (FOREIGN, reason backing-changed).
   */
  readonly acceptBackingChange?: boolean;
  /** Run writeback, GC and the kset timer on their own (default true). Tests turn it off. */
  readonly background?: boolean;
  readonly timers?: Timers;
  /** Runtime knobs; see CacheTuning (defaults: hold writes forever, 75% dirty high-water, offline after 10 s of failures). */
  readonly tuning?: Partial<CacheTuning>;
}

/** What the start found about the backing device, against its fingerprint from the last clean stop. */
export interface BackingCheck {
  /**
   * same: as at the clean stop; changed: written to by something else since (or the cache was
   * detached), so the clean copies were dropped; resized: its size changed (adopted above; the
   * clean copies are kept); unknown: the last stop was not clean (or the format is version 1),
   * nothing to compare.
   */
  readonly found: 'same' | 'changed' | 'resized' | 'unknown';
  readonly droppedCleanBytes: number;
}

/** Opens the devices as a running engine; see the file comment for the steps. */
export async function openEngine(options: CacheOpenOptions): Promise<{ engine: CacheEngine; replayResult: ReplayResult; backingCheck: BackingCheck }> {
  const { cacheDevice, backingDevice } = options;
  // Checked before anything is written: a refused open formats nothing.
  const tuning: CacheTuning = { ...defaultTuning, ...options.tuning };
  const problem = tuningProblem(tuning);
  if (problem !== undefined) throw new PcacheError('EINVAL', problem);
  const contents = await probeDevice(cacheDevice);
  if (contents === 'blank') {
    if (options.formatIfBlank === undefined || options.formatIfBlank === false) {
      throw new PcacheError('FOREIGN', 'the cache device is blank; format it first', { reason: 'blank-device' });
    }
    if (options.readOnly === true) throw new PcacheError('EPERM', 'cannot format a cache device opened read-only');
    await formatCacheDevice(cacheDevice, backingDevice, options.formatIfBlank === true ? {} : options.formatIfBlank);
  } else if (contents === 'other') {
    // readCacheMetadata tells a damaged pcache cache (its other records remain) from foreign data.
    const found = await pcacheRecordsFound(cacheDevice);
    if (found.length > 0) await readCacheMetadata(cacheDevice);
    throw new PcacheError('FOREIGN', 'the cache device holds data that is not a pcache cache; refusing to touch it', { reason: 'not-pcache' });
  }
  let metadata = await readCacheMetadata(cacheDevice);
  const declaredCopy = checkBacking(metadata, backingDevice, options.acceptOtherBackingIdentity === true);
  const resized = backingDevice.sizeBytes !== metadata.sb.backingSizeBytes;
  if (metadata.sb.backingSizeBytes !== backingDevice.sizeBytes) {
    if (options.readOnly !== true) metadata = await adoptBackingSize(cacheDevice, backingDevice, metadata);
    else if (backingDevice.sizeBytes < metadata.sb.backingSizeBytes) {
      throw new PcacheError('FOREIGN', `this cache belongs to a backing device of ${metadata.sb.backingSizeBytes} bytes, but the backing device has ${backingDevice.sizeBytes} (opened read-only, so nothing is adjusted)`, { reason: 'other-backing-size' });
    }
  }
  const ctx = new CacheContext(cacheDevice, backingDevice, metadata, {
    readOnly: options.readOnly === true,
    background: options.background ?? true,
    timers: options.timers ?? realTimers,
    tuning,
  });
  const replayResult = await replay(ctx, replayStartOf(metadata));
  if (replayResult.damage !== undefined && options.acceptLogLoss !== true) {
    throw new PcacheError('CORRUPT', `${describeLogDamage(replayResult.damage)}; serving would lose acknowledged writes without a word. ` +
      '`pcache check` lists what is affected; accept the loss of everything from the damaged kset on to serve anyway', { reason: 'log-damaged' });
  }
  const found = await compareBacking(ctx, resized, declaredCopy);
  if (found === 'changed' && ctx.stats.dirtyBytes > 0 && options.acceptBackingChange !== true) {
    throw new PcacheError('FOREIGN', `the backing device changed since pcache last stopped cleanly${ctx.backingState === 'detached' ? ' (the cache was detached from it)' : ''}, ` +
      `and the cache holds ${ctx.stats.dirtyBytes} bytes of dirty data never written back to it: give the backing device back its contents, ` +
      'or accept the change (the dirty data is then written back over it), or discard the cache (pcache format --force --discard-dirty)', { reason: 'backing-changed' });
  }
  ctx.dirtyTail = replayResult.dirtyTail;
  ctx.durableDirtyTail = replayResult.dirtyTail;
  const engine = new CacheEngine(ctx, replayResult.keyHead);
  let droppedCleanBytes = 0;
  if (!ctx.readOnly) {
    if (replayResult.damage !== undefined) await retireStranded(ctx, replayResult.strandedSegments);
    await clearAfterHead(ctx, replayResult.keyHead);
    if (replayResult.damage !== undefined) await recordTruncatedLog(ctx, replayResult.keyHead);
    if (found === 'changed') {
      const seq = engine.log.appendInvalidate();
      droppedCleanBytes = dropCleanKeys(ctx);
      await engine.log.commit(seq);
    }
    await markBackingInUse(ctx);
  } else if (found === 'changed') {
    // Read-only: nothing may be written, so the marker waits for a read-write start; until
    // then the stale copies are only left out of the index.
    droppedCleanBytes = dropCleanKeys(ctx);
  }
  // Dirty data found by replay has waited for the whole downtime: it counts as old.
  if (ctx.stats.dirtyBytes > 0) engine.writeback.noteDurable(replayResult.keyHead.lsn, ctx.timers.now() - tuning.writebackMaxAgeMs);
  engine.writeback.kick(false);
  engine.gc.kick(false);
  return { engine, replayResult, backingCheck: { found, droppedCleanBytes } };
}

/** The backing device against cache_info's record of it at the last clean stop (cache_backing.ts). */
async function compareBacking(ctx: CacheContext, resized: boolean, declaredCopy: boolean): Promise<BackingCheck['found']> {
  if (ctx.backingState === 'unknown') return 'unknown';
  if (ctx.backingState === 'detached') return 'changed';
  // Resizing a device moves a file's times and a sample's blocks; the cached copies of what
  // was there before are kept (a grown device is served at its new size with its data, a
  // shrunk one only when the cache holds nothing past its end).
  if (resized) return 'resized';
  const now = await backingFingerprint(ctx.backing, ctx.dev.sb.cacheUuid);
  return sameFingerprint(ctx.backingFingerprint, now, declaredCopy) ? 'same' : 'changed';
}

/**
 * While the cache is open, cache_info says the backing device's state is unknown: pcache's own
 * writeback changes the device, so a fingerprint from before would not match after a crash.
 * Written and synced before writeback can write anything.
 */
async function markBackingInUse(ctx: CacheContext): Promise<void> {
  if (ctx.backingState === 'unknown') return;
  ctx.backingState = 'unknown';
  ctx.backingFingerprint = noFingerprint;
  await ctx.dev.writeCacheInfo(cacheInfoOf(ctx, ctx.gcPercent));
  await ctx.dev.sync();
}

/** Refuses another backing device than the recorded one unless accepted; returns whether it is a declared copy. */
function checkBacking(metadata: CacheMetadata, backing: BlockDevice, acceptOtherIdentity: boolean): boolean {
  const sb = metadata.sb;
  const other = sb.backingIdentity !== '' && backing.identity !== undefined && sb.backingIdentity !== backing.identity;
  if (other && !acceptOtherIdentity) {
    throw new PcacheError('FOREIGN', `this cache belongs to backing device "${sb.backingIdentity}", not "${backing.identity}" (accept it only if it is a copy of that device)`, { reason: 'other-backing-identity' });
  }
  return other;
}

/**
 * The backing device's size changed since the cache recorded it. A device that grew is served
 * at its new size: every cached extent still lies inside it. One that shrank is accepted only
 * when no key in the log (live or superseded: replay validates them all against the recorded
 * size) reaches past the new end; otherwise it is refused with the numbers. The new size goes
 * into every superblock copy (the second copy first, each write synced), so a crash in between
 * leaves one copy with either size and no key beyond either. Read-only opens never get here:
 * they serve the recorded size of a grown device and refuse a shrunk one (readCacheMetadata's
 * caller sees the size mismatch in Cache.sizeBytes).
 */
async function adoptBackingSize(cacheDevice: BlockDevice, backing: BlockDevice, metadata: CacheMetadata): Promise<CacheMetadata> {
  const recorded = metadata.sb.backingSizeBytes;
  const now = backing.sizeBytes;
  if (now < recorded) {
    const scratch = new CacheContext(cacheDevice, { ...backing, sizeBytes: recorded }, metadata, { readOnly: true, background: false, timers: new ManualTimers(), tuning: defaultTuning });
    let reachBytes = 0;
    await replay(scratch, replayStartOf(metadata), (record) => { reachBytes = Math.max(reachBytes, record.offsetBytes + record.lengthBytes); });
    if (reachBytes > now) {
      throw new PcacheError('FOREIGN', `the backing device shrank from ${recorded} to ${now} bytes, but the cache holds ranges up to byte ${reachBytes} ` +
        `(${scratch.stats.dirtyBytes} bytes dirty): give the backing device its size back, or serve it at ${recorded} bytes, drain, and format the cache again`, { reason: 'other-backing-size' });
    }
  }
  await rewriteSuperblock(cacheDevice, { ...metadata.sb, backingSizeBytes: now });
  return readCacheMetadata(cacheDevice);
}

/**
 * After accepting a damaged log: the ksets found beyond the damage in other (free) segments
 * would be taken for damage again at the next open, until the log's seqs passed theirs. A new
 * generation, written and synced, makes them stale for good (the rest of key_head's segment is
 * zeroed by clearAfterHead).
 */
async function retireStranded(ctx: CacheContext, segments: readonly number[]): Promise<void> {
  for (const segment of segments) {
    ctx.segments.gen[segment] = (ctx.segments.gen[segment] ?? 0) + 1;
    const io = ctx.dev.writeGen(segment, ctx.segments.gen[segment] ?? 0);
    if (io !== undefined) await io;
  }
  if (segments.length > 0) await ctx.dev.sync();
}

/**
 * After accepting a damaged log: the tails still say that ksets past the new end were durable,
 * which the next open would take for damage again. Both are rewritten with the truncated log's
 * end, and synced.
 */
async function recordTruncatedLog(ctx: CacheContext, keyHead: LogPos): Promise<void> {
  const durableSeq = keyHead.seq - 1;
  await ctx.dev.writeKeyTail({ ...ctx.keyTail, durableSeq });
  await ctx.dev.writeDirtyTail({ ...ctx.dirtyTail, durableSeq });
  await ctx.dev.sync();
}

/**
 * Zeroes key_head's segment from key_head to its end, then syncs. A kset written there before
 * the crash was never acknowledged; without this, a later replay could find it again behind
 * new ksets of the same length and take it for part of the log. Chunks that already read as
 * zero are not rewritten: the end state is the same, and the sync also covers an earlier
 * zeroing write that was cut short (a sync covers every completed write to the device).
 */
async function clearAfterHead(ctx: CacheContext, keyHead: LogPos): Promise<void> {
  const chunkBytes = 64 * KiB;
  // Every open reads the rest of a segment here and most find it zero already: the read
  // buffer is not zero-filled (the read fills it) and the zeroes are made only when needed.
  const scratch = Buffer.allocUnsafe(chunkBytes);
  let zeroes: Uint8Array | undefined;
  let wrote = false;
  for (let offset = keyHead.offsetBytes; offset < ctx.dev.dataSizeBytes; offset += chunkBytes) {
    const length = Math.min(chunkBytes, ctx.dev.dataSizeBytes - offset);
    const current = scratch.subarray(0, length);
    const read = ctx.dev.readData(current, keyHead.segment, offset);
    if (read !== undefined) await read;
    if (isAllZero(current)) continue;
    zeroes ??= new Uint8Array(chunkBytes);
    const io = ctx.dev.writeData(zeroes.subarray(0, length), keyHead.segment, offset);
    if (io !== undefined) await io;
    wrote = true;
  }
  if (wrote || keyHead.offsetBytes < ctx.dev.dataSizeBytes) await ctx.dev.sync();
}
