// Crash-atomic volume changes: a power loss at any device event while a volume is added and
// then removed — with another volume taking writes and flushes at the same time — leaves the
// pool with either the old volume table or the new one, no unit owned twice, the other
// volume's flushed data intact, and an added volume that opens as a cache.
//
// Crash points: after every write and sync event of the pool device during the changes.
// States at each: every prefix of the volatile writes, each one left out, the last one torn,
// and garbage in writes to the volume table's copies (sim/crash_states.ts).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Cache } from '../../../src/cache/cache.js';
import { formatCacheDevice, probeDevice } from '../../../src/cache/cache_metadata.js';
import { CachePool } from '../../../src/cache/cache_pool.js';
import { checkPoolDevice } from '../../../src/cache/cache_pool_check.js';
import { MemoryDevice } from '../../../src/device/memory_device.js';
import { ManualTimers } from '../../../src/lib/timers.js';
import { KiB, MiB } from '../../../src/lib/units.js';
import { poolDeviceBytesFor, volumeTableBytes, volumeTableOffsetsBytes } from '../../../src/ondisk/pool_layout.js';
import { volumeUnits } from '../../../src/ondisk/volume_table.js';
import type { CrashPoint } from '../../../sim/device_model.js';
import { materialize, standardStates } from '../../../sim/crash_states.js';
import { Prng } from '../../../sim/prng.js';
import { SimDevice } from '../../../sim/sim_device.js';

const segmentSizeBytes = 1 * MiB;
const poolUnits = 16;
const backingBytes = 8 * MiB;

function pattern(seed: number, lengthBytes: number): Uint8Array {
  const bytes = new Uint8Array(lengthBytes);
  let x = seed * 2654435761 >>> 0;
  for (let i = 0; i < lengthBytes; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    bytes[i] = x >>> 24;
  }
  return bytes;
}

async function openVolume(pool: CachePool, name: string, backing: MemoryDevice): Promise<Cache> {
  const entry = pool.volume(name);
  assert.ok(entry !== undefined, `volume ${name} is in the table`);
  return Cache.open({ cacheDevice: pool.volumeDevice(entry), backingDevice: backing, background: false, timers: new ManualTimers() });
}

async function readAt(cache: Cache, offsetBytes: number, lengthBytes: number): Promise<Uint8Array> {
  const target = new Uint8Array(lengthBytes);
  await cache.read(target, offsetBytes);
  return target;
}

const inTable = (write: { offsetBytes: number }): boolean => volumeTableOffsetsBytes.some((at) => write.offsetBytes >= at && write.offsetBytes < at + volumeTableBytes);

describe('volumes: add and remove are crash-atomic, with I/O on another volume', () => {
  it('every crash state holds the old table or the new one, and the other volume\'s flushed data', async () => {
    const device = SimDevice.blank(poolDeviceBytesFor(poolUnits, segmentSizeBytes), { name: 'cache' });
    const backingA = new MemoryDevice(backingBytes, { identity: 'backing-a' });
    const backingB = new MemoryDevice(backingBytes, { identity: 'backing-b' });
    const pool = await CachePool.format(device, { segmentSizeBytes });
    await pool.addVolume({ name: 'a', backing: '/a', shareBytes: 6 * segmentSizeBytes }, async (share) => { await formatCacheDevice(share, backingA, { segmentSizeBytes }); });
    const a = await openVolume(pool, 'a', backingA);
    const before = pattern(1, 64 * KiB);
    await a.write(before, 0);
    await a.flush();
    const unitsOfA = pool.volume('a')?.extents;

    // The changes, with the crash points taken after every event of the pool device.
    const points: { point: CrashPoint; afterFlush: boolean; phase: 'add' | 'remove' }[] = [];
    let afterFlush = false;
    let phase: 'add' | 'remove' = 'add';
    const stop = device.events.listen((event) => {
      if (event.device === 'cache' && event.phase === 'complete') points.push({ point: device.crashPoint(), afterFlush, phase });
    });
    const during = pattern(2, 64 * KiB);
    await Promise.all([
      pool.addVolume({ name: 'b', backing: '/b', shareBytes: 4 * segmentSizeBytes }, async (share) => { await formatCacheDevice(share, backingB, { segmentSizeBytes }); }),
      (async () => {
        await a.write(during, 1 * MiB);
        await a.flush();
        afterFlush = true;
      })(),
    ]);
    phase = 'remove';
    await pool.removeVolume('b');
    stop();
    assert.ok(points.length > 10, `crash points taken: ${points.length}`);

    const prng = new Prng(14);
    let states = 0;
    const tablesSeen = new Set<string>();
    for (const { point, afterFlush: flushed, phase: when } of points) {
      for (const state of standardStates(point, prng, { garbage: inTable })) {
        states += 1;
        const crashed = materialize(state);
        const reopened = await CachePool.open(crashed);
        const names = reopened.table.volumes.map((volume) => volume.name).join(',');
        tablesSeen.add(`${when}:${names}`);
        assert.ok(names === 'a' || names === 'a,b', `${state.label}: volumes ${names}`);
        assert.deepEqual(reopened.volume('a')?.extents, unitsOfA, `${state.label}: volume a keeps its units`);
        const report = await checkPoolDevice(crashed);
        assert.deepEqual(report.problems, [], `${state.label}: the pool checks clean`);
        const cacheA = await openVolume(reopened, 'a', backingA);
        assert.deepEqual(await readAt(cacheA, 0, before.length), before, `${state.label}: a's data flushed before the changes`);
        if (flushed) assert.deepEqual(await readAt(cacheA, 1 * MiB, during.length), during, `${state.label}: a's data flushed during the changes`);
        await cacheA.close();
        if (names === 'a,b') {
          const entry = reopened.volume('b');
          assert.ok(entry !== undefined && volumeUnits(entry) === 4);
          const cacheB = await openVolume(reopened, 'b', backingB);
          assert.deepEqual(await readAt(cacheB, 0, 4 * KiB), new Uint8Array(4 * KiB), `${state.label}: the added volume reads its (zero) backing device`);
          await cacheB.close();
        }
      }
    }
    // Both tables occur during the add and during the remove: the crash points straddle both commits.
    for (const seen of ['add:a', 'add:a,b', 'remove:a,b', 'remove:a']) assert.ok(tablesSeen.has(seen), `some crash state shows ${seen} (seen: ${[...tablesSeen].join(' ')})`);
    assert.ok(states > 50, `crash states checked: ${states}`);
    await a.close();
  });

  it('a unit freed by a removed volume is formatted afresh for the next one, which never sees the old data', async () => {
    const device = SimDevice.blank(poolDeviceBytesFor(8, segmentSizeBytes), { name: 'cache' });
    const backing1 = new MemoryDevice(backingBytes, { identity: 'one' });
    const backing2 = new MemoryDevice(backingBytes, { identity: 'two' });
    const pool = await CachePool.format(device, { segmentSizeBytes });
    await pool.addVolume({ name: 'one', backing: '/1', shareBytes: 8 * segmentSizeBytes }, async (share) => { await formatCacheDevice(share, backing1, { segmentSizeBytes }); });
    const one = await openVolume(pool, 'one', backing1);
    await one.write(pattern(3, 256 * KiB), 0);
    await one.flush();
    await one.drain();
    await one.close();
    await assert.rejects(pool.addVolume({ name: 'two', backing: '/2', shareBytes: 4 * segmentSizeBytes }, () => Promise.resolve()), { code: 'ENOSPC' });
    await pool.removeVolume('one');
    await pool.addVolume({ name: 'two', backing: '/2', shareBytes: 8 * segmentSizeBytes }, async (share) => { await formatCacheDevice(share, backing2, { segmentSizeBytes }); });
    const two = await openVolume(pool, 'two', backing2);
    assert.deepEqual(await readAt(two, 0, 256 * KiB), new Uint8Array(256 * KiB), 'the new volume reads its own backing device, not the old cached data');
    assert.equal(two.status().dirtyBytes, 0);
    await two.close();
  });

  it('a resize cut short anywhere leaves the old or the new share, a cache within the volume\'s units or a blank share, and the data on the backing device', async () => {
    const device = SimDevice.blank(poolDeviceBytesFor(poolUnits, segmentSizeBytes), { name: 'cache' });
    const backingA = new MemoryDevice(backingBytes, { identity: 'backing-a' });
    const backingC = new MemoryDevice(backingBytes, { identity: 'backing-c' });
    const pool = await CachePool.format(device, { segmentSizeBytes });
    const formatter = (backing: MemoryDevice) => async (share: Parameters<Parameters<CachePool['addVolume']>[1]>[0]) => { await formatCacheDevice(share, backing, { segmentSizeBytes }); };
    await pool.addVolume({ name: 'a', backing: '/a', shareBytes: 4 * segmentSizeBytes }, formatter(backingA));
    await pool.addVolume({ name: 'c', backing: '/c', shareBytes: 4 * segmentSizeBytes }, formatter(backingC));
    // The volume is written back and closed before a resize (VolumeSet does that).
    const a = await openVolume(pool, 'a', backingA);
    const data = pattern(5, 128 * KiB);
    await a.write(data, 2 * MiB);
    await a.flush();
    await a.drain();
    await a.close();
    const c = await openVolume(pool, 'c', backingC);
    const dataC = pattern(6, 32 * KiB);
    await c.write(dataC, 0);
    await c.flush();
    const unitsOfC = pool.volume('c')?.extents;

    const points: CrashPoint[] = [];
    const stop = device.events.listen((event) => {
      if (event.device === 'cache' && event.phase === 'complete') points.push(device.crashPoint());
    });
    await pool.resizeVolume('a', 9 * segmentSizeBytes, formatter(backingA)); // grows past c: two extents
    await pool.resizeVolume('a', 5 * segmentSizeBytes, formatter(backingA)); // shrinks
    stop();
    assert.deepEqual(pool.volume('a')?.extents.map((extent) => extent.unitCount).reduce((x, y) => x + y), 5);

    const prng = new Prng(15);
    const shares = new Set<number>();
    let blank = 0;
    for (const point of points) {
      for (const state of standardStates(point, prng, { garbage: inTable })) {
        const crashed = materialize(state);
        const reopened = await CachePool.open(crashed);
        const entry = reopened.volume('a');
        assert.ok(entry !== undefined, state.label);
        const units = volumeUnits(entry);
        shares.add(units);
        assert.ok([4, 9, 5].includes(units), `${state.label}: a has ${units} units`);
        assert.deepEqual(reopened.volume('c')?.extents, unitsOfC, `${state.label}: c keeps its units`);
        const report = await checkPoolDevice(crashed);
        assert.deepEqual(report.problems, [], `${state.label}: the pool checks clean`);
        const share = reopened.volumeDevice(entry);
        if (await probeDevice(share) === 'blank') {
          blank += 1;
          await formatCacheDevice(share, backingA, { segmentSizeBytes });
        }
        const cacheA = await openVolume(reopened, 'a', backingA);
        assert.ok(cacheA.status().cacheSegs <= units, `${state.label}: a's cache stays within its units`);
        assert.deepEqual(await readAt(cacheA, 2 * MiB, data.length), data, `${state.label}: a's data (on its backing device)`);
        await cacheA.close();
        const cacheC = await openVolume(reopened, 'c', backingC);
        assert.deepEqual(await readAt(cacheC, 0, dataC.length), dataC, `${state.label}: c's flushed data`);
        await cacheC.close();
      }
    }
    assert.deepEqual([...shares].sort((x, y) => x - y), [4, 5, 9], 'crash states straddle both resizes\' commits');
    assert.ok(blank > 0, 'some crash states catch a share mid-format');
    await c.close();
  });
});

