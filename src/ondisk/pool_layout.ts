// Where everything lives on a cache device formatted for volumes (format version 3, "pool").
//
// A pool is one cache device shared by several volumes, each with its own backing device and a
// dedicated share of the device's segments (the RFC's cache_dev / backing_dev model). Each
// volume's share is an ordinary version 2 cache (layout.ts), laid over the pool through a
// VolumeDevice (device/volume_device.ts): its 20 KiB of front metadata and its last 4 KiB block
// live in a slot of the pool's header, its segments are units of the pool.
//
//   byte offset              size            content
//   0                        4 KiB           zero (a device whose format was cut short is blank)
//   4 KiB                    4 KiB           pool superblock copy 0 (pool_superblock.ts)
//   8 KiB                    16 KiB          volume table copy 0 (volume_table.ts)
//   24 KiB                   16 KiB          volume table copy 1
//   40 KiB + s * 24 KiB      24 KiB          volume slot s (s = 0 .. volumesMax-1): the volume's
//                                            front metadata (20 KiB), then its last block (4 KiB)
//   1 MiB + u * segSize      segSize         unit u (u = 0 .. unitCount-1): one segment of
//                                            whichever volume the table gives it to
//   last 4 KiB of device     4 KiB           pool superblock copy 1
//
// Invariants: no unit belongs to two volumes, and a unit no volume owns holds nothing anyone
// reads (the table is the only record of ownership, so a crash cannot leak a unit).

import { KiB, MiB } from '../lib/units.js';
import { blockBytes, lastBlockOffsetBytes, segmentsOffsetBytes } from './layout.js';

export const poolFormatVersion = 3;

export const poolSuperblockOffsetBytes = 4 * KiB;
export const volumeTableBytes = 16 * KiB;
export const volumeTableOffsetsBytes = [8 * KiB, 24 * KiB] as const;
/** A volume's front metadata (a version 2 cache's bytes before its first segment) and its last block. */
export const volumeSlotBytes = segmentsOffsetBytes + blockBytes;
export const volumeSlotsOffsetBytes = 40 * KiB;
/** Volumes one pool holds: the table's and the slots' room. */
export const volumesMax = 16;
export const unitsOffsetBytes = 1 * MiB;
/** Extents (runs of units) one volume's share may have. */
export const volumeExtentsMax = 32;

export function volumeSlotOffsetBytes(slot: number): number {
  return volumeSlotsOffsetBytes + slot * volumeSlotBytes;
}

export function unitOffsetBytes(unit: number, segmentSizeBytes: number): number {
  return unitsOffsetBytes + unit * segmentSizeBytes;
}

/** Units a device of `deviceSizeBytes` holds: they end before its last 4 KiB block (the superblock's second copy). */
export function poolUnitCountFor(deviceSizeBytes: number, segmentSizeBytes: number): number {
  const endBytes = lastBlockOffsetBytes(deviceSizeBytes);
  return Math.max(0, Math.floor((endBytes - unitsOffsetBytes) / segmentSizeBytes));
}

/** The smallest device that holds `units` units (tests size their devices with it). */
export function poolDeviceBytesFor(units: number, segmentSizeBytes: number): number {
  return unitsOffsetBytes + units * segmentSizeBytes + blockBytes;
}

// The slots end before the units start.
if (volumeSlotOffsetBytes(volumesMax) > unitsOffsetBytes) throw new Error('pool layout: the volume slots overlap the units');
if (volumeTableOffsetsBytes[1] + volumeTableBytes > volumeSlotsOffsetBytes) throw new Error('pool layout: the volume table overlaps the slots');
