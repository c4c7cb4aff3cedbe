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
import { formatCacheDevice } from '../cache/cache_metadata.js';
import type { CachePool } from '../cache/cache_pool.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { looksLikeNbdUri, parseNbdUri } from '../nbd/client/uri.js';
import type { ExportMap } from '../nbd/server/export_catalog.js';
import { gcPercentMax } from '../ondisk/layout.js';
import { volumeUnits, type VolumeEntry } from '../ondisk/volume_table.js';
import type { Logger } from './log.js';
import { closeAll, type Closer } from './serve_lifecycle.js';
import { openBacking, serveCache, type Served } from './serve_open.js';
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
  readonly entry: VolumeEntry;
  /** Undefined when the volume could not be opened (`failure` says why). */
  readonly served: Served | undefined;
  readonly failure: string | undefined;
  /** The backing device's identity (a file's device and inode), to refuse a second volume on it. */
  readonly identity: string | undefined;
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
  private changing: Promise<unknown> = Promise.resolve();

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
    return [...this.volumes.values()].map((volume) => {
      const status = volume.served?.cacheStatus();
      const units = volumeUnits(volume.entry);
      return {
        name: volume.entry.name,
        backing: volume.entry.backing,
        uri: this.uriOf(volume.entry.name) ?? null,
        state: volume.failure !== undefined ? 'failed' : status?.state ?? 'unknown',
        failure: volume.failure ?? null,
        shareBytes: units * this.pool.segmentSizeBytes,
        segments: units,
        segmentsUsed: status?.segsUsed ?? null,
        gcPercent: status?.gcPercent ?? null,
        dirtyBytes: status?.dirtyBytes ?? null,
        mode: status?.mode ?? null,
        readHits: status?.counters.readHitRequests ?? null,
        readMisses: status?.counters.readMissRequests ?? null,
        connections: this.clients?.connectionCount(volume.entry.name) ?? 0,
      };
    });
  }

  /** The pool and every volume, for `pcache status`. */
  status(): Record<string, unknown> {
    const ownership = this.pool.ownershipReport();
    return {
      pool: {
        segmentSizeBytes: this.pool.segmentSizeBytes,
        segments: this.pool.sb.unitCount,
        segmentsFree: ownership.unitsFree,
        freeBytes: ownership.unitsFree * this.pool.segmentSizeBytes,
        tableGeneration: this.pool.table.generation,
      },
      volumes: this.list().map((summary) => ({ ...summary, cache: this.volumes.get(String(summary.name))?.served?.cacheStatus() ?? null })),
    };
  }

  /** The served volume named `name`; EINVAL naming the volumes there are. */
  served(name: string | undefined): Served {
    if (name === undefined) {
      const only = this.volumes.size === 1 ? [...this.volumes.values()][0] : undefined;
      if (only === undefined) throw new PcacheError('EINVAL', `name the volume (--volume NAME): this server serves ${this.volumes.size === 0 ? 'no volumes' : `${this.volumes.size}: ${this.names()}`}`);
      return this.servedOf(only);
    }
    const volume = this.volumes.get(name);
    if (volume === undefined) throw new PcacheError('EINVAL', `no volume named "${name}" (volumes: ${this.names() || 'none'})`);
    return this.servedOf(volume);
  }

  /** Every served volume (drain without a name drains them all). */
  allServed(): Served[] {
    const all: Served[] = [];
    for (const volume of this.volumes.values()) if (volume.served !== undefined) all.push(volume.served);
    return all;
  }

  /** Adds a volume from a control request's fields (see the file comment for what is checked first). */
  add(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    return this.serialised(() => this.addNow(fields));
  }

  remove(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    return this.serialised(() => this.removeNow(fields));
  }

  /** Closes every volume (the server is stopping). */
  async closeAll(): Promise<void> {
    const closers: Closer[] = [];
    for (const volume of this.volumes.values()) closers.push(() => closeAll(volume.closers));
    this.volumes.clear();
    await closeAll(closers);
  }

  private servedOf(volume: ServedVolume): Served {
    if (volume.served === undefined) throw new PcacheError('ENODEV', `volume "${volume.entry.name}" is not serving: ${volume.failure ?? 'it failed to open'}`);
    return volume.served;
  }

  private names(): string {
    return [...this.volumes.keys()].join(', ');
  }

  private serialised<T>(change: () => Promise<T>): Promise<T> {
    const next = this.changing.then(change, change);
    this.changing = next.catch(() => undefined);
    return next;
  }

  private async addNow(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
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
    // Everything the table can tell, before the backing device is opened.
    this.pool.planVolume({ name, backing, shareBytes });
    const closers: Closer[] = [];
    try {
      const opened = await openBacking({ backingPath: backing, backingIsUri, backingConnections: this.options.backingConnections, readOnly: false }, this.log);
      closers.push(() => opened.device.close());
      const identity = opened.device.identity;
      const twin = identity === undefined ? undefined : [...this.volumes.values()].find((volume) => volume.identity === identity);
      if (twin !== undefined) throw new PcacheError('EINVAL', `backing device ${backing} is the one volume "${twin.entry.name}" uses (${twin.entry.backing})`);
      const entry = await this.pool.addVolume({ name, backing, shareBytes }, async (share) => {
        await formatCacheDevice(share, opened.device, {
          segmentSizeBytes: this.pool.segmentSizeBytes,
          ...(gcPercent === undefined ? {} : { gcPercent }),
          ...(dataCrc === undefined ? {} : { dataCrc }),
        });
      });
      const volume = await this.open(entry, { device: opened.device, identity, whenBackOnline: (callback) => { opened.whenBackOnline(callback); }, closers });
      this.volumes.set(name, volume);
      this.log.info({ volume: name, backing, shareBytes: volumeUnits(entry) * this.pool.segmentSizeBytes, failure: volume.failure ?? null }, 'volume added');
      return this.list().find((summary) => summary.name === name) ?? {};
    } catch (error) {
      await closeAll(closers);
      throw error;
    }
  }

  private async removeNow(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    const name = stringField(fields, 'name');
    const drain = fields.drain === true;
    const disconnect = fields.disconnect === true;
    const volume = this.volumes.get(name);
    if (volume === undefined) throw new PcacheError('EINVAL', `no volume named "${name}" (volumes: ${this.names() || 'none'})`);
    if (volume.served === undefined) {
      throw new PcacheError('EINVAL', `volume "${name}" is not serving (${volume.failure ?? 'it failed to open'}), so whether it holds dirty data is unknown: make its backing device reachable and restart the server, then remove it`, { reason: 'volume-busy' });
    }
    const connections = this.clients?.connectionCount(name) ?? 0;
    if (connections > 0 && !disconnect) {
      throw new PcacheError('EINVAL', `volume "${name}" has ${connections} client connection${connections === 1 ? '' : 's'}: disconnect them first, or remove it with --disconnect`, { reason: 'volume-busy' });
    }
    const dirtyBytes = volume.served.cacheStatus()?.dirtyBytes ?? 0;
    if (dirtyBytes > 0 && !drain) {
      throw new PcacheError('EINVAL', `volume "${name}" holds ${formatSize(dirtyBytes)} of dirty data not yet on ${volume.entry.backing}: remove it with --drain to write it back first`, { reason: 'volume-busy' });
    }
    // No new client from here on; the connected ones go before the drain.
    const exported = this.exports.remove(name);
    try {
      if (disconnect) await this.clients?.disconnect(name);
      if (drain) await volume.served.drain();
    } catch (error) {
      if (exported !== undefined) this.exports.add(exported);
      throw error;
    }
    this.volumes.delete(name);
    await closeAll(volume.closers);
    await this.pool.removeVolume(name);
    const freedBytes = volumeUnits(volume.entry) * this.pool.segmentSizeBytes;
    this.log.info({ volume: name, freedBytes, drained: drain, disconnected: disconnect }, 'volume removed');
    return { removed: name, freedBytes };
  }

  /**
   * Opens a volume's cache on its share and exports it. `backing`: the device `add` opened
   * already; otherwise the recorded one is opened here. Failures become a failed volume.
   */
  private async open(entry: VolumeEntry, backing: { device: BlockDevice; identity: string | undefined; whenBackOnline: (callback: () => void) => void; closers: Closer[] } | undefined): Promise<ServedVolume> {
    const closers: Closer[] = backing?.closers ?? [];
    let identity = backing?.identity;
    try {
      let device = backing?.device;
      let whenBackOnline = backing?.whenBackOnline;
      if (device === undefined) {
        const opened = await openBacking({ backingPath: entry.backing, backingIsUri: looksLikeNbdUri(entry.backing), backingConnections: this.options.backingConnections, readOnly: false }, this.log);
        closers.push(() => opened.device.close());
        device = opened.device;
        identity = opened.device.identity;
        whenBackOnline = (callback: () => void): void => { opened.whenBackOnline(callback); };
      }
      const share = this.pool.volumeDevice(entry);
      closers.push(() => share.close());
      const served = await serveCache(share, device, {
        cacheName: `${this.options.cachePath} (volume ${entry.name})`,
        backingName: entry.backing,
        formatIfBlank: false,
        readOnly: false,
        gcPercent: undefined,
        segmentSizeBytes: undefined,
        forceBacking: false,
        acceptLogLoss: false,
        acceptBackingChange: false,
        tuning: this.options.tuning,
        mode: undefined,
      }, closers, this.log);
      whenBackOnline?.(() => { served.retryBacking(); });
      this.exports.add({ name: entry.name, description: `pcache volume ${entry.name}: ${entry.backing} cached on ${this.options.cachePath}`, export: served.export });
      closers.push(() => {
        this.exports.remove(entry.name);
        return Promise.resolve();
      });
      return { entry, served, failure: undefined, identity, closers };
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      await closeAll(closers).catch(() => undefined);
      this.log.error({ volume: entry.name, backing: entry.backing, reason: error.message }, 'volume not served: it cannot be opened (the other volumes serve on)');
      return { entry, served: undefined, failure: error.message, identity, closers: [] };
    }
  }
}

function stringField(fields: Readonly<Record<string, unknown>>, name: string): string {
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
