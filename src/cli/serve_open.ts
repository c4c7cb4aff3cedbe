// What `pcache serve` serves, opened: the backing device (a file or an NBD export), the cache
// in front of it (or none, with --no-cache), and the files a start may create. serve_cmd.ts
// drives the rest (listening, the control socket, metrics, stopping).

import fs from 'node:fs';
import path from 'node:path';
import { Cache, describeLogDamage, type CheckpointPoint, dmStatusLine, type CacheTuning } from '../cache/cache.js';
import { probeDevice } from '../cache/cache_metadata.js';
import type { BlockDevice } from '../device/block_device.js';
import { DeviceExport } from '../device/device_export.js';
import { FileDevice } from '../device/file_device.js';
import { RecordingDevice } from '../device/recording_device.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { NbdRemoteDevice, type NbdRemoteState } from '../nbd/client/remote_device.js';
import { defaultServe, type ServeArgs } from './args.js';
import { ensureDeviceFile } from './devices.js';
import type { Logger } from './log.js';
import { applySettings, currentSettings, knobNamed, type KnobValue } from './settings.js';

import type { Closer } from './serve_lifecycle.js';

/**
 * With --record-dir, a device whose every write and sync is also appended to DIR/<name>.log
 * (src/device/recording_device.ts). The log needs no fsync: it lives in the page cache, which a
 * SIGKILL does not lose, and the crash tests rebuild power-loss states of the run from it.
 */
export function recorded(args: ServeArgs, name: 'cache' | 'backing', device: BlockDevice): BlockDevice {
  if (args.recordDir === undefined) return device;
  return RecordingDevice.create(device, path.join(args.recordDir, `${name}.log`));
}

export interface Served {
  readonly export: Cache | DeviceExport;
  readonly cacheSizeBytes: number;
  readonly formatted: boolean;
  /** What the 'serving' log line says about the cache (logged once everything is up, so a failed start prints one error line only). */
  readonly startFacts: Record<string, unknown>;
  status(): Record<string, unknown>;
  /** The cache's own status; undefined without a cache. */
  cacheStatus(): ReturnType<Cache['status']> | undefined;
  drain(): Promise<void>;
  invalidate(): Promise<number>;
  /** Writes everything back, drops the clean copies, marks the cache detached and closes it. */
  detach(): Promise<void>;
  /** The backing device is reachable again: retry writeback now. */
  retryBacking(): void;
  /** Holds the backing device at the log's durable state while `held` runs (Cache.checkpoint). */
  checkpoint(held: (point: CheckpointPoint) => Promise<void>, signal: AbortSignal): Promise<void>;
  set(changes: Readonly<Record<string, unknown>>): Promise<Record<string, KnobValue>>;
}

export interface OpenedBacking {
  readonly device: BlockDevice;
  /** Set for an NBD backing device (its connection state goes into status). */
  readonly remote: NbdRemoteDevice | undefined;
  /** Sets what runs when an NBD backing device's connection comes back. */
  whenBackOnline(callback: () => void): void;
}

/** What opening a backing device needs of serve's arguments (a volume passes its own). */
export type BackingArgs = Pick<ServeArgs, 'backingPath' | 'backingIsUri' | 'backingConnections' | 'readOnly'>;

export async function openBacking(args: BackingArgs, log: Logger): Promise<OpenedBacking> {
  if (!args.backingIsUri) return { device: await FileDevice.open(args.backingPath, { readOnly: args.readOnly }), remote: undefined, whenBackOnline: () => undefined };
  let wasOffline = false;
  let backOnline = (): void => undefined;
  const onStateChange = (state: NbdRemoteState): void => {
    const offline = state.offlineSince !== undefined;
    if (offline && !wasOffline) log.warn({ backing: state.location, since: state.offlineSince, reason: state.lastError ?? null }, 'backing device offline');
    if (!offline && wasOffline) {
      log.info({ backing: state.location, connections: state.connectionsConnected }, 'backing device back online');
      backOnline();
    }
    if (state.refused !== undefined) log.error({ backing: state.location, reason: state.refused }, 'backing device refused');
    wasOffline = offline;
  };
  const remote = await NbdRemoteDevice.open(args.backingPath, { connections: args.backingConnections, readOnly: args.readOnly, onStateChange });
  return { device: remote, remote, whenBackOnline: (callback) => { backOnline = callback; } };
}

export function prepareFiles(args: ServeArgs): string[] {
  const created: string[] = [];
  if (args.defaultMode) fs.mkdirSync(defaultServe.directory, { recursive: true });
  if (!args.backingIsUri && ensureDeviceFile(args.backingPath, args.backingSizeBytes, '--backing-size')) created.push(args.backingPath);
  if (!args.noCache && ensureDeviceFile(args.cachePath, args.cacheSizeBytes, '--cache-size')) created.push(args.cachePath);
  return created;
}

/** The CacheTuning fields of `serve --tuning` (names and values were checked by args_serve.ts). */
export function tuningOf(args: ServeArgs): Partial<CacheTuning> {
  const tuning: Record<string, KnobValue> = {};
  for (const [name, value] of Object.entries(args.tuning)) {
    const field = knobNamed(name)?.field;
    if (field !== undefined) tuning[field] = value;
  }
  // args_serve.ts checked every value against its knob, whose field it names.
  return tuning;
}

/** How to open and serve one cache: serve's flags, or a volume's. */
export interface CacheServeOptions {
  /** The cache, as messages name it (a path, or a pool's volume). */
  readonly cacheName: string;
  readonly backingName: string;
  /** Format a blank device (serve's first start); a volume's share is formatted when it is added. */
  readonly formatIfBlank: boolean;
  readonly readOnly: boolean;
  readonly gcPercent: number | undefined;
  readonly segmentSizeBytes: number | undefined;
  readonly forceBacking: boolean;
  readonly acceptLogLoss: boolean;
  readonly acceptBackingChange: boolean;
  readonly tuning: Partial<CacheTuning>;
  readonly mode: ServeArgs['mode'];
}

export async function openCache(args: ServeArgs, backing: BlockDevice, closers: Closer[], log: Logger): Promise<Served> {
  const device = recorded(args, 'cache', await FileDevice.open(args.cachePath, { blocking: true, readOnly: args.readOnly }));
  closers.push(() => device.close());
  return serveCache(device, backing, {
    cacheName: args.cachePath,
    backingName: args.backingPath,
    formatIfBlank: !args.readOnly,
    readOnly: args.readOnly,
    gcPercent: args.gcPercent,
    segmentSizeBytes: args.segmentSizeBytes,
    forceBacking: args.forceBacking,
    acceptLogLoss: args.acceptLogLoss,
    acceptBackingChange: args.acceptBackingChange,
    tuning: backingTuning(tuningOf(args), args.backingIsUri),
    mode: args.mode,
  }, closers, log);
}

/**
 * The tuning for a backing device of this kind: in front of an NBD export (a remote store) a
 * fragmented read is not gathered by one backing read unless asked for (fragmented_read_pieces),
 * because a round trip to the store costs more than the local reads of the pieces.
 */
export function backingTuning(tuning: Partial<CacheTuning>, backingIsUri: boolean): Partial<CacheTuning> {
  if (!backingIsUri || tuning.fragmentedReadPieces !== undefined) return tuning;
  return { ...tuning, fragmentedReadPieces: 0 };
}

/** Opens the cache on `device` in front of `backing`, logs what the start found, and wraps it for serve and the control socket. */
export async function serveCache(device: BlockDevice, backing: BlockDevice, options: CacheServeOptions, closers: Closer[], log: Logger): Promise<Served> {
  const formatted = options.formatIfBlank && await probeDevice(device) === 'blank';
  let cache: Cache;
  try {
    cache = await Cache.open({
      cacheDevice: device,
      backingDevice: backing,
      formatIfBlank: !options.formatIfBlank ? false : {
        ...(options.gcPercent === undefined ? {} : { gcPercent: options.gcPercent }),
        ...(options.segmentSizeBytes === undefined ? {} : { segmentSizeBytes: options.segmentSizeBytes }),
      },
      readOnly: options.readOnly,
      acceptOtherBackingIdentity: options.forceBacking,
      acceptLogLoss: options.acceptLogLoss,
      acceptBackingChange: options.acceptBackingChange,
      tuning: options.tuning,
    });
  } catch (error) {
    if (!isPcacheError(error)) throw error;
    const hint = error.reason === 'other-backing-identity' ? ': add --force-backing to accept it'
      : error.reason === 'log-damaged' ? ` (pcache check --cache ${options.cacheName}; then --accept-log-loss)`
        : error.reason === 'backing-changed' ? ' (--accept-backing-change writes the dirty data over the changed device)' : '';
    throw new PcacheError(error.code, `cannot serve ${options.backingName} through ${options.cacheName}: ${error.message}${hint}`, { cause: error, reason: error.reason });
  }
  closers.push(() => cache.close());
  if (options.gcPercent !== undefined && !formatted) await cache.setGcPercent(options.gcPercent);
  if (options.mode !== undefined) {
    try {
      await cache.setMode(options.mode);
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      throw new PcacheError(error.code, `cannot serve ${options.backingName} through ${options.cacheName} in mode ${options.mode}: ${error.message}`, { cause: error });
    }
  }
  const segmentSizeBytes = cache.status().segmentSizeBytes;
  if (options.segmentSizeBytes !== undefined && !formatted && options.segmentSizeBytes !== segmentSizeBytes) {
    log.warn({ segmentSizeBytes }, `--segment-size ${options.segmentSizeBytes} is not applied: the cache was formatted with segments of ${segmentSizeBytes} bytes (format it again to change them)`);
  }
  const { ksets, keys, staleKeys, stopReason, stopDamage, dataCrcErrors } = cache.replayResult;
  const replay = { ksets, keys, staleKeys, stopReason, stopDamage, dataCrcErrors: dataCrcErrors.length };
  if (stopDamage || dataCrcErrors.length > 0) log.warn({ replay }, 'replay found damage');
  if (cache.replayResult.damage !== undefined) log.error({ damage: describeLogDamage(cache.replayResult.damage) }, 'serving a damaged log: writes from the damaged kset on are lost (--accept-log-loss)');
  const { found, droppedCleanBytes } = cache.backingCheck;
  if (found === 'changed') log.warn({ droppedCleanBytes }, 'the backing device changed since the last clean stop (or the cache was detached): its clean cached copies were dropped');
  if (cache.status().formatVersion === 1) {
    log.warn({ formatVersion: 1 }, 'format version 1: losing one 4 KiB block of metadata can make this cache unreadable; drain it and format it again to get version 2');
  }
  return {
    export: cache,
    cacheSizeBytes: device.sizeBytes,
    formatted,
    startFacts: { cacheUuid: cache.status().cacheUuid, formatted, replay, backing: cache.backingCheck },
    status: () => {
      const status = cache.status();
      return { dmStatusLine: dmStatusLine(status), cache: status };
    },
    cacheStatus: () => cache.status(),
    retryBacking: () => { cache.retryBackingNow(); },
    drain: async () => {
      const startedMs = performance.now();
      log.info({ dirtyBytes: cache.status().dirtyBytes }, 'drain started');
      await cache.drain();
      log.info({ seconds: ((performance.now() - startedMs) / 1000).toFixed(1) }, 'drain finished');
    },
    set: async (changes) => {
      if (Object.keys(changes).length === 0) return currentSettings(cache);
      if (options.readOnly) throw new PcacheError('EPERM', 'the cache is served --read-only: its settings cannot change');
      return applySettings(cache, changes);
    },
    invalidate: () => cache.invalidate(),
    detach: () => cache.detach(),
    checkpoint: (held, signal) => cache.checkpoint(held, signal),
  };
}

export function noCacheExport(backing: BlockDevice): Served {
  return {
    export: new DeviceExport(backing),
    cacheSizeBytes: 0,
    formatted: false,
    startFacts: {},
    status: () => ({ dmStatusLine: null, cache: null }),
    cacheStatus: () => undefined,
    retryBacking: () => undefined,
    drain: () => backing.sync(),
    set: () => Promise.reject(new PcacheError('ENOTSUP', 'served with --no-cache: there are no cache settings')),
    invalidate: () => Promise.reject(new PcacheError('ENOTSUP', 'served with --no-cache: nothing is cached')),
    detach: () => Promise.reject(new PcacheError('ENOTSUP', 'served with --no-cache: there is no cache to detach')),
    // Without a cache, every write is on the backing device when it is answered: there is nothing to hold.
    checkpoint: (held) => backing.sync().then(() => held({ seq: 0, lsn: 0 })),
  };
}
