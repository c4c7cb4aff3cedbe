// Cache: the public face of the engine — open, requests, drain, status, close.
//
// A Cache turns a fast cache device and a slower backing device into one cached block device
// of the backing device's size. It implements the NBD layer's Export interface structurally
// (it never imports it). Requests are validated here (range, 512-byte alignment); below this
// file the engine asserts instead. Lifecycle: open (format a blank device when asked; refuse
// a device that belongs to another backing device; replay the log) -> running -> close (seal
// and commit the open kset, let writeback and GC finish their round) or abandon (tests: drop
// everything without writing, as a crash would).

import { PcacheError } from '../lib/errors.js';
import { realTimers, type Timers } from '../lib/timers.js';
import { KiB, isAllZero, sectorSizeBytes } from '../lib/units.js';
import type { BlockDevice } from '../device/block_device.js';
import { cacheInfoFlags, type CacheInfo } from '../ondisk/cache_info.js';
import { gcPercentMax } from '../ondisk/layout.js';
import { uuidToString } from '../ondisk/superblock.js';
import { buildCore, type CacheCore, type CacheStats } from './cache_core.js';
import { defaultTuning, tuningProblem, type CacheTuning } from './cache_tuning.js';
import { checkCacheDevice } from './cache_check.js';
import { formatCacheDevice, probeDevice, readCacheMetadata, type CacheMetadata, type FormatOptions } from './cache_dev.js';
import { Gc } from './cache_gc.js';
import { KsetLog, type LogPos } from './cache_kset.js';
import {
  DataHead, WriteGroup, cacheBlockStatus, cachePrefetch, cacheRead, cacheWrite, cacheZero, type CacheExtentStatus,
} from './cache_req.js';
import { replay, type ReplayResult } from './cache_replay.js';
import { segmentKindFree } from './cache_segment.js';
import { Writeback } from './cache_writeback.js';

export type { FormatOptions } from './cache_dev.js';
export { defaultTuning, eagerWriteback, type CacheTuning } from './cache_tuning.js';

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
  /** Run writeback, GC and the kset timer on their own (default true). Tests turn it off. */
  readonly background?: boolean;
  readonly timers?: Timers;
  /** Runtime knobs; see CacheTuning (defaults: hold writes forever, 75% dirty high-water, offline after 10 s of failures). */
  readonly tuning?: Partial<CacheTuning>;
}

export interface WriteOptions {
  readonly fua: boolean;
}

export interface ZeroOptions extends WriteOptions {
  readonly fastZero?: boolean;
}

const noFua: WriteOptions = { fua: false };

/** What `pcache status` shows: dm-pcache's nine fields, then what dm-pcache lacks. */
export interface CacheStatus {
  /** dm-pcache field 1: superblock flags (always 0: little-endian). */
  readonly sbFlags: number;
  /** dm-pcache field 2: segments on the cache device. */
  readonly segTotal: number;
  /** dm-pcache field 3: segments used by the cache. */
  readonly cacheSegs: number;
  /** dm-pcache field 4: segments in use (log and data). */
  readonly segsUsed: number;
  /** dm-pcache field 5. */
  readonly gcPercent: number;
  /** dm-pcache field 6: bit 0 DATA_CRC, bit 1 INIT_DONE, bits 2-5 cache mode (0 = writeback), bits 6-12 gc_percent. */
  readonly cacheFlags: number;
  /** dm-pcache fields 7-9, each "segment:offset". */
  readonly keyHead: string;
  readonly dirtyTail: string;
  readonly keyTail: string;
  /**
   * running, or draining while a drain() is in progress; degraded while writeback or GC keep
   * failing; backing-offline (which outranks draining and degraded); failed; stopping; stopped.
   */
  readonly state: 'running' | 'draining' | 'degraded' | 'backing-offline' | 'failed' | 'stopping' | 'stopped';
  /** Why the state is degraded, backing-offline or failed. */
  readonly stateReason: string | undefined;
  /** When the backing device went offline (ISO 8601), while it is. */
  readonly backingOfflineSince: string | undefined;
  /** Dirty bytes at which writes are held while the backing device is offline. */
  readonly dirtyHighWaterBytes: number;
  readonly readOnly: boolean;
  readonly dataCrc: boolean;
  readonly cacheUuid: string;
  readonly segmentSizeBytes: number;
  readonly backingSizeBytes: number;
  readonly dirtyBytes: number;
  /** Bytes of log between key_tail and dirty_tail (written back, not yet reclaimed). */
  readonly reclaimableLogBytes: number;
  readonly indexKeys: number;
  readonly indexBytes: number;
  readonly writeback: {
    readonly active: boolean;
    readonly lastError: string | undefined;
    readonly failingForMs: number | undefined;
    readonly backoffMs: number;
    /** Age of the oldest dirty data in the log (undefined when none). */
    readonly oldestDirtyAgeMs: number | undefined;
  };
  readonly gc: { readonly active: boolean; readonly lastError: string | undefined; readonly thresholdSegments: number };
  readonly counters: Readonly<CacheStats>;
}

/**
 * dm-pcache's status line (`dmsetup status`), fields 1-9 in its order and format:
 * `sb_flags seg_total cache_segs segs_used gc_percent cache_flags key_head dirty_tail key_tail`
 * with the two flag words in hex and the positions as segment:offset.
 */
export function dmStatusLine(status: CacheStatus): string {
  return [
    status.sbFlags.toString(16), status.segTotal, status.cacheSegs, status.segsUsed, status.gcPercent,
    status.cacheFlags.toString(16), status.keyHead, status.dirtyTail, status.keyTail,
  ].join(' ');
}

export class Cache {
  private readonly core: CacheCore;
  readonly replayResult: ReplayResult;
  private inFlight = 0;
  /** drain() calls not yet settled; status says 'draining' while there are any. */
  private drainsInProgress = 0;
  private idleWaiters: (() => void)[] = [];

  private constructor(core: CacheCore, replayResult: ReplayResult) {
    this.core = core;
    this.replayResult = replayResult;
  }

  /** Formats `cacheDevice` for `backingDevice`, overwriting whatever it held (the caller decides whether that is allowed). */
  static async format(cacheDevice: BlockDevice, backingDevice: BlockDevice, options: FormatOptions = {}): Promise<void> {
    await formatCacheDevice(cacheDevice, backingDevice, options);
  }

  static async open(options: CacheOpenOptions): Promise<Cache> {
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
      throw new PcacheError('FOREIGN', 'the cache device holds data that is not a pcache cache; refusing to touch it', { reason: 'not-pcache' });
    }
    const metadata = await readCacheMetadata(cacheDevice);
    checkBacking(metadata, backingDevice, options.acceptOtherBackingIdentity === true);
    const core = buildCore(cacheDevice, backingDevice, metadata, {
      readOnly: options.readOnly === true,
      background: options.background ?? true,
      timers: options.timers ?? realTimers,
      tuning,
    });
    const result = await replay(core, metadata.dirtyTail.value);
    core.dirtyTail = result.dirtyTail;
    core.durableDirtyTail = result.dirtyTail;
    wireParts(core, result.keyHead);
    if (!core.readOnly) await clearAfterHead(core, result.keyHead);
    const cache = new Cache(core, result);
    // Dirty data found by replay has waited for the whole downtime: it counts as old.
    if (core.stats.dirtyBytes > 0) core.writeback.noteDurable(result.keyHead.lsn, core.timers.now() - tuning.writebackMaxAgeMs);
    core.writeback.kick(false);
    core.gc.kick(false);
    return cache;
  }

  get sizeBytes(): number {
    return this.core.dev.sb.backingSizeBytes;
  }

  read(target: Uint8Array, offsetBytes: number): Promise<void> | undefined {
    this.validate(offsetBytes, target.length);
    return this.track(cacheRead(this.core, target, offsetBytes));
  }

  write(source: Uint8Array, offsetBytes: number, options: WriteOptions = noFua): Promise<void> {
    this.validate(offsetBytes, source.length);
    return cacheWrite(this.core, source, offsetBytes, options.fua, this.trackWrite);
  }

  /** Every write completed before this call is durable (in the cache log) when it resolves. */
  flush(): Promise<void> {
    const core = this.core;
    if (core.state !== 'running') return Promise.reject(new PcacheError('ESHUTDOWN', 'the cache is shutting down'));
    core.stats.flushRequests++;
    if (core.readOnly) return Promise.resolve();
    return this.trackAlways(core.log.flush());
  }

  /** TRIM: the range reads as zeroes afterwards (a defined answer for "unspecified"). */
  trim(offsetBytes: number, lengthBytes: number, options: WriteOptions = noFua): Promise<void> {
    this.validate(offsetBytes, lengthBytes);
    return this.trackAlways(cacheZero(this.core, offsetBytes, lengthBytes, options.fua));
  }

  /** Same as trim; the name block-layer users expect. */
  discard(offsetBytes: number, lengthBytes: number, options: WriteOptions = noFua): Promise<void> {
    return this.trim(offsetBytes, lengthBytes, options);
  }

  /** WRITE_ZEROES: recorded as a ZERO key, so it is always fast (FAST_ZERO never fails). */
  writeZeroes(offsetBytes: number, lengthBytes: number, options: ZeroOptions = noFua): Promise<void> {
    this.validate(offsetBytes, lengthBytes);
    return this.trackAlways(cacheZero(this.core, offsetBytes, lengthBytes, options.fua));
  }

  /** Prefetches the range into the cache (NBD_CMD_CACHE). */
  cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.validate(offsetBytes, lengthBytes);
    return this.trackAlways(cachePrefetch(this.core, offsetBytes, lengthBytes));
  }

  blockStatus(offsetBytes: number, lengthBytes: number): CacheExtentStatus[] {
    this.validate(offsetBytes, lengthBytes);
    return cacheBlockStatus(this.core, offsetBytes, lengthBytes);
  }

  /** Writes back everything written before the call and resolves once the backing device holds it, synced. */
  async drain(): Promise<void> {
    if (this.core.readOnly) return;
    this.drainsInProgress += 1;
    try {
      await this.drainAll();
    } finally {
      this.drainsInProgress -= 1;
    }
  }

  private async drainAll(): Promise<void> {
    const core = this.core;
    await this.flush();
    const target = core.log.durableHead.lsn;
    if (core.background) {
      // Waiting first: urgency lasts only while a waiter is there (cache_writeback.ts).
      const done = core.writeback.waitFor(target);
      core.writeback.kick(true);
      await done;
      return;
    }
    while (core.dirtyTail.lsn < target) {
      if (core.state !== 'running') throw new PcacheError('ESHUTDOWN', 'the cache is shutting down');
      const advanced = await core.writeback.step();
      if (!advanced) throw new PcacheError('EIO', `drain: writeback failed: ${core.writeback.lastError ?? 'no progress'}`);
    }
  }

  /**
   * Tells the cache that its backing device is (probably) reachable again — for example, its
   * network connection came back: writeback stops waiting out its back-off and tries at once.
   * Harmless when wrong: a failed round just backs off again.
   */
  retryBackingNow(): void {
    this.core.writeback.wakeFromBackOff();
    this.core.writeback.kick(false);
  }

  /** Runs one writeback round now (tests and the crash simulator, with background work off). */
  writebackStep(): Promise<boolean> {
    return this.core.writeback.step();
  }

  /** Runs one GC round now (tests and the crash simulator, with background work off). */
  gcStep(): Promise<boolean> {
    return this.core.gc.step();
  }

  /** Changes runtime knobs (not persisted; see CacheTuning). Returns the tuning now in force. */
  setTuning(changes: Partial<CacheTuning>): CacheTuning {
    const core = this.core;
    const tuning: CacheTuning = { ...core.tuning, ...changes };
    const problem = tuningProblem(tuning);
    if (problem !== undefined) throw new PcacheError('EINVAL', problem);
    core.tuning = tuning;
    core.wakeAdmission();
    core.writeback.kick(false);
    return tuning;
  }

  get tuning(): CacheTuning {
    return this.core.tuning;
  }

  /** Changes the GC threshold and persists it in cache_info (dm-pcache's `gc_percent` message). */
  async setGcPercent(gcPercent: number): Promise<void> {
    const core = this.core;
    if (!Number.isInteger(gcPercent) || gcPercent < 0 || gcPercent > gcPercentMax) {
      throw new PcacheError('EINVAL', `gc_percent must be an integer from 0 to ${gcPercentMax}, got ${gcPercent}`);
    }
    core.checkWritable();
    await core.dev.writeCacheInfo(this.cacheInfo(gcPercent));
    await core.dev.sync();
    core.gcPercent = gcPercent;
    core.gc.kick(false);
  }

  status(): CacheStatus {
    const core = this.core;
    const pos = (p: LogPos): string => `${p.segment}:${p.offsetBytes}`;
    const failingSince = core.writeback.failingSinceMs;
    let state: CacheStatus['state'] = core.state === 'running' ? 'running' : core.state;
    let stateReason: string | undefined;
    const offlineSince = core.backingOfflineSinceWallMs === undefined ? undefined : new Date(core.backingOfflineSinceWallMs).toISOString();
    if (core.failure !== undefined) {
      state = 'failed';
      stateReason = core.failure.message;
    } else if (core.state === 'running' && offlineSince !== undefined) {
      state = 'backing-offline';
      stateReason = `backing offline since ${offlineSince}: ${core.backingOfflineReason ?? ''}`;
    } else if (core.state === 'running' && (failingSince !== undefined || core.gc.lastError !== undefined)) {
      state = 'degraded';
      stateReason = core.writeback.lastError ?? core.gc.lastError;
    } else if (core.state === 'running' && this.drainsInProgress > 0) {
      state = 'draining';
    }
    return {
      sbFlags: 0,
      segTotal: core.dev.sb.segmentCount,
      cacheSegs: core.segments.count,
      segsUsed: core.segments.usedCount,
      gcPercent: core.gcPercent,
      cacheFlags: cacheInfoFlags(this.cacheInfo(core.gcPercent)) | (core.gcPercent << 6),
      keyHead: pos(core.log.keyHead),
      dirtyTail: pos(core.dirtyTail),
      keyTail: pos(core.keyTail),
      state,
      stateReason,
      backingOfflineSince: offlineSince,
      dirtyHighWaterBytes: core.dirtyHighWaterBytes,
      readOnly: core.readOnly,
      dataCrc: core.dataCrc,
      cacheUuid: uuidToString(core.dev.sb.cacheUuid),
      segmentSizeBytes: core.dev.segmentSizeBytes,
      backingSizeBytes: core.dev.sb.backingSizeBytes,
      dirtyBytes: core.stats.dirtyBytes,
      reclaimableLogBytes: core.dirtyTail.lsn - core.keyTail.lsn,
      indexKeys: core.index.keyCount,
      indexBytes: core.index.storageBytes,
      writeback: {
        active: core.writeback.active,
        lastError: core.writeback.lastError,
        failingForMs: failingSince === undefined ? undefined : core.timers.now() - failingSince,
        backoffMs: core.writeback.backoffMs,
        oldestDirtyAgeMs: core.writeback.oldestDirtyAgeMs,
      },
      gc: { active: core.gc.active, lastError: core.gc.lastError, thresholdSegments: core.gcThresholdSegments },
      counters: { ...core.stats },
    };
  }

  /**
   * Stops cleanly: no new requests, in-flight ones finish, the open kset is committed, the
   * running writeback and GC rounds finish. Dirty data stays in the cache for the next open.
   */
  async close(): Promise<void> {
    const core = this.core;
    if (core.state !== 'running') return;
    core.state = 'stopping';
    await this.idle();
    // Writes of the common path are not in the in-flight count (cacheWrite): wait for the group.
    await core.writes.published();
    if (!core.readOnly && core.failure === undefined) {
      core.log.sealNow();
      await core.log.flush();
    }
    core.writeback.stop();
    // A failing backing device may have writeback or GC sleeping in a back-off of up to 30 s.
    core.writeback.wakeFromBackOff();
    core.gc.wakeFromBackOff();
    await core.writeback.idle();
    await core.gc.idle();
    core.log.stop();
    core.writeback.stop();
    core.state = 'stopped';
    const shutdown = new PcacheError('ESHUTDOWN', 'the cache was closed');
    core.writeback.abort(shutdown);
    core.log.abort(shutdown);
    core.segments.wakeAll();
  }

  /** Drops all in-memory state at once and writes nothing more, as a crash would (tests). */
  abandon(): void {
    const core = this.core;
    core.state = 'stopped';
    core.log.stop();
    core.writeback.stop();
    const shutdown = new PcacheError('ESHUTDOWN', 'the cache was abandoned');
    core.writeback.abort(shutdown);
    core.log.abort(shutdown);
    core.segments.wakeAll();
  }

  /**
   * Commits everything, waits for background work, then runs the structural checker on the
   * cache device and compares what it rebuilds with this cache's own state. For quiesced
   * caches (tests, the crash simulator): concurrent requests would make the two differ.
   */
  async check(): Promise<string[]> {
    const core = this.core;
    if (!core.readOnly && core.failure === undefined) await core.log.flush();
    await core.writeback.idle();
    await core.gc.idle();
    const report = await checkCacheDevice(core.dev.device);
    const problems = [...report.problems];
    const rebuilt = report.rebuilt;
    if (rebuilt === undefined || report.replay === undefined) return problems;
    const same = (what: string, mine: string | number, theirs: string | number): void => {
      if (mine !== theirs) problems.push(`${what}: the running cache has ${mine}, the device says ${theirs}`);
    };
    const pos = (p: LogPos): string => `${p.segment}:${p.offsetBytes}`;
    same('key_tail', pos(core.keyTail), pos(rebuilt.keyTail));
    same('dirty_tail', pos(core.dirtyTail), pos(report.replay.dirtyTail));
    same('key_head', pos(core.log.durableHead), pos(report.replay.keyHead));
    same('dirty bytes', core.stats.dirtyBytes, rebuilt.stats.dirtyBytes);
    const headSegment = core.head.segment;
    for (let segment = 0; segment < core.segments.count; segment++) {
      const refs = (core.segments.refs[segment] ?? 0) - (segment === headSegment ? 1 : 0);
      // The data head's segment holds no key yet until its first write lands: free on disk.
      const kind = segment === headSegment && refs === 0 ? segmentKindFree : core.segments.kind[segment] ?? -1;
      same(`segment ${segment} kind`, kind, rebuilt.segments.kind[segment] ?? -1);
      same(`segment ${segment} references`, refs, rebuilt.segments.refs[segment] ?? 0);
    }
    return problems;
  }

  /** Internal parts, for the structural checker and tests. */
  get internals(): CacheCore {
    return this.core;
  }

  private cacheInfo(gcPercent: number): CacheInfo {
    const core = this.core;
    return { dataCrc: core.dataCrc, initDone: true, gcPercent, segmentCount: core.segments.count, firstSegment: 0 };
  }

  private validate(offsetBytes: number, lengthBytes: number): void {
    const size = this.core.dev.sb.backingSizeBytes;
    if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0 || offsetBytes % sectorSizeBytes !== 0) {
      throw new PcacheError('EINVAL', `offset ${offsetBytes} is not a multiple of ${sectorSizeBytes}`);
    }
    if (!Number.isSafeInteger(lengthBytes) || lengthBytes < 0 || lengthBytes % sectorSizeBytes !== 0) {
      throw new PcacheError('EINVAL', `length ${lengthBytes} is not a multiple of ${sectorSizeBytes}`);
    }
    if (offsetBytes + lengthBytes > size) throw new PcacheError('EINVAL', `range ${offsetBytes}+${lengthBytes} ends past the device end ${size}`);
  }

  private track(io: Promise<void> | undefined): Promise<void> | undefined {
    if (io === undefined) return undefined;
    return this.trackAlways(io);
  }

  private trackAlways<T>(io: Promise<T>): Promise<T> {
    this.inFlight++;
    // then() with two preallocated callbacks rather than finally(): one promise and no
    // closures per request (finally() wraps its callback in two more of each).
    return io.then(this.settledValue as (value: T) => T, this.settledError);
  }

  private readonly trackWrite = (io: Promise<void>): Promise<void> => this.trackAlways(io);

  private readonly settledValue = (value: unknown): unknown => {
    this.settled();
    return value;
  };

  private readonly settledError = (error: unknown): never => {
    this.settled();
    throw error;
  };

  private settled(): void {
    this.inFlight--;
    if (this.inFlight === 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const wake of waiters) wake();
    }
  }

  private idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => { this.idleWaiters.push(resolve); });
  }
}

function checkBacking(metadata: CacheMetadata, backing: BlockDevice, acceptOtherIdentity: boolean): void {
  const sb = metadata.sb;
  if (sb.backingSizeBytes !== backing.sizeBytes) {
    throw new PcacheError('FOREIGN', `this cache belongs to a backing device of ${sb.backingSizeBytes} bytes, but the backing device has ${backing.sizeBytes}`, { reason: 'other-backing-size' });
  }
  if (sb.backingIdentity !== '' && backing.identity !== undefined && sb.backingIdentity !== backing.identity && !acceptOtherIdentity) {
    throw new PcacheError('FOREIGN', `this cache belongs to backing device "${sb.backingIdentity}", not "${backing.identity}" (accept it only if it is a copy of that device)`, { reason: 'other-backing-identity' });
  }
}

function wireParts(core: CacheCore, keyHead: LogPos): void {
  core.log = new KsetLog(core, keyHead);
  core.head = new DataHead(core);
  core.writes = new WriteGroup(core);
  core.writeback = new Writeback(core);
  core.gc = new Gc(core);
  core.assertTailOrder();
}

/**
 * Zeroes key_head's segment from key_head to its end, then syncs. A kset written there before
 * the crash was never acknowledged; without this, a later replay could find it again behind
 * new ksets of the same length and take it for part of the log. Chunks that already read as
 * zero are not rewritten: the end state is the same, and the sync also covers an earlier
 * zeroing write that was cut short (a sync covers every completed write to the device).
 */
async function clearAfterHead(core: CacheCore, keyHead: LogPos): Promise<void> {
  const chunkBytes = 64 * KiB;
  const scratch = new Uint8Array(chunkBytes);
  const zeroes = new Uint8Array(chunkBytes);
  let wrote = false;
  for (let offset = keyHead.offsetBytes; offset < core.dev.dataSizeBytes; offset += chunkBytes) {
    const length = Math.min(chunkBytes, core.dev.dataSizeBytes - offset);
    const current = scratch.subarray(0, length);
    const read = core.dev.readData(current, keyHead.segment, offset);
    if (read !== undefined) await read;
    if (isAllZero(current)) continue;
    const io = core.dev.writeData(zeroes.subarray(0, length), keyHead.segment, offset);
    if (io !== undefined) await io;
    wrote = true;
  }
  if (wrote || keyHead.offsetBytes < core.dev.dataSizeBytes) await core.dev.sync();
}
