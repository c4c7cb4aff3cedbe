// VolumeSet: the volumes a `pcache serve` without --backing serves from one cache device
// (cache/cache_pool.ts), each a cache engine on its share in front of its own backing device,
// each an NBD export of its own name.
//
// Invariants:
// - A volume that cannot be opened (its backing device missing or unreachable, its share
//   damaged) is left out of the exports and reported as failed; the others serve on. Nothing
//   of a failed volume is written, and it cannot be removed (its dirty data is unknown).
// - `add` checks everything it can before it writes: the name, the share against the free
//   space, the backing device (it exists, it opens, no other volume uses it by path, URI or
//   identity); the pool then formats the share and commits the table (crash-atomic), and only
//   then is the volume exported.
// - `remove` refuses while the volume holds dirty data or clients are connected, unless told
//   to drain or disconnect; its export goes first, so no client can write while it drains.
// - Adds and removes run one at a time, in the order asked.

import fs from 'node:fs';
import path from 'node:path';
import type { CacheStatus, CacheTuning } from '../cache/cache.js';
import { formatCacheDevice, probeDevice } from '../cache/cache_metadata.js';
import type { CachePool, ShareFormatter } from '../cache/cache_pool.js';
import type { CacheMode } from '../ondisk/cache_info.js';
import { SwitchableExport } from './volume_export.js';
import { SerialSection } from '../lib/background_task.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { assert } from '../lib/assert.js';
import { looksLikeNbdUri, parseNbdUri } from '../nbd/client/uri.js';
import type { ExportMap } from '../nbd/server/export_catalog.js';
import { gcPercentMax } from '../ondisk/layout.js';
import { volumeUnits, type VolumeEntry } from '../ondisk/volume_table.js';
import type { Logger } from './log.js';
import { closeAll, type Closer } from './serve_lifecycle.js';
import { openBacking, type Served } from './serve_open.js';
import { poolSummary, refuseRemoval, removeRequestOf, resizeShareBytesOf, serveVolumeCache, volumeNamed, volumeSummary } from './volume_summary.js';
import type { BlockDevice } from '../device/block_device.js';

/** What the server is to the volumes: how many clients use an export, and cutting them off. */
export interface VolumeClients {
  connectionCount(name: string): number;
  disconnect(name: string): Promise<void> | void;
}

export interface VolumeSetOptions {
  readonly cachePath: string;
  readonly tuning: Partial<CacheTuning>;
  readonly backingConnections: number;
}

interface ServedVolume {
  entry: VolumeEntry;
  /** Undefined when the volume could not be opened (`failure` says why). */
  served: Served | undefined;
  failure: string | undefined;
  /** The backing device's identity (a file's device and inode), to refuse a second volume on it. */
  readonly identity: string | undefined;
  /** The backing device, open while the volume is (a resize opens the new cache on it). */
  readonly backing: BlockDevice | undefined;
  /** What clients are served: the cache behind it is replaced by a resize. */
  export: SwitchableExport | undefined;
  /** Close the cache (and its share); then `backingClosers` close the backing device. */
  cacheClosers: Closer[];
  readonly backingClosers: Closer[];
}

/** A volume's backing device, opened. */
interface OpenedVolumeBacking {
  readonly device: BlockDevice;
  readonly identity: string | undefined;
  readonly whenBackOnline: (callback: () => void) => void;
  readonly closers: Closer[];
}

export class VolumeSet {
  private readonly pool: CachePool;
  private readonly exports: ExportMap;
  private readonly log: Logger;
  private readonly options: VolumeSetOptions;
  private readonly volumes = new Map<string, ServedVolume>();
  private clients: VolumeClients | undefined;
  private uriOf: (name: string) => string | undefined = () => undefined;
  /** Adds, removes and resizes, one at a time in the order asked. */
  private readonly changes = new SerialSection();

  constructor(pool: CachePool, exports: ExportMap, log: Logger, options: VolumeSetOptions) {
    this.pool = pool;
    this.exports = exports;
    this.log = log;
    this.options = options;
  }

  /** Once the NBD server listens: who is connected, and each volume's URI. */
  attach(clients: VolumeClients, uriOf: (name: string) => string): void {
    this.clients = clients;
    this.uriOf = uriOf;
  }

  /** Opens every volume of the table; a volume that fails is logged and reported, the others serve. */
  async openAll(): Promise<void> {
    for (const entry of this.pool.table.volumes) {
      const volume = await this.open(entry, undefined);
      this.volumes.set(entry.name, volume);
    }
  }

  /** Every open cache's status, by volume (metrics). */
  caches(): { volume: string; status: CacheStatus }[] {
    const found: { volume: string; status: CacheStatus }[] = [];
    for (const [name, volume] of this.volumes) {
      const status = volume.served?.cacheStatus();
      if (status !== undefined) found.push({ volume: name, status });
    }
    return found;
  }

  /** What `pcache volume list` shows. */
  list(): Record<string, unknown>[] {
    return [...this.volumes.values()].map((volume) => volumeSummary({
      entry: volume.entry,
      segmentSizeBytes: this.pool.segmentSizeBytes,
      uri: this.uriOf(volume.entry.name),
      failure: volume.failure,
      status: volume.served?.cacheStatus(),
      connections: this.clients?.connectionCount(volume.entry.name) ?? 0,
    }));
  }

  /** The pool and every volume, for `pcache status`. */
  status(): Record<string, unknown> {
    return {
      pool: poolSummary(this.pool),
      volumes: this.list().map((summary) => ({ ...summary, cache: this.volumes.get(String(summary.name))?.served?.cacheStatus() ?? null })),
    };
  }

  /** The served volume named `name`; EINVAL naming the volumes there are. */
  served(name: string | undefined): Served {
    return this.servedOf(volumeNamed(this.volumes, name));
  }

  /** Every served volume (drain without a name drains them all). */
  allServed(): Served[] {
    const all: Served[] = [];
    for (const volume of this.volumes.values()) if (volume.served !== undefined) all.push(volume.served);
    return all;
  }

  /** Adds a volume from a control request's fields (see the file comment for what is checked first). */
  add(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    return this.changes.run(() => this.addNow(fields));
  }

  remove(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    return this.changes.run(() => this.removeNow(fields));
  }

  resize(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    return this.changes.run(() => this.resizeNow(fields));
  }

  /** Closes every volume (the server is stopping). */
  async closeAll(): Promise<void> {
    const closers: Closer[] = [];
    for (const volume of this.volumes.values()) closers.push(() => closeVolume(volume));
    this.volumes.clear();
    await closeAll(closers);
  }

  private servedOf(volume: ServedVolume): Served {
    if (volume.served === undefined) throw new PcacheError('ENODEV', `volume "${volume.entry.name}" is not serving: ${volume.failure ?? 'it failed to open'}`);
    return volume.served;
  }


  private async addNow(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    const { name, backing, backingIsUri, shareBytes, gcPercent, dataCrc } = addRequestOf(fields);
    // Everything the table can tell, before the backing device is opened.
    this.pool.planVolume({ name, backing, shareBytes, ...(gcPercent === undefined ? {} : { gcPercent }) });
    const closers: Closer[] = [];
    try {
      const opened = await openBacking({ backingPath: backing, backingIsUri, backingConnections: this.options.backingConnections, readOnly: false }, this.log);
      closers.push(() => opened.device.close());
      const identity = opened.device.identity;
      const twin = identity === undefined ? undefined : [...this.volumes.values()].find((volume) => volume.identity === identity);
      if (twin !== undefined) throw new PcacheError('EINVAL', `backing device ${backing} is the one volume "${twin.entry.name}" uses (${twin.entry.backing})`);
      const entry = await this.pool.addVolume({ name, backing, shareBytes, ...(gcPercent === undefined ? {} : { gcPercent }), ...(dataCrc === undefined ? {} : { dataCrc }) }, this.formatter(opened.device));
      const volume = await this.open(entry, { device: opened.device, identity, whenBackOnline: (callback) => { opened.whenBackOnline(callback); }, closers });
      closers.length = 0; // the volume owns them now
      this.volumes.set(name, volume);
      this.log.info({ volume: name, backing, shareBytes: volumeUnits(entry) * this.pool.segmentSizeBytes, failure: volume.failure ?? null }, 'volume added');
      return this.list().find((summary) => summary.name === name) ?? {};
    } catch (error) {
      await closeAll(closers);
      throw error;
    }
  }

  private async removeNow(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    const request = removeRequestOf(fields, stringField(fields, 'name'));
    const { name, drain, disconnect } = request;
    const volume = volumeNamed(this.volumes, name);
    const served = volume.served;
    refuseRemoval(request, {
      failure: served === undefined ? volume.failure ?? 'it failed to open' : undefined,
      connections: this.clients?.connectionCount(name) ?? 0,
      dirtyBytes: served?.cacheStatus()?.dirtyBytes ?? 0,
      backing: volume.entry.backing,
    });
    assert(served !== undefined, 'a removable volume is served');
    // No new client from here on; the connected ones go before the drain.
    const exported = this.exports.remove(name);
    try {
      if (disconnect) await this.clients?.disconnect(name);
      if (drain) await served.drain();
    } catch (error) {
      if (exported !== undefined) this.exports.add(exported);
      throw error;
    }
    this.volumes.delete(name);
    await closeVolume(volume);
    await this.pool.removeVolume(name);
    const freedBytes = volumeUnits(volume.entry) * this.pool.segmentSizeBytes;
    this.log.info({ volume: name, freedBytes, drained: drain, disconnected: disconnect }, 'volume removed');
    return { removed: name, freedBytes };
  }

  /**
   * Gives a volume a share of `shareBytes` while its clients stay connected: everything is
   * written back (clients keep writing meanwhile), then their requests wait while the rest is
   * written back, the cache closes, the pool formats the share at its new size
   * (CachePool.resizeVolume), and a new cache opens on it. The volume keeps its data (on its
   * backing device) and starts with nothing cached. If anything fails after the cache closed,
   * the volume is opened again as the table and its share then say.
   */
  private async resizeNow(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    const name = stringField(fields, 'name');
    const shareBytes = resizeShareBytesOf(fields);
    const volume = volumeNamed(this.volumes, name);
    const served = this.servedOf(volume);
    const backing = volume.backing;
    if (backing === undefined) throw new PcacheError('ENODEV', `volume "${name}" has no backing device open`);
    const before = volumeUnits(volume.entry);
    if (volumeUnits(this.pool.planResize(name, shareBytes)) === before) return this.list().find((summary) => summary.name === name) ?? {};
    const mode = served.cacheStatus()?.mode;
    const startedMs = performance.now();
    await served.drain();
    volume.export?.pause();
    const pausedMs = performance.now();
    try {
      await served.drain();
      await closeAll(volume.cacheClosers.splice(0));
      volume.served = undefined;
      let failure: Error | undefined;
      try {
        volume.entry = await this.pool.resizeVolume(name, shareBytes, this.formatter(backing));
      } catch (error) {
        failure = error instanceof Error ? error : new Error(String(error));
        volume.entry = this.pool.volume(name) ?? volume.entry;
        await this.formatIfBlank(volume.entry, backing);
      }
      await this.openCache(volume, backing, mode);
      if (failure !== undefined) throw failure;
    } finally {
      if (volume.served !== undefined) volume.export?.resume(volume.served.export);
    }
    const units = volumeUnits(volume.entry);
    this.log.info({ volume: name, fromBytes: before * this.pool.segmentSizeBytes, toBytes: units * this.pool.segmentSizeBytes, pausedMs: Math.round(performance.now() - pausedMs), totalMs: Math.round(performance.now() - startedMs) }, 'volume resized');
    return this.list().find((summary) => summary.name === name) ?? {};
  }

  /**
   * A share left blank by a format cut short (a resize: an add never commits an unformatted
   * share) is formatted again. Its volume was written back before the format began: nothing
   * is lost, nothing is cached.
   */
  private async formatIfBlank(entry: VolumeEntry, backing: BlockDevice): Promise<void> {
    const share = this.pool.volumeDevice(entry);
    if (await probeDevice(share) !== 'blank') return;
    this.log.warn({ volume: entry.name }, 'the volume\'s share is blank (a resize was cut short after everything was written back): formatting it again; nothing is lost, nothing is cached');
    await this.formatter(backing)(share, entry);
  }

  /** Formats a share for `backing`, as its entry says. */
  private formatter(backing: BlockDevice): ShareFormatter {
    return async (share, entry) => {
      await formatCacheDevice(share, backing, { segmentSizeBytes: this.pool.segmentSizeBytes, gcPercent: entry.gcPercent, dataCrc: entry.dataCrc });
    };
  }

  /**
   * Opens a volume: its backing device (`backing`: the one `add` opened already; otherwise the
   * recorded one is opened here), its cache on its share, and its export. A share left blank by
   * a format that a crash cut short (a resize) is formatted again. Failures become a failed
   * volume: logged, not exported, the others serve on.
   */
  private async open(entry: VolumeEntry, backing: OpenedVolumeBacking | undefined): Promise<ServedVolume> {
    const backingClosers: Closer[] = backing?.closers ?? [];
    let opened = backing;
    try {
      if (opened === undefined) {
        const device = await openBacking({ backingPath: entry.backing, backingIsUri: looksLikeNbdUri(entry.backing), backingConnections: this.options.backingConnections, readOnly: false }, this.log);
        backingClosers.push(() => device.device.close());
        opened = { device: device.device, identity: device.device.identity, whenBackOnline: (callback) => { device.whenBackOnline(callback); }, closers: backingClosers };
      }
      const volume: ServedVolume = { entry, served: undefined, failure: undefined, identity: opened.identity, backing: opened.device, export: undefined, cacheClosers: [], backingClosers };
      await this.formatIfBlank(entry, opened.device);
      const served = await this.openCache(volume, opened.device, undefined);
      const exported = new SwitchableExport(served.export);
      opened.whenBackOnline(() => { volume.served?.retryBacking(); });
      this.exports.add({ name: entry.name, description: `pcache volume ${entry.name}: ${entry.backing} cached on ${this.options.cachePath}`, export: exported });
      backingClosers.push(() => {
        this.exports.remove(entry.name);
        return Promise.resolve();
      });
      volume.export = exported;
      return volume;
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      await closeAll(backingClosers).catch(() => undefined);
      this.log.error({ volume: entry.name, backing: entry.backing, reason: error.message }, 'volume not served: it cannot be opened (the other volumes serve on)');
      return { entry, served: undefined, failure: error.message, identity: opened?.identity, backing: undefined, export: undefined, cacheClosers: [], backingClosers: [] };
    }
  }

  /** Opens the volume's cache on its share (as its entry says now) and sets `volume.served`; `mode` is set again after a resize. */
  private async openCache(volume: ServedVolume, backing: BlockDevice, mode: CacheMode | undefined): Promise<Served> {
    const entry = volume.entry;
    const share = this.pool.volumeDevice(entry);
    const closers: Closer[] = [() => share.close()];
    try {
      const served = await serveVolumeCache({ share, backing, cachePath: this.options.cachePath, name: entry.name, backingName: entry.backing, tuning: this.options.tuning, mode }, closers, this.log);
      volume.served = served;
      volume.failure = undefined;
      volume.cacheClosers = closers;
      return served;
    } catch (error) {
      await closeAll(closers).catch(() => undefined);
      if (isPcacheError(error)) volume.failure = error.message;
      throw error;
    }
  }
}

/** Closes a volume: its cache first (the open kset is made durable), then its backing device. */
async function closeVolume(volume: ServedVolume): Promise<void> {
  await closeAll([() => closeAll(volume.backingClosers.splice(0)), () => closeAll(volume.cacheClosers.splice(0))]);
}

/** An add request's fields, checked (EINVAL); the backing device named by its real path (a file) or its URI. */
export interface AddRequest {
  readonly name: string;
  readonly backing: string;
  readonly backingIsUri: boolean;
  readonly shareBytes: number;
  readonly gcPercent: number | undefined;
  readonly dataCrc: boolean | undefined;
}

export function addRequestOf(fields: Readonly<Record<string, unknown>>): AddRequest {
  const name = stringField(fields, 'name');
  const backingText = stringField(fields, 'backing');
  const shareBytes = fields.cacheSizeBytes;
  if (typeof shareBytes !== 'number' || !Number.isSafeInteger(shareBytes) || shareBytes <= 0) throw new PcacheError('EINVAL', 'cacheSizeBytes must be a positive integer (bytes of the cache device for this volume)');
  const gcPercent = fields.gcPercent;
  if (gcPercent !== undefined && (typeof gcPercent !== 'number' || !Number.isInteger(gcPercent) || gcPercent < 0 || gcPercent > gcPercentMax)) throw new PcacheError('EINVAL', `gcPercent must be an integer 0..${gcPercentMax}`);
  const dataCrc = fields.dataCrc;
  if (dataCrc !== undefined && typeof dataCrc !== 'boolean') throw new PcacheError('EINVAL', 'dataCrc must be true or false');
  const backingIsUri = looksLikeNbdUri(backingText);
  const backing = backingIsUri ? checkedUri(backingText) : checkedFile(backingText);
  return { name, backing, backingIsUri, shareBytes, gcPercent, dataCrc };
}

export function stringField(fields: Readonly<Record<string, unknown>>, name: string): string {
  const value = fields[name];
  if (typeof value !== 'string' || value === '') throw new PcacheError('EINVAL', `${name} must be a non-empty string`);
  return value;
}

function checkedUri(text: string): string {
  parseNbdUri(text); // throws EINVAL with the reason
  return text;
}

/** An existing file or block device, by its absolute, symlink-free path (two spellings of one file are one backing). */
function checkedFile(text: string): string {
  const absolute = path.resolve(text);
  if (!fs.existsSync(absolute)) throw new PcacheError('EINVAL', `backing device ${absolute} does not exist (create it first: truncate -s SIZE ${absolute})`);
  return fs.realpathSync(absolute);
}
