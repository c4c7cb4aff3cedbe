// VolumeDevice: a volume's share of a pool seen as one device — its pieces mapped onto the
// pool, and `locate` answering only for ranges that lie in one piece.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileDevice } from '../../src/device/file_device.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { VolumeDevice, type VolumeGeometry } from '../../src/device/volume_device.js';
import { MiB } from '../../src/lib/units.js';
import { pattern } from '../helpers/cache_fixture.js';

let dir = '';
before(() => { dir = mkdtempSync(join(tmpdir(), 'pcache-volume-')); });
after(() => { rmSync(dir, { recursive: true, force: true }); });

const KiB = 1024;
// Front metadata at the slot (4 KiB), two 64 KiB units placed out of order, the last block after the front.
const geometry: VolumeGeometry = {
  slotOffsetBytes: 8 * KiB,
  frontBytes: 4 * KiB,
  endBytes: 4 * KiB,
  segmentSizeBytes: 64 * KiB,
  unitOffsetsBytes: [MiB, 512 * KiB],
};

describe('VolumeDevice', () => {
  it('maps its pieces onto the pool, and locates a range only within one piece', async () => {
    const path = join(dir, 'pool.img');
    FileDevice.create(path, 2 * MiB);
    const pool = await FileDevice.open(path, { blocking: true });
    const volume = new VolumeDevice(pool, geometry);
    assert.equal(volume.sizeBytes, 4 * KiB + 2 * 64 * KiB + 4 * KiB);
    const blocking = volume.blocking;
    assert.ok(blocking?.locate !== undefined, 'a volume of a file device locates its ranges');
    // The second unit's bytes live at 512 KiB of the pool.
    const data = pattern(7, 0, 8 * KiB);
    blocking.writeSync(data, 4 * KiB + 64 * KiB + 16 * KiB);
    const extent = blocking.locate(4 * KiB + 64 * KiB + 16 * KiB, 8 * KiB);
    assert.ok(extent !== undefined);
    assert.equal(extent.offsetBytes, 512 * KiB + 16 * KiB);
    const direct = Buffer.alloc(8 * KiB);
    pool.blocking?.readSync(direct, extent.offsetBytes);
    assert.deepEqual(direct, data);
    // The front, the first unit, and the end block.
    assert.equal(blocking.locate(0, 4 * KiB)?.offsetBytes, 8 * KiB);
    assert.equal(blocking.locate(4 * KiB, 64 * KiB)?.offsetBytes, MiB);
    assert.equal(blocking.locate(4 * KiB + 128 * KiB, 4 * KiB)?.offsetBytes, 8 * KiB + 4 * KiB);
    // A range across the two units is in two places: no single extent.
    assert.equal(blocking.locate(4 * KiB + 60 * KiB, 8 * KiB), undefined);
    await pool.close();
  });

  it('offers no locate over a pool that cannot locate', () => {
    const volume = new VolumeDevice(new MemoryDevice(2 * MiB), geometry);
    assert.equal(volume.blocking !== undefined && 'locate' in volume.blocking, false);
  });

  it('reads many pieces through the pool\'s readMany, a piece across two units split at their edge', async () => {
    const path = join(dir, 'pool-many.img');
    FileDevice.create(path, 2 * MiB);
    const pool = await FileDevice.open(path, { blocking: true });
    let batches = 0;
    const poolReadMany = pool.readMany.bind(pool);
    pool.readMany = (reads) => { batches++; return poolReadMany(reads); };
    const volume = new VolumeDevice(pool, geometry);
    assert.ok(volume.readMany !== undefined, 'a volume of a file device reads batches on its thread');
    const data = pattern(9, 0, volume.sizeBytes);
    volume.blocking?.writeSync(data, 0);
    const target = new Uint8Array(new SharedArrayBuffer(24 * KiB));
    await volume.readMany([
      { target: target.subarray(0, 8 * KiB), offsetBytes: 4 * KiB + 60 * KiB }, // across the two units
      { target: target.subarray(8 * KiB, 12 * KiB), offsetBytes: 0 }, // the front
      { target: target.subarray(12 * KiB, 24 * KiB), offsetBytes: 4 * KiB + 100 * KiB }, // the second unit
    ]);
    assert.equal(batches, 1, 'one batch for the pool');
    assert.deepEqual(Buffer.from(target.subarray(0, 8 * KiB)), data.subarray(64 * KiB, 72 * KiB));
    assert.deepEqual(Buffer.from(target.subarray(8 * KiB, 12 * KiB)), data.subarray(0, 4 * KiB));
    assert.deepEqual(Buffer.from(target.subarray(12 * KiB)), data.subarray(104 * KiB, 116 * KiB));
    await assert.rejects(() => volume.readMany?.([{ target: target.subarray(0, 8 * KiB), offsetBytes: volume.sizeBytes - 4 * KiB }]) ?? Promise.resolve(), /ends past the device end/);
    assert.equal(new VolumeDevice(new MemoryDevice(2 * MiB), geometry).readMany, undefined, 'none over a pool without readMany');
    await pool.close();
  });
});
