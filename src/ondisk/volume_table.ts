// The volume table: which volumes a pool holds and which units each one owns. Two copies of
// 16 KiB (pool_layout.ts), dual-copy rule (meta_header.ts); the table is the only record of
// unit ownership, so replacing it is the one atomic step of adding or removing a volume.
//
//   offset  size  field
//   0       8     meta header (crc, seq, version = 3, reserved); CRC covers bytes 4..16384
//   8       8     magic: ASCII "pcacheVT"
//   16      8     generation       +1 at every change (what `pcache check` reports)
//   24      4     next_volume_id   ids are never reused
//   28      4     volume_count     0 .. 16
//   32      32    reserved (zero)
//   64 + v * 768  one entry per volume:
//     0     4     volume_id        1 .. next_volume_id-1
//     4     4     slot             0 .. 15: where its front metadata lives
//     8     4     flags            bit 0 DATA_CRC: its share is formatted with data CRCs
//     12    4     extent_count     1 .. 32
//     16    2     name_length      1 .. 64
//     18    2     backing_length   1 .. 384
//     20    1     gc_percent       0 .. 90: its share's GC threshold when formatted
//     21    3     reserved (zero)
//     24    64    name             UTF-8, zero-padded: the NBD export name
//     88    384   backing          UTF-8, zero-padded: an absolute path or an nbd:// URI
//     472   256   extents          extent_count x (first_unit u32, unit_count u32), in the
//                                  order the volume's segments use them; the rest zero
//     728   40    reserved (zero)
//
// The flags and gc_percent say how to format the share again (a resize; a format cut short).
// Validation keeps the pool's invariants: names, slots, ids and backings unique, every extent
// inside the device, no unit in two extents (of one volume or two), every share big enough
// for a cache.

import { isAllZero, readU16LE, readU32LE, readU64LE, writeU16LE, writeU32LE, writeU64LE } from '../lib/units.js';
import { gcPercentMax, segmentCountMin } from './layout.js';
import { checkMetaRecord, sealMetaRecord, type Decoded } from './meta_header.js';
import { poolFormatVersion, volumeExtentsMax, volumesMax, volumeTableBytes } from './pool_layout.js';

const tableMagic = 'pcacheVT';
const headerBytes = 64;
const entryBytes = 768;
export const volumeNameMaxBytes = 64;
export const volumeBackingMaxBytes = 384;
/** A volume name is an NBD export name that needs no quoting in a URI or a shell. */
const volumeNamePattern = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;

export interface VolumeExtent {
  readonly firstUnit: number;
  readonly unitCount: number;
}

export interface VolumeEntry {
  readonly volumeId: number;
  readonly slot: number;
  readonly name: string;
  readonly backing: string;
  readonly dataCrc: boolean;
  readonly gcPercent: number;
  readonly extents: readonly VolumeExtent[];
}

const flagDataCrc = 1 << 0;

export interface VolumeTable {
  readonly generation: number;
  readonly nextVolumeId: number;
  readonly volumes: readonly VolumeEntry[];
}

export const emptyVolumeTable: VolumeTable = { generation: 1, nextVolumeId: 1, volumes: [] };

/** Units a volume owns. */
export function volumeUnits(entry: Pick<VolumeEntry, 'extents'>): number {
  return entry.extents.reduce((sum, extent) => sum + extent.unitCount, 0);
}

/** Why `name` cannot name a volume, or undefined. */
export function volumeNameProblem(name: string): string | undefined {
  if (name.length === 0) return 'a volume name cannot be empty';
  if (Buffer.byteLength(name, 'utf8') > volumeNameMaxBytes) return `volume name "${name}" is longer than ${volumeNameMaxBytes} bytes`;
  if (!volumeNamePattern.test(name)) return `volume name "${name}" is not a valid export name here: use letters, digits, '.', '_' and '-', starting with a letter or digit`;
  return undefined;
}

export function encodeVolumeTable(table: VolumeTable, seq: number, unitCount: number): Uint8Array {
  const problem = validateVolumeTable(table, unitCount);
  if (problem !== undefined) throw new RangeError(`refusing to encode an invalid volume table: ${problem}`);
  const record = new Uint8Array(volumeTableBytes);
  record.set(Buffer.from(tableMagic, 'ascii'), 8);
  writeU64LE(record, 16, table.generation);
  writeU32LE(record, 24, table.nextVolumeId);
  writeU32LE(record, 28, table.volumes.length);
  table.volumes.forEach((volume, index) => {
    const at = headerBytes + index * entryBytes;
    const name = Buffer.from(volume.name, 'utf8');
    const backing = Buffer.from(volume.backing, 'utf8');
    writeU32LE(record, at, volume.volumeId);
    writeU32LE(record, at + 4, volume.slot);
    writeU32LE(record, at + 8, volume.dataCrc ? flagDataCrc : 0);
    writeU32LE(record, at + 12, volume.extents.length);
    record[at + 20] = volume.gcPercent;
    writeU16LE(record, at + 16, name.length);
    writeU16LE(record, at + 18, backing.length);
    record.set(name, at + 24);
    record.set(backing, at + 88);
    volume.extents.forEach((extent, e) => {
      writeU32LE(record, at + 472 + e * 8, extent.firstUnit);
      writeU32LE(record, at + 476 + e * 8, extent.unitCount);
    });
  });
  return sealMetaRecord(record, seq, poolFormatVersion);
}

/** Decodes and validates one copy of the table; the only way bytes become a VolumeTable. */
export function decodeVolumeTable(record: Uint8Array, unitCount: number, name: string): Decoded<VolumeTable> {
  if (record.length < volumeTableBytes) return { ok: false, problem: `${name}: record too short` };
  const bytes = record.subarray(0, volumeTableBytes);
  const checked = checkMetaRecord(bytes, name, poolFormatVersion);
  if ('problem' in checked) return { ok: false, ...checked };
  if (Buffer.from(bytes.subarray(8, 16)).toString('latin1') !== tableMagic) return { ok: false, problem: `${name}: no volume table magic` };
  const count = readU32LE(bytes, 28);
  if (count > volumesMax) return { ok: false, problem: `${name}: ${count} volumes, more than ${volumesMax}` };
  if (!isAllZero(bytes.subarray(32, headerBytes))) return { ok: false, problem: `${name}: reserved bytes are not zero` };
  const volumes: VolumeEntry[] = [];
  for (let index = 0; index < count; index++) {
    const at = headerBytes + index * entryBytes;
    const extentCount = readU32LE(bytes, at + 12);
    const nameLength = readU16LE(bytes, at + 16);
    const backingLength = readU16LE(bytes, at + 18);
    const where = `${name}: volume entry ${index}`;
    const flags = readU32LE(bytes, at + 8);
    if ((flags & ~flagDataCrc) !== 0) return { ok: false, problem: `${where}: unknown flags ${flags}` };
    if (!isAllZero(bytes.subarray(at + 21, at + 24)) || !isAllZero(bytes.subarray(at + 472 + extentCount * 8, at + entryBytes))) return { ok: false, problem: `${where}: reserved bytes are not zero` };
    if (extentCount < 1 || extentCount > volumeExtentsMax) return { ok: false, problem: `${where}: ${extentCount} extents (1 .. ${volumeExtentsMax})` };
    if (nameLength > volumeNameMaxBytes || backingLength > volumeBackingMaxBytes) return { ok: false, problem: `${where}: name or backing too long` };
    const extents: VolumeExtent[] = [];
    for (let e = 0; e < extentCount; e++) extents.push({ firstUnit: readU32LE(bytes, at + 472 + e * 8), unitCount: readU32LE(bytes, at + 476 + e * 8) });
    volumes.push({
      volumeId: readU32LE(bytes, at),
      slot: readU32LE(bytes, at + 4),
      name: Buffer.from(bytes.subarray(at + 24, at + 24 + nameLength)).toString('utf8'),
      backing: Buffer.from(bytes.subarray(at + 88, at + 88 + backingLength)).toString('utf8'),
      dataCrc: (flags & flagDataCrc) !== 0,
      gcPercent: bytes[at + 20] ?? 0,
      extents,
    });
  }
  const table: VolumeTable = { generation: readU64LE(bytes, 16), nextVolumeId: readU32LE(bytes, 24), volumes };
  const problem = validateVolumeTable(table, unitCount);
  if (problem !== undefined) return { ok: false, problem: `${name}: ${problem}` };
  return { ok: true, value: table, seq: checked.seq };
}

/** Why the table breaks the pool's invariants (see the file comment), or undefined. */
export function validateVolumeTable(table: VolumeTable, unitCount: number): string | undefined {
  if (!Number.isSafeInteger(table.generation) || table.generation < 1) return `generation ${table.generation} is invalid`;
  if (table.volumes.length > volumesMax) return `${table.volumes.length} volumes, more than ${volumesMax}`;
  const owner = new Map<number, string>();
  const seen = { names: new Set<string>(), slots: new Set<number>(), ids: new Set<number>(), backings: new Set<string>() };
  for (const volume of table.volumes) {
    const nameProblem = volumeNameProblem(volume.name);
    if (nameProblem !== undefined) return nameProblem;
    const label = `volume "${volume.name}"`;
    if (seen.names.has(volume.name)) return `${label} appears twice`;
    if (!Number.isInteger(volume.volumeId) || volume.volumeId < 1 || volume.volumeId >= table.nextVolumeId) return `${label}: id ${volume.volumeId} is not below next_volume_id ${table.nextVolumeId}`;
    if (seen.ids.has(volume.volumeId)) return `${label}: id ${volume.volumeId} is used twice`;
    if (!Number.isInteger(volume.slot) || volume.slot < 0 || volume.slot >= volumesMax) return `${label}: slot ${volume.slot} is out of range`;
    if (seen.slots.has(volume.slot)) return `${label}: slot ${volume.slot} is used twice`;
    if (volume.backing.length === 0 || Buffer.byteLength(volume.backing, 'utf8') > volumeBackingMaxBytes) return `${label}: backing must be 1 .. ${volumeBackingMaxBytes} bytes`;
    if (seen.backings.has(volume.backing)) return `${label}: backing ${volume.backing} is used by another volume`;
    if (!Number.isInteger(volume.gcPercent) || volume.gcPercent < 0 || volume.gcPercent > gcPercentMax) return `${label}: gc_percent ${volume.gcPercent} is out of range`;
    if (volume.extents.length < 1 || volume.extents.length > volumeExtentsMax) return `${label}: ${volume.extents.length} extents (1 .. ${volumeExtentsMax})`;
    for (const extent of volume.extents) {
      if (!Number.isInteger(extent.firstUnit) || !Number.isInteger(extent.unitCount) || extent.unitCount < 1 || extent.firstUnit < 0 || extent.firstUnit + extent.unitCount > unitCount) {
        return `${label}: extent ${extent.firstUnit}+${extent.unitCount} is outside the ${unitCount} units`;
      }
      for (let unit = extent.firstUnit; unit < extent.firstUnit + extent.unitCount; unit++) {
        const other = owner.get(unit);
        if (other !== undefined) return `unit ${unit} is owned by volume "${other}" and volume "${volume.name}"`;
        owner.set(unit, volume.name);
      }
    }
    if (volumeUnits(volume) < segmentCountMin) return `${label}: ${volumeUnits(volume)} units, fewer than a cache's ${segmentCountMin} segments`;
    seen.names.add(volume.name);
    seen.ids.add(volume.volumeId);
    seen.slots.add(volume.slot);
    seen.backings.add(volume.backing);
  }
  return undefined;
}

/** Units no volume owns, ascending. */
export function freeUnits(table: VolumeTable, unitCount: number): number[] {
  const owned = new Uint8Array(unitCount);
  for (const volume of table.volumes) for (const extent of volume.extents) owned.fill(1, extent.firstUnit, extent.firstUnit + extent.unitCount);
  const free: number[] = [];
  for (let unit = 0; unit < unitCount; unit++) if (owned[unit] === 0) free.push(unit);
  return free;
}

/** The first `count` free units as extents (runs of consecutive units), or undefined when there are too few or they are too scattered. */
export function carveExtents(free: readonly number[], count: number): VolumeExtent[] | undefined {
  if (free.length < count) return undefined;
  const extents: { firstUnit: number; unitCount: number }[] = [];
  for (const unit of free.slice(0, count)) {
    const last = extents[extents.length - 1];
    if (last !== undefined && last.firstUnit + last.unitCount === unit) last.unitCount++;
    else extents.push({ firstUnit: unit, unitCount: 1 });
  }
  return extents.length <= volumeExtentsMax ? extents : undefined;
}
