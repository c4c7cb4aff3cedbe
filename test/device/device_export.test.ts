// DeviceExport, the adapter that serves a plain BlockDevice as an Export: synchronous devices
// complete without promises, FUA and flush reach device.sync(), write-zeroes writes zeroes and
// refuses FAST_ZERO, trim prefers discard, cache is a read on asynchronous devices only, and
// block status reports one data extent.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockDevice, BlockingIo } from '../../src/device/block_device.js';
import { DeviceExport } from '../../src/device/device_export.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { PcacheError } from '../../src/lib/errors.js';
import type { Export } from '../../src/nbd/server/export.js';
import { MiB } from '../../src/lib/units.js';
import { patternBytes } from '../helpers/bytes.js';


/** A device over memory that logs every call, with or without synchronous I/O. */
class LoggingDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly identity = undefined;
  readonly blocking: BlockingIo | undefined;
  readonly log: string[] = [];
  readonly memory: MemoryDevice;

  constructor(sizeBytes: number, options: { blocking: boolean }) {
    this.memory = new MemoryDevice(patternBytes(sizeBytes, 4));
    this.sizeBytes = sizeBytes;
    this.blocking = options.blocking
      ? {
          readSync: (target, offset) => { this.log.push(`readSync ${offset}+${target.length}`); this.memory.readSync(target, offset); },
          writeSync: (source, offset) => { this.log.push(`writeSync ${offset}+${source.length}`); this.memory.writeSync(source, offset); },
        }
      : undefined;
  }

  read(target: Uint8Array, offsetBytes: number): Promise<void> {
    this.log.push(`read ${offsetBytes}+${target.length}`);
    return this.memory.read(target, offsetBytes);
  }

  write(source: Uint8Array, offsetBytes: number): Promise<void> {
    this.log.push(`write ${offsetBytes}+${source.length}`);
    return this.memory.write(source, offsetBytes);
  }

  sync(): Promise<void> {
    this.log.push('sync');
    return Promise.resolve();
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** The same, for a device that can discard. */
class DiscardingDevice extends LoggingDevice {
  discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.log.push(`discard ${offsetBytes}+${lengthBytes}`);
    return this.memory.discard(offsetBytes, lengthBytes);
  }
}

function same(actual: Uint8Array, expected: Uint8Array): boolean {
  return Buffer.from(actual.buffer, actual.byteOffset, actual.length).equals(expected);
}

describe('DeviceExport', () => {
  it('is an Export by structure alone', () => {
    const served: Export = new DeviceExport(new MemoryDevice(4096));
    assert.equal(served.sizeBytes, 4096);
  });

  it('completes synchronously on a device with synchronous I/O, and syncs for FUA', async () => {
    const device = new LoggingDevice(MiB, { blocking: true });
    const exp = new DeviceExport(device);
    const target = new Uint8Array(4096);
    assert.equal(exp.read(target, 8192), undefined);
    assert.ok(same(target, device.memory.bytes.subarray(8192, 12288)));
    assert.equal(exp.write(Buffer.alloc(512, 1), 0, { fua: false }), undefined);
    await exp.write(Buffer.alloc(512, 2), 512, { fua: true });
    await exp.flush();
    assert.deepEqual(device.log, ['readSync 8192+4096', 'writeSync 0+512', 'writeSync 512+512', 'sync', 'sync']);
    assert.equal(device.memory.bytes[512], 2);
  });

  it('uses asynchronous I/O otherwise, writing before syncing for FUA', async () => {
    const device = new LoggingDevice(MiB, { blocking: false });
    const exp = new DeviceExport(device);
    const target = new Uint8Array(512);
    const reading = exp.read(target, 0);
    assert.ok(reading instanceof Promise);
    await reading;
    assert.ok(same(target, device.memory.bytes.subarray(0, 512)));
    await exp.write(Buffer.alloc(1024, 7), 4096, { fua: true });
    assert.deepEqual(device.log, ['read 0+512', 'write 4096+1024', 'sync']);
  });

  for (const blocking of [true, false]) {
    it(`writes zeroes across the 1 MiB scratch buffer (${blocking ? 'sync' : 'async'} device), and refuses FAST_ZERO untouched`, async () => {
      const device = new DiscardingDevice(4 * MiB, { blocking });
      const exp = new DeviceExport(device);
      const before = Buffer.from(device.memory.bytes);
      assert.throws(() => exp.writeZeroes(0, 4096, { fua: false, fastZero: true }), (error: unknown) => error instanceof PcacheError && error.code === 'ENOTSUP');
      assert.ok(same(device.memory.bytes, before), 'a refused fast zero leaves the device untouched');
      await exp.writeZeroes(512, 2 * MiB + 1024, { fua: true, fastZero: false });
      assert.ok(device.memory.bytes.subarray(512, 512 + 2 * MiB + 1024).every((byte) => byte === 0));
      assert.equal(device.memory.bytes[511], before[511]);
      assert.equal(device.memory.bytes[512 + 2 * MiB + 1024], before[512 + 2 * MiB + 1024]);
      assert.equal(device.log.at(-1), 'sync', 'FUA syncs after the zeroes');
    });
  }

  it('trims with discard when the device has it, and with zeroes when it does not', async () => {
    const withDiscard = new DiscardingDevice(MiB, { blocking: true });
    await new DeviceExport(withDiscard).trim(4096, 8192, { fua: false });
    assert.deepEqual(withDiscard.log, ['discard 4096+8192']);
    const without = new LoggingDevice(MiB, { blocking: true });
    await new DeviceExport(without).trim(4096, 8192, { fua: true });
    assert.deepEqual(without.log, ['writeSync 4096+8192', 'sync']);
    assert.ok(without.memory.bytes.subarray(4096, 12288).every((byte) => byte === 0));
  });

  it('caches by reading on asynchronous devices only', async () => {
    const sync = new LoggingDevice(4 * MiB, { blocking: true });
    assert.equal(new DeviceExport(sync).cache(0, 2 * MiB), undefined);
    assert.deepEqual(sync.log, []);
    const async = new LoggingDevice(4 * MiB, { blocking: false });
    await new DeviceExport(async).cache(512, 2 * MiB);
    assert.deepEqual(async.log, [`read 512+${MiB}`, `read ${512 + MiB}+${MiB}`]);
  });

  it('reports one data extent for block status', () => {
    const exp = new DeviceExport(new MemoryDevice(MiB));
    assert.deepEqual(exp.blockStatus(4096, 65536), [{ lengthBytes: 65536, zero: false, hole: false }]);
  });

  it('passes device errors through as PcacheErrors', async () => {
    const device = new MemoryDevice(MiB);
    await device.close();
    await assert.rejects(Promise.resolve(new DeviceExport(device).flush()), (error: unknown) => error instanceof PcacheError && error.code === 'ENODEV');
  });
});
