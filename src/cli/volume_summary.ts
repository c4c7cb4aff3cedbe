// What both ways of serving a pool's volumes (volume_set.ts in this process, volume_processes.ts
// in a process per volume) answer alike: a volume's line in `pcache volume list` and `pcache
// status`, the pool's own line, picking a volume by name with the same errors, what a removal or
// a resize asks and when a removal is refused, and opening a volume's cache on its share with
// the settings every volume gets. Keeping them here keeps the two layouts' answers the same
// shape by construction.

import type { CacheMode } from '../ondisk/cache_info.js';
import type { CacheStatus, CacheTuning } from '../cache/cache.js';
import type { CachePool } from '../cache/cache_pool.js';
import type { BlockDevice } from '../device/block_device.js';
import { PcacheError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { looksLikeNbdUri } from '../nbd/client/uri.js';
import { volumeUnits, type VolumeEntry } from '../ondisk/volume_table.js';
import type { Logger } from './log.js';
import type { Closer } from './serve_lifecycle.js';
import { backingTuning, serveCache, type Served } from './serve_open.js';

/** What a volume's line is made of, whichever process serves it. */
export interface VolumeFacts {
  readonly entry: VolumeEntry;
  readonly segmentSizeBytes: number;
  readonly uri: string | undefined;
  /** Why the volume is not served; undefined while it is. */
  readonly failure: string | undefined;
  /** Its cache's status, when it is open and known. */
  readonly status: CacheStatus | undefined;
  readonly connections: number;
}

/** A volume's line in `pcache volume list` (and, with its cache's status, in `pcache status`). */
export function volumeSummary(facts: VolumeFacts): Record<string, unknown> {
  const { entry, status } = facts;
  const units = volumeUnits(entry);
  return {
    name: entry.name,
    backing: entry.backing,
    uri: facts.uri ?? null,
    state: facts.failure !== undefined ? 'failed' : status?.state ?? 'unknown',
    failure: facts.failure ?? null,
    shareBytes: units * facts.segmentSizeBytes,
    segments: units,
    segmentsUsed: status?.segsUsed ?? null,
    gcPercent: status?.gcPercent ?? null,
    dirtyBytes: status?.dirtyBytes ?? null,
    mode: status?.mode ?? null,
    readHits: status?.counters.readHitRequests ?? null,
    readMisses: status?.counters.readMissRequests ?? null,
    connections: facts.connections,
  };
}

/** The pool's own line in `pcache status`. */
export function poolSummary(pool: CachePool): Record<string, unknown> {
  const ownership = pool.ownershipReport();
  return {
    segmentSizeBytes: pool.segmentSizeBytes,
    segments: pool.sb.unitCount,
    segmentsFree: ownership.unitsFree,
    freeBytes: ownership.unitsFree * pool.segmentSizeBytes,
    tableGeneration: pool.table.generation,
  };
}

/**
 * The volume named `name` (with no name, the only one there is); EINVAL naming the volumes
 * there are otherwise.
 */
export function volumeNamed<V>(volumes: ReadonlyMap<string, V>, name: string | undefined): V {
  if (name === undefined) {
    const only = volumes.size === 1 ? [...volumes.values()][0] : undefined;
    if (only === undefined) throw new PcacheError('EINVAL', `name the volume (--volume NAME): this server serves ${volumes.size === 0 ? 'no volumes' : `${volumes.size}: ${namesOf(volumes)}`}`);
    return only;
  }
  const volume = volumes.get(name);
  if (volume === undefined) throw new PcacheError('EINVAL', `no volume named "${name}" (volumes: ${namesOf(volumes) || 'none'})`);
  return volume;
}

function namesOf(volumes: ReadonlyMap<string, unknown>): string {
  return [...volumes.keys()].join(', ');
}

/** Where a volume's cache is opened: its share, its backing device, and what it is called. */
/** What `pcache volume remove` asks: the volume, and whether to write back or disconnect first. */
export interface RemoveRequest {
  readonly name: string;
  readonly drain: boolean;
  readonly disconnect: boolean;
}

export function removeRequestOf(fields: Readonly<Record<string, unknown>>, name: string): RemoveRequest {
  return { name, drain: fields.drain === true, disconnect: fields.disconnect === true };
}

/** What a removal is checked against (see refuseRemoval). */
export interface RemovalFacts {
  /** Why the volume is not served; undefined while it is. */
  readonly failure: string | undefined;
  readonly connections: number;
  readonly dirtyBytes: number;
  readonly backing: string;
}

/**
 * EINVAL (reason volume-busy) when removing the volume now would lose data or cut clients off
 * unasked: a volume not served (whether it holds dirty data is unknown), clients connected
 * without `disconnect`, dirty data without `drain`.
 */
export function refuseRemoval(request: RemoveRequest, facts: RemovalFacts): void {
  const name = request.name;
  if (facts.failure !== undefined) {
    throw new PcacheError('EINVAL', `volume "${name}" is not serving (${facts.failure}), so whether it holds dirty data is unknown: make its backing device reachable and restart the server, then remove it`, { reason: 'volume-busy' });
  }
  const connections = facts.connections;
  if (connections > 0 && !request.disconnect) {
    throw new PcacheError('EINVAL', `volume "${name}" has ${connections} client connection${connections === 1 ? '' : 's'}: disconnect them first, or remove it with --disconnect`, { reason: 'volume-busy' });
  }
  if (facts.dirtyBytes > 0 && !request.drain) {
    throw new PcacheError('EINVAL', `volume "${name}" holds ${formatSize(facts.dirtyBytes)} of dirty data not yet on ${facts.backing}: remove it with --drain to write it back first`, { reason: 'volume-busy' });
  }
}

/** The new share a resize asks for, in bytes; EINVAL unless a positive integer. */
export function resizeShareBytesOf(fields: Readonly<Record<string, unknown>>): number {
  const shareBytes = fields.cacheSizeBytes;
  if (typeof shareBytes !== 'number' || !Number.isSafeInteger(shareBytes) || shareBytes <= 0) throw new PcacheError('EINVAL', 'cacheSizeBytes must be a positive integer (the volume\'s new share, in bytes)');
  return shareBytes;
}

export interface VolumeCacheTarget {
  readonly share: BlockDevice;
  readonly backing: BlockDevice;
  readonly cachePath: string;
  readonly name: string;
  /** The backing device as the volume table records it (a path or an NBD URI). */
  readonly backingName: string;
  readonly tuning: Partial<CacheTuning>;
  /** The write mode to set again after a resize; undefined keeps the one on the device. */
  readonly mode: CacheMode | undefined;
}

/**
 * Opens a volume's cache on its share (already formatted: a volume's share is never formatted
 * by opening it), as serve opens a cache, with what every volume gets: no log loss or backing
 * change accepted silently, and a remote backing device's tuning.
 */
export function serveVolumeCache(target: VolumeCacheTarget, closers: Closer[], log: Logger): Promise<Served> {
  return serveCache(target.share, target.backing, {
    cacheName: `${target.cachePath} (volume ${target.name})`,
    backingName: target.backingName,
    formatIfBlank: false,
    readOnly: false,
    gcPercent: undefined,
    segmentSizeBytes: undefined,
    forceBacking: false,
    acceptLogLoss: false,
    acceptBackingChange: false,
    tuning: backingTuning(target.tuning, looksLikeNbdUri(target.backingName)),
    mode: target.mode,
  }, closers, log);
}
