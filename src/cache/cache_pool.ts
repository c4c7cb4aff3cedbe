// CachePool: a cache device shared by several volumes (ondisk/pool_layout.ts). It owns the
// pool's metadata — its superblock and the volume table — and hands each volume a
// VolumeDevice over its share, on which an ordinary cache engine runs.
//
// Invariants:
// - The volume table on the device is the truth about ownership; the in-memory copy equals the
//   newest valid copy on the device, and changes only after a new table is durable.
// - Adding a volume formats its share first (units no volume owns, its free slot), then
//   commits the table: a crash before the commit leaves the old table, the units free; after
//   it, the new table with a formatted share. Removing is one table commit. No crash can leave
//   a unit owned twice or owned by nobody-but-lost: ownership is read from the table only.
// - A commit writes the older copy and syncs (the commit point), then the other copy and
//   syncs, so afterwards both copies hold the new table and losing either block loses nothing.
// - Table changes are serialised: one at a time, in the order asked.

import { randomUUID } from 'node:crypto';
import type { BlockDevice } from '../device/block_device.js';
import { VolumeDevice, type VolumeGeometry } from '../device/volume_device.js';
import { PcacheError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { blankProbeBytes, blockBytes, gcPercentDefault, gcPercentMax, lastBlockOffsetBytes, segmentCountMin, segmentSizeDefaultBytes, segmentSizeProblem, segmentsOffsetBytes } from '../ondisk/layout.js';
import { chooseLatest, DualCopyWriter, type Decoded, type DualCopyChoice } from '../ondisk/meta_header.js';
import { poolUnitCountFor, unitOffsetBytes, volumeExtentsMax, volumeSlotOffsetBytes, volumesMax, volumeTableBytes, volumeTableOffsetsBytes, poolSuperblockOffsetBytes } from '../ondisk/pool_layout.js';
import { decodePoolSuperblock, encodePoolSuperblock, isPoolSuperblock, poolSuperblockRecordBytes, type PoolSuperblock } from '../ondisk/pool_superblock.js';
import {
  carveExtents, decodeVolumeTable, emptyVolumeTable, encodeVolumeTable, freeUnits, volumeNameProblem, volumeUnits, type VolumeEntry, type VolumeExtent, type VolumeTable,
} from '../ondisk/volume_table.js';
import { probeDevice } from './cache_metadata.js';

export interface PoolFormatOptions {
  readonly segmentSizeBytes?: number;
  readonly poolUuid?: Uint8Array;
  readonly formatTimeMs?: number;
}

/** A volume to add: its name, its backing device as recorded, its share in bytes, and how its share is formatted. */
export interface VolumeRequest {
  readonly name: string;
  readonly backing: string;
  readonly shareBytes: number;
  readonly dataCrc?: boolean;
  readonly gcPercent?: number;
}

/** Formats a volume's share as a cache, as its entry says (data CRCs, gc_percent). */
export type ShareFormatter = (device: VolumeDevice, entry: VolumeEntry) => Promise<void>;

/** Whether the device holds a pool (either superblock copy says so). Reads two blocks. */
export async function holdsPool(device: BlockDevice): Promise<boolean> {
  if (device.sizeBytes < 2 * blankProbeBytes) return false;
  for (const at of [poolSuperblockOffsetBytes, lastBlockOffsetBytes(device.sizeBytes)]) {
    const bytes = new Uint8Array(poolSuperblockRecordBytes);
    await device.read(bytes, at);
    if (isPoolSuperblock(bytes)) return true;
  }
  return false;
}

export class CachePool {
  readonly device: BlockDevice;
  readonly sb: PoolSuperblock;
  /** Damage found at open in copies that had a good twin (what `pcache check` reports). */
  readonly damage: readonly string[];
  private current: VolumeTable;
  private readonly writer: DualCopyWriter;
  private changing: Promise<unknown> = Promise.resolve();

  private constructor(device: BlockDevice, sb: PoolSuperblock, table: DualCopyChoice<VolumeTable>, damage: string[]) {
    this.device = device;
    this.sb = sb;
    this.current = table.value ?? emptyVolumeTable;
    this.writer = new DualCopyWriter(table);
    this.damage = damage;
  }

  /**
   * Formats `device` as an empty pool: clears the superblock places, writes the empty table's
   * two copies, then the superblock's (a format cut short leaves the first 8 KiB zero: blank).
   */
  static async format(device: BlockDevice, options: PoolFormatOptions = {}): Promise<CachePool> {
    const segmentSizeBytes = options.segmentSizeBytes ?? segmentSizeDefaultBytes;
    const sizeProblem = segmentSizeProblem(segmentSizeBytes);
    if (sizeProblem !== undefined) throw new PcacheError('EINVAL', sizeProblem);
    const unitCount = poolUnitCountFor(device.sizeBytes, segmentSizeBytes);
    if (unitCount < segmentCountMin) {
      throw new PcacheError('EINVAL', `a cache device of ${device.sizeBytes} bytes holds ${unitCount} units of ${segmentSizeBytes} bytes; a pool needs room for at least one volume of ${segmentCountMin}: ` +
        `use a cache device of at least ${formatSize(unitOffsetBytes(segmentCountMin, segmentSizeBytes) + blockBytes)}`);
    }
    const sb: PoolSuperblock = {
      segmentSizeBytes,
      unitCount,
      volumesMax,
      poolUuid: options.poolUuid ?? Buffer.from(randomUUID().replaceAll('-', ''), 'hex'),
      formatTimeMs: options.formatTimeMs ?? Date.now(),
    };
    const places = [poolSuperblockOffsetBytes, lastBlockOffsetBytes(device.sizeBytes)];
    for (const at of places) await device.write(new Uint8Array(blockBytes), at);
    await device.sync();
    await device.write(encodeVolumeTable(emptyVolumeTable, 1, unitCount), volumeTableOffsetsBytes[0]);
    await device.write(encodeVolumeTable(emptyVolumeTable, 2, unitCount), volumeTableOffsetsBytes[1]);
    await device.sync();
    const record = encodePoolSuperblock(sb);
    for (const at of places) await device.write(record, at);
    await device.sync();
    return CachePool.open(device);
  }

  /** Reads and validates the pool's metadata. CORRUPT when a record has no valid copy. */
  static async open(device: BlockDevice): Promise<CachePool> {
    const damage: string[] = [];
    let sb: PoolSuperblock | undefined;
    for (const [index, at] of [poolSuperblockOffsetBytes, lastBlockOffsetBytes(device.sizeBytes)].entries()) {
      const bytes = new Uint8Array(poolSuperblockRecordBytes);
      await device.read(bytes, at);
      const decoded = decodePoolSuperblock(bytes, device.sizeBytes);
      if (decoded.ok) sb ??= decoded.value;
      else damage.push(`pool superblock copy ${index}: ${decoded.problem}`);
    }
    if (sb === undefined) throw new PcacheError('CORRUPT', `the pool superblock has no valid copy (${damage.join('; ')})`);
    const readCopy = async (index: 0 | 1): Promise<Decoded<VolumeTable>> => {
      const bytes = new Uint8Array(volumeTableBytes);
      await device.read(bytes, volumeTableOffsetsBytes[index]);
      return decodeVolumeTable(bytes, sb.unitCount, `volume table copy ${index}`);
    };
    const choice = chooseLatest([await readCopy(0), await readCopy(1)]);
    damage.push(...choice.damage);
    if (choice.value === undefined) throw new PcacheError('CORRUPT', `the volume table has no valid copy (${choice.problems.join('; ')})`);
    return new CachePool(device, sb, choice, damage);
  }

  get table(): VolumeTable {
    return this.current;
  }

  get segmentSizeBytes(): number {
    return this.sb.segmentSizeBytes;
  }

  volume(name: string): VolumeEntry | undefined {
    return this.current.volumes.find((volume) => volume.name === name);
  }

  freeUnitCount(): number {
    return freeUnits(this.current, this.sb.unitCount).length;
  }

  /** The engine's view of a volume's share. */
  volumeDevice(entry: VolumeEntry): VolumeDevice {
    return new VolumeDevice(this.device, this.volumeGeometry(entry));
  }

  /** Where a volume's share lies on the pool device (plain data: a volume process builds its own VolumeDevice from it). */
  volumeGeometry(entry: VolumeEntry): VolumeGeometry {
    const unitOffsetsBytes: number[] = [];
    for (const extent of entry.extents) {
      for (let unit = extent.firstUnit; unit < extent.firstUnit + extent.unitCount; unit++) unitOffsetsBytes.push(unitOffsetBytes(unit, this.sb.segmentSizeBytes));
    }
    return {
      slotOffsetBytes: volumeSlotOffsetBytes(entry.slot),
      frontBytes: segmentsOffsetBytes,
      endBytes: blockBytes,
      segmentSizeBytes: this.sb.segmentSizeBytes,
      unitOffsetsBytes,
    };
  }

  /**
   * The entry a new volume would get: checks the name, the backing and the share against the
   * table now (EINVAL; ENOSPC when the free units are too few). Changes nothing.
   */
  planVolume(request: VolumeRequest): VolumeEntry {
    const nameProblem = volumeNameProblem(request.name);
    if (nameProblem !== undefined) throw new PcacheError('EINVAL', nameProblem);
    if (this.volume(request.name) !== undefined) throw new PcacheError('EINVAL', `a volume named "${request.name}" exists already`);
    const user = this.current.volumes.find((volume) => volume.backing === request.backing);
    if (user !== undefined) throw new PcacheError('EINVAL', `backing device ${request.backing} is used by volume "${user.name}" already`);
    const units = this.shareUnits(request.shareBytes);
    const extents = this.carve(units);
    const slots = new Set(this.current.volumes.map((volume) => volume.slot));
    let slot = 0;
    while (slots.has(slot)) slot++;
    if (slot >= volumesMax) throw new PcacheError('ENOSPC', `the cache device holds ${volumesMax} volumes already, its maximum`);
    const gcPercent = request.gcPercent ?? gcPercentDefault;
    if (!Number.isInteger(gcPercent) || gcPercent < 0 || gcPercent > gcPercentMax) throw new PcacheError('EINVAL', `gc_percent must be 0..${gcPercentMax}, got ${gcPercent}`);
    return { volumeId: this.current.nextVolumeId, slot, name: request.name, backing: request.backing, dataCrc: request.dataCrc ?? false, gcPercent, extents };
  }

  /** Whole segments in a share of `shareBytes`; EINVAL below a cache's minimum. */
  private shareUnits(shareBytes: number): number {
    const seg = this.sb.segmentSizeBytes;
    const units = Math.floor(shareBytes / seg);
    if (!Number.isSafeInteger(shareBytes) || units < segmentCountMin) {
      throw new PcacheError('EINVAL', `a cache share of ${formatSize(shareBytes)} holds ${units} segments of ${formatSize(seg)}; a volume needs at least ${segmentCountMin} (--cache-size ${formatSize(segmentCountMin * seg)} or more)`);
    }
    return units;
  }

  /** `units` free units as extents; ENOSPC when there are too few, or they are too scattered. */
  private carve(units: number, extentsMax = volumeExtentsMax): VolumeExtent[] {
    const seg = this.sb.segmentSizeBytes;
    const free = freeUnits(this.current, this.sb.unitCount);
    if (free.length < units) {
      throw new PcacheError('ENOSPC', `a cache share of ${formatSize(units * seg)} does not fit: the cache device has ${formatSize(free.length * seg)} free (${free.length} segments of ${formatSize(seg)})`);
    }
    const extents = carveExtents(free, units);
    if (extents === undefined || extents.length > extentsMax) throw new PcacheError('ENOSPC', `the free space is too scattered for a share of ${units} more segments; remove a volume or ask for less`);
    return extents;
  }

  /**
   * Adds a volume: `formatShare` formats its share (nothing owns those units yet, so a crash
   * meanwhile changes nothing; the format clears the slot's superblock places first, so an
   * earlier volume's records there are never taken for the new one's), then the new table is
   * committed. The entry is checked again
   * against the table as it is when its turn comes.
   */
  addVolume(request: VolumeRequest, formatShare: ShareFormatter): Promise<VolumeEntry> {
    return this.serialised(async () => {
      const entry = this.planVolume(request);
      const share = this.volumeDevice(entry);
      await formatShare(share, entry);
      await this.commit({ generation: this.current.generation + 1, nextVolumeId: entry.volumeId + 1, volumes: [...this.current.volumes, entry] });
      return entry;
    });
  }

  /**
   * Gives a volume a share of `shareBytes`, formatted afresh (its caller has written everything
   * back and closed its engine: the share's cached copies go, the backing device holds the
   * data). Growing commits the table with the added units first and then formats the share over
   * all of them; shrinking formats the share over its first units first and then commits the
   * table without the rest. A crash in between leaves the old or the new table and a share that
   * is a valid cache of at most the table's units, or blank mid-format (which
   * formatBlankShares formats again at the next open): never a unit owned twice.
   */
  resizeVolume(name: string, shareBytes: number, formatShare: ShareFormatter): Promise<VolumeEntry> {
    return this.serialised(async () => {
      const resized = this.planResize(name, shareBytes);
      const have = volumeUnits(this.volume(name) ?? resized);
      const units = volumeUnits(resized);
      const table = { ...this.current, generation: this.current.generation + 1, volumes: this.current.volumes.map((volume) => (volume.name === name ? resized : volume)) };
      if (units > have) await this.commit(table);
      await blankShare(this.volumeDevice(resized));
      await formatShare(this.volumeDevice(resized), resized);
      if (units < have) await this.commit(table);
      return resized;
    });
  }

  /** The entry a volume would have with a share of `shareBytes` (EINVAL, ENOSPC as planVolume). Changes nothing. */
  planResize(name: string, shareBytes: number): VolumeEntry {
    const entry = this.volume(name);
    if (entry === undefined) throw new PcacheError('EINVAL', `no volume named "${name}"`);
    const units = this.shareUnits(shareBytes);
    const have = volumeUnits(entry);
    if (units === have) return entry;
    const extents = units > have ? mergeExtents([...entry.extents, ...this.carve(units - have, volumeExtentsMax - entry.extents.length + 1)]) : firstUnits(entry.extents, units);
    if (extents.length > volumeExtentsMax) throw new PcacheError('ENOSPC', 'the free space is too scattered to grow this volume; remove a volume or ask for less');
    return { ...entry, extents };
  }

  /** Removes a volume from the table; its units are free once this resolves. The caller stopped its engine. */
  removeVolume(name: string): Promise<void> {
    return this.serialised(async () => {
      if (this.volume(name) === undefined) throw new PcacheError('EINVAL', `no volume named "${name}"`);
      await this.commit({ ...this.current, generation: this.current.generation + 1, volumes: this.current.volumes.filter((volume) => volume.name !== name) });
    });
  }

  /** Problems with unit ownership (none for a table that decoded; `pcache check` prints them). */
  ownershipReport(): { readonly unitsOwned: number; readonly unitsFree: number; readonly byVolume: Record<string, number> } {
    const byVolume: Record<string, number> = {};
    for (const volume of this.current.volumes) byVolume[volume.name] = volumeUnits(volume);
    const unitsFree = this.freeUnitCount();
    return { unitsOwned: this.sb.unitCount - unitsFree, unitsFree, byVolume };
  }

  /** The volumes whose shares are blank (a format cut short by a crash: an add never commits an unformatted share). */
  async blankShares(): Promise<VolumeEntry[]> {
    const blank: VolumeEntry[] = [];
    for (const entry of this.current.volumes) if (await probeDevice(this.volumeDevice(entry)) === 'blank') blank.push(entry);
    return blank;
  }

  private serialised<T>(change: () => Promise<T>): Promise<T> {
    const next = this.changing.then(change, change);
    this.changing = next.catch(() => undefined);
    return next;
  }

  /** Writes the older copy and syncs (the commit point), then the other one and syncs. */
  private async commit(table: VolumeTable): Promise<void> {
    for (let copy = 0; copy < 2; copy++) {
      const target = this.writer.target();
      await this.device.write(encodeVolumeTable(table, target.seq, this.sb.unitCount), volumeTableOffsetsBytes[target.index]);
      await this.device.sync();
      this.writer.written(target);
      this.current = table;
    }
  }
}

/**
 * Makes a share read as blank before it is formatted again: its first 8 KiB (the probe's) and
 * its last block zeroed and synced. The format writes them last, so a format cut short leaves
 * a blank share — which the server formats again — and never the remains of the old cache,
 * which would pass for a damaged one.
 */
async function blankShare(share: VolumeDevice): Promise<void> {
  await share.write(new Uint8Array(blankProbeBytes), 0);
  await share.write(new Uint8Array(blockBytes), lastBlockOffsetBytes(share.sizeBytes));
  await share.sync();
}

/** Adjacent extents joined (a grown share's new units may continue its last extent). */
function mergeExtents(extents: readonly VolumeExtent[]): VolumeExtent[] {
  const merged: { firstUnit: number; unitCount: number }[] = [];
  for (const extent of extents) {
    const last = merged[merged.length - 1];
    if (last !== undefined && last.firstUnit + last.unitCount === extent.firstUnit) last.unitCount += extent.unitCount;
    else merged.push({ ...extent });
  }
  return merged;
}

/** The first `units` units of `extents`, in order. */
function firstUnits(extents: readonly VolumeExtent[], units: number): VolumeExtent[] {
  const kept: VolumeExtent[] = [];
  let left = units;
  for (const extent of extents) {
    if (left === 0) break;
    const take = Math.min(left, extent.unitCount);
    kept.push({ firstUnit: extent.firstUnit, unitCount: take });
    left -= take;
  }
  return kept;
}
