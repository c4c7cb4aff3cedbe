// The pool's on-disk records: the volume table and the pool superblock round-trip, and every
// invariant of the table (names, slots, ids, backings, unit ownership) is refused on decode.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { MiB } from '../../src/lib/units.js';
import { poolDeviceBytesFor, poolFormatVersion, volumeTableBytes } from '../../src/ondisk/pool_layout.js';
import { decodePoolSuperblock, encodePoolSuperblock, isPoolSuperblock } from '../../src/ondisk/pool_superblock.js';
import { decodeSuperblock } from '../../src/ondisk/superblock.js';
import {
  carveExtents, decodeVolumeTable, encodeVolumeTable, freeUnits, validateVolumeTable, volumeNameProblem, type VolumeEntry, type VolumeTable,
} from '../../src/ondisk/volume_table.js';

const units = 64;
const one: VolumeEntry = { volumeId: 1, slot: 0, name: 'one', backing: '/srv/one.img', dataCrc: false, gcPercent: 70, extents: [{ firstUnit: 0, unitCount: 8 }] };
const two: VolumeEntry = { volumeId: 2, slot: 3, name: 'two.b_c-d', backing: 'nbd+unix:///disk?socket=/run/nbd.sock', dataCrc: true, gcPercent: 0, extents: [{ firstUnit: 8, unitCount: 4 }, { firstUnit: 20, unitCount: 6 }] };
const table: VolumeTable = { generation: 7, nextVolumeId: 3, volumes: [one, two] };

describe('volume table', () => {
  it('round-trips every field', () => {
    const result = decodeVolumeTable(encodeVolumeTable(table, 9, units), units, 'copy');
    assert.ok(result.ok, result.ok ? '' : result.problem);
    assert.equal(result.seq, 9);
    assert.deepEqual(result.value, table);
  });

  it('refuses a damaged copy by its CRC, and names a blank one blank', () => {
    const record = encodeVolumeTable(table, 1, units);
    record[100] = (record[100] ?? 0) ^ 1;
    const damaged = decodeVolumeTable(record, units, 'copy 1');
    assert.ok(!damaged.ok && /CRC/.test(damaged.problem));
    const blank = decodeVolumeTable(new Uint8Array(volumeTableBytes), units, 'copy 1');
    assert.ok(!blank.ok && blank.blank === true);
  });

  it('refuses every broken invariant', () => {
    const cases: [string, VolumeTable, RegExp][] = [
      ['a unit owned twice', { ...table, volumes: [one, { ...two, extents: [{ firstUnit: 7, unitCount: 4 }] }] }, /unit 7 is owned by volume "one" and volume "two/],
      ['overlapping extents of one volume', { ...table, volumes: [{ ...one, extents: [{ firstUnit: 0, unitCount: 4 }, { firstUnit: 2, unitCount: 4 }] }] }, /unit 2 is owned by volume "one" and volume "one"/],
      ['an extent past the device', { ...table, volumes: [{ ...one, extents: [{ firstUnit: 60, unitCount: 8 }] }] }, /outside the 64 units/],
      ['a duplicate name', { ...table, volumes: [one, { ...two, name: 'one' }] }, /appears twice/],
      ['a duplicate slot', { ...table, volumes: [one, { ...two, slot: 0 }] }, /slot 0 is used twice/],
      ['a slot out of range', { ...table, volumes: [{ ...one, slot: 16 }] }, /slot 16 is out of range/],
      ['a duplicate backing', { ...table, volumes: [one, { ...two, backing: one.backing }] }, /used by another volume/],
      ['an id not below next_volume_id', { ...table, nextVolumeId: 2 }, /id 2 is not below next_volume_id 2/],
      ['a share below 4 segments', { ...table, volumes: [{ ...one, extents: [{ firstUnit: 0, unitCount: 3 }] }] }, /3 units, fewer than/],
      ['a bad name', { ...table, volumes: [{ ...one, name: 'a/b' }] }, /not a valid export name/],
      ['a gc_percent out of range', { ...table, volumes: [{ ...one, gcPercent: 91 }] }, /gc_percent 91/],
    ];
    for (const [what, broken, expected] of cases) {
      const problem = validateVolumeTable(broken, units);
      assert.ok(problem !== undefined && expected.test(problem), `${what}: ${String(problem)}`);
      assert.throws(() => encodeVolumeTable(broken, 1, units), /refusing to encode/, what);
    }
  });

  it('decodes a table whose unit count no longer fits as damage (refused, not trusted)', () => {
    const result = decodeVolumeTable(encodeVolumeTable(table, 1, units), 16, 'copy 0');
    assert.ok(!result.ok && /outside the 16 units/.test(result.problem));
  });

  it('carves free units into extents, first fit', () => {
    const free = freeUnits(table, units);
    assert.equal(free.length, units - 18);
    assert.deepEqual(free.slice(0, 3), [12, 13, 14]);
    assert.deepEqual(carveExtents(free, 10), [{ firstUnit: 12, unitCount: 8 }, { firstUnit: 26, unitCount: 2 }]);
    assert.equal(carveExtents(free, units), undefined);
  });

  it('accepts export-safe names only', () => {
    for (const good of ['a', 'vm-01', 'db.data_2', 'X'.repeat(64)]) assert.equal(volumeNameProblem(good), undefined, good);
    for (const bad of ['', '-lead', '.hidden', 'sp ace', 'sl/ash', 'ü', 'X'.repeat(65)]) assert.ok(volumeNameProblem(bad) !== undefined, bad);
  });
});

describe('pool superblock', () => {
  const sb = { segmentSizeBytes: 16 * MiB, unitCount: 12, volumesMax: 16, poolUuid: new Uint8Array(16).fill(7), formatTimeMs: 1_700_000_000_000 };

  it('round-trips, and checks the units against the device size', () => {
    const record = encodePoolSuperblock(sb);
    assert.ok(isPoolSuperblock(record));
    const result = decodePoolSuperblock(record, poolDeviceBytesFor(12, 16 * MiB));
    assert.ok(result.ok);
    assert.deepEqual(result.value, sb);
    const small = decodePoolSuperblock(record, poolDeviceBytesFor(11, 16 * MiB));
    assert.ok(!small.ok && /do not fit/.test(small.problem));
  });

  it('is refused by the cache superblock decoder by its version, with a message that says what to do', () => {
    const record = new Uint8Array(200);
    record.set(encodePoolSuperblock(sb));
    assert.equal(record[5], poolFormatVersion);
    const result = decodeSuperblock(record, poolDeviceBytesFor(12, 16 * MiB));
    assert.ok(!result.ok && /holds volumes/.test(result.problem) && /without --backing/.test(result.problem));
  });
});
