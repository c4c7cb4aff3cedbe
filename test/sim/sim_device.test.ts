// SimDevice semantics. Goal: prove the crash model the harness relies on: the dm-log-writes
// sync rule, reads overlaying volatile writes, the event log, the completion scheduler, and
// every fault hook (scripted, seeded, offline, fsyncgate, power loss).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { DeviceEventLog, IoScheduler, SimDevice } from '../../sim/sim_device.js';
import { isCode } from '../helpers/errors.js';

const deviceBytes = 64 * 1024;

function filled(length: number, value: number): Uint8Array {
  return new Uint8Array(length).fill(value);
}

function durableByte(device: SimDevice, offset: number): number {
  const byte = new Uint8Array(1);
  device.readDurable(byte, offset);
  return byte[0] ?? -1;
}

async function visibleByte(device: SimDevice, offset: number): Promise<number> {
  const byte = new Uint8Array(1);
  await device.read(byte, offset);
  return byte[0] ?? -1;
}


describe('SimDevice: the sync rule', () => {
  it('shows a completed write to reads at once but makes it durable only at a sync', async () => {
    const device = SimDevice.blank(deviceBytes);
    await device.write(filled(512, 1), 0);
    assert.equal(await visibleByte(device, 0), 1);
    assert.equal(durableByte(device, 0), 0);
    assert.equal(device.crashPoint().volatile.length, 1);
    await device.sync();
    assert.equal(durableByte(device, 0), 1);
    assert.equal(device.crashPoint().volatile.length, 0);
  });

  it('overlays volatile writes in completion order', async () => {
    const device = SimDevice.blank(deviceBytes);
    await device.write(filled(1024, 1), 0);
    await device.sync();
    await device.write(filled(512, 2), 512);
    device.blocking?.writeSync(filled(128, 3), 768);
    const bytes = new Uint8Array(1024);
    await device.read(bytes, 0);
    assert.deepEqual([bytes[0], bytes[600], bytes[800], bytes[900]], [1, 2, 3, 2]);
  });

  it('covers only the writes completed when the sync was issued (dm-log-writes)', async () => {
    const scheduler = new IoScheduler({ order: 'fifo' });
    const device = SimDevice.blank(deviceBytes, { scheduler });
    await device.write(filled(512, 1), 0);
    const inFlight = device.write(filled(512, 2), 512);
    const sync = device.sync();
    const afterSync = device.write(filled(512, 3), 1024);
    await Promise.all([inFlight, sync, afterSync]);
    assert.equal(durableByte(device, 0), 1, 'completed before the sync: durable');
    assert.equal(durableByte(device, 512), 0, 'in flight at the sync: not covered');
    assert.equal(durableByte(device, 1024), 0, 'issued after the sync: not covered');
    assert.deepEqual(
      device.crashPoint().volatile.map((write) => write.offsetBytes),
      [512, 1024],
    );
  });

  it('lists completed writes in completion order, then in-flight ones in issue order', async () => {
    const scheduler = new IoScheduler({ order: 'fifo' });
    const device = SimDevice.blank(deviceBytes, { scheduler });
    const first = device.write(filled(512, 1), 0);
    const second = device.write(filled(512, 2), 512);
    const point = device.crashPoint();
    assert.deepEqual(point.volatile.map((write) => [write.offsetBytes, write.completed]), [
      [0, false],
      [512, false],
    ]);
    // A blocking read is served at once, ahead of the queued completions.
    const byte = new Uint8Array(1);
    device.blocking?.readSync(byte, 0);
    assert.equal(byte[0], 0, 'an in-flight write is not visible');
    await Promise.all([first, second]);
    assert.deepEqual(device.crashPoint().volatile.map((write) => write.completed), [true, true]);
    // The earlier snapshot is immutable.
    assert.deepEqual(point.volatile.map((write) => write.completed), [false, false]);
  });

  it('reorders concurrent completions reproducibly under a seeded random scheduler', async () => {
    const completionOrder = async (seed: number): Promise<number[]> => {
      const device = SimDevice.blank(deviceBytes, { scheduler: new IoScheduler({ order: 'random', seed }) });
      const order: number[] = [];
      await Promise.all(Array.from({ length: 12 }, (_, index) => device.write(filled(512, index + 1), index * 512).then(() => order.push(index))));
      return order;
    };
    const first = await completionOrder(3);
    assert.deepEqual(await completionOrder(3), first);
    assert.notDeepEqual(first, [...first].sort((a, b) => a - b), 'some operations complete out of issue order');
    assert.notDeepEqual(await completionOrder(4), first);
  });

  it('numbers the events of devices sharing a log in one global order', async () => {
    const events = new DeviceEventLog();
    const cache = SimDevice.blank(deviceBytes, { name: 'cache', events });
    const backing = SimDevice.blank(deviceBytes, { name: 'backing', events });
    cache.blocking?.writeSync(filled(512, 1), 0);
    await backing.write(filled(512, 2), 0);
    await backing.sync();
    await cache.discard(0, 4096);
    assert.equal(events.now, 4);
    assert.deepEqual(
      events.recorded.map((event) => `${event.seq}:${event.device}:${event.kind}:${event.phase}`),
      ['1:cache:write:complete', '2:backing:write:complete', '3:backing:sync:complete', '4:cache:write:complete'],
    );
    assert.equal(await visibleByte(cache, 0), 0, 'a discard reads back as zeroes');
  });

  it('settles (a clean shutdown) so that durable equals visible', async () => {
    const device = SimDevice.blank(deviceBytes);
    await device.write(filled(512, 5), 0);
    device.settle();
    assert.equal(durableByte(device, 0), 5);
    assert.equal(device.volatileWriteCount, 0);
  });

  it('bounds the volatile list by persisting the oldest write, as background writeback may', async () => {
    const device = SimDevice.blank(deviceBytes, { volatileWritesMax: 2 });
    for (let index = 0; index < 3; index += 1) await device.write(filled(512, index + 1), index * 512);
    assert.equal(device.volatileWriteCount, 2);
    assert.equal(durableByte(device, 0), 1);
    assert.equal(durableByte(device, 512), 0);
  });
});

describe('SimDevice: faults', () => {
  it('fails the next write with the scripted code and applies nothing', async () => {
    const device = SimDevice.blank(deviceBytes);
    device.faults.failNext('write', 'EIO');
    await assert.rejects(device.write(filled(512, 1), 0), isCode('EIO'));
    assert.equal(await visibleByte(device, 0), 0);
    assert.equal(device.crashPoint().volatile.length, 0);
    await device.write(filled(512, 2), 0);
    assert.equal(await visibleByte(device, 0), 2);
  });

  it('fails blocking I/O by throwing', () => {
    const device = SimDevice.blank(deviceBytes);
    device.faults.failNext('read', 'ENOSPC');
    assert.throws(() => device.blocking?.readSync(new Uint8Array(512), 0), isCode('ENOSPC'));
    device.faults.failNext('write', 'EIO');
    assert.throws(() => device.blocking?.writeSync(filled(512, 1), 0), isCode('EIO'));
    device.blocking?.readSync(new Uint8Array(512), 0);
  });

  it('honours skip counts, ranges and disarming', async () => {
    const device = SimDevice.blank(deviceBytes);
    const disarm = device.faults.failEvery('write', 'EIO', { skip: 1, range: { offsetBytes: 4096, lengthBytes: 4096 } });
    await device.write(filled(512, 1), 4096);
    await assert.rejects(device.write(filled(512, 1), 8192 - 512), isCode('EIO'));
    await device.write(filled(512, 1), 0);
    await assert.rejects(device.write(filled(512, 1), 4096), isCode('EIO'));
    disarm();
    await device.write(filled(512, 1), 4096);
    assert.equal(device.faults.injectedCount, 2);
  });

  it('fires probabilistic faults as a function of the fault seed', async () => {
    const pattern = async (faultSeed: number): Promise<boolean[]> => {
      const device = SimDevice.blank(deviceBytes, { faultSeed });
      device.faults.failEvery('read', 'EIO', { probability: 0.5 });
      const outcomes: boolean[] = [];
      for (let index = 0; index < 32; index += 1) {
        outcomes.push(await device.read(new Uint8Array(512), 0).then(() => true, () => false));
      }
      return outcomes;
    };
    const first = await pattern(11);
    assert.deepEqual(await pattern(11), first);
    assert.ok(first.includes(true) && first.includes(false));
    assert.notDeepEqual(await pattern(12), first);
  });

  it('moves nothing to durable on a failed sync and persists at the next good one', async () => {
    const device = SimDevice.blank(deviceBytes);
    await device.write(filled(512, 1), 0);
    device.faults.failNext('sync', 'EIO');
    await assert.rejects(device.sync(), isCode('EIO'));
    assert.equal(durableByte(device, 0), 0);
    assert.equal(device.crashPoint().volatile.length, 1);
    await device.sync();
    assert.equal(durableByte(device, 0), 1);
  });

  it('with fsyncgate, lets a later sync succeed without persisting what the failed one covered', async () => {
    const device = SimDevice.blank(deviceBytes, { fsyncgate: true });
    await device.write(filled(512, 1), 0);
    device.faults.failNext('sync', 'EIO');
    await assert.rejects(device.sync(), isCode('EIO'));
    await device.write(filled(512, 2), 512);
    await device.sync();
    assert.equal(await visibleByte(device, 0), 1, 'the page cache still shows the lost write');
    assert.equal(durableByte(device, 0), 0, 'but it never reaches the media');
    assert.equal(durableByte(device, 512), 2, 'writes after the failure persist normally');
  });

  it('fails every operation with ENODEV while offline, in flight ones included', async () => {
    const scheduler = new IoScheduler({ order: 'fifo' });
    const device = SimDevice.blank(deviceBytes, { scheduler });
    const inFlight = device.write(filled(512, 1), 0);
    device.setOnline(false);
    await assert.rejects(inFlight, isCode('ENODEV'));
    await assert.rejects(device.read(new Uint8Array(512), 0), isCode('ENODEV'));
    await assert.rejects(device.sync(), isCode('ENODEV'));
    assert.equal(device.crashPoint().volatile.length, 0, 'the failed write applies nothing');
    device.setOnline(true);
    await device.write(filled(512, 2), 0);
    assert.equal(await visibleByte(device, 0), 2);
  });

  it('after power loss, never settles pending operations and refuses new ones', async () => {
    const scheduler = new IoScheduler({ order: 'fifo' });
    const device = SimDevice.blank(deviceBytes, { scheduler });
    let settled = false;
    void device.write(filled(512, 1), 0).then(
      () => (settled = true),
      () => (settled = true),
    );
    const before = device.crashPoint();
    device.powerOff();
    await scheduler.idle();
    assert.equal(settled, false);
    assert.deepEqual(device.crashPoint().volatile, before.volatile, 'nothing changes after the power is cut');
    await assert.rejects(device.write(filled(512, 1), 0), isCode('ENODEV'));
    assert.throws(() => device.blocking?.writeSync(filled(512, 1), 0), isCode('ENODEV'));
  });

  it('refuses operations once closed', async () => {
    const device = SimDevice.blank(deviceBytes);
    await device.close();
    await assert.rejects(device.sync(), isCode('ENODEV'));
  });
});
