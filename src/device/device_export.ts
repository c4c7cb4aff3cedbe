// DeviceExport: serves a plain BlockDevice over NBD, with no cache in between.
//
// It matches the NBD layer's Export interface structurally, without importing src/nbd (the
// device layer depends on lib only), so the CLI can export a raw file or a MemoryDevice and
// benchmarks can compare "the same server without the cache". The NBD server has already
// validated every request (in range, 512-byte aligned), so this adapter only translates:
// - read/write use the device's synchronous I/O when it offers some (returning undefined, so
//   the server replies without a promise round trip), otherwise its asynchronous I/O;
// - FUA is write, then device.sync(); flush is device.sync();
// - write-zeroes writes zero bytes, which is no faster than a write, so FAST_ZERO is refused
//   with ENOTSUP as the protocol requires; trim uses device.discard when present, else zeroes;
// - cache has nothing to fetch into: synchronous devices are already as close as it gets, and
//   asynchronous ones are read and the bytes dropped (warming the OS page cache);
// - blockStatus knows nothing about allocation, so it reports one data extent.

import { PcacheError } from '../lib/errors.js';
import { MiB } from '../lib/units.js';
import type { BlockDevice } from './block_device.js';

/** Zeroes and cache reads go through one shared buffer of this size. */
const scratchBytes = 1 * MiB;
let zeroChunk: Uint8Array | undefined;

interface WriteOptions {
  readonly fua: boolean;
}

interface ZeroOptions extends WriteOptions {
  readonly fastZero: boolean;
}

interface Extent {
  readonly lengthBytes: number;
  readonly zero: boolean;
  readonly hole: boolean;
}

export class DeviceExport {
  readonly sizeBytes: number;
  private readonly device: BlockDevice;

  constructor(device: BlockDevice) {
    this.device = device;
    this.sizeBytes = device.sizeBytes;
  }

  read(target: Uint8Array, offsetBytes: number): Promise<void> | undefined {
    const blocking = this.device.blocking;
    if (blocking === undefined) return this.device.read(target, offsetBytes);
    blocking.readSync(target, offsetBytes);
    return undefined;
  }

  write(source: Uint8Array, offsetBytes: number, options: WriteOptions): Promise<void> | undefined {
    const blocking = this.device.blocking;
    if (blocking !== undefined) {
      blocking.writeSync(source, offsetBytes);
      return options.fua ? this.device.sync() : undefined;
    }
    const written = this.device.write(source, offsetBytes);
    return options.fua ? written.then(() => this.device.sync()) : written;
  }

  flush(): Promise<void> {
    return this.device.sync();
  }

  trim(offsetBytes: number, lengthBytes: number, options: WriteOptions): Promise<void> | undefined {
    const discard = this.device.discard?.bind(this.device);
    if (discard === undefined) return this.writeZeroes(offsetBytes, lengthBytes, { fua: options.fua, fastZero: false });
    const discarded = discard(offsetBytes, lengthBytes);
    return options.fua ? discarded.then(() => this.device.sync()) : discarded;
  }

  writeZeroes(offsetBytes: number, lengthBytes: number, options: ZeroOptions): Promise<void> | undefined {
    // Zeroing here costs exactly as much as writing, so a fast zero must fail fast, untouched.
    if (options.fastZero) throw new PcacheError('ENOTSUP', 'writing zeroes is no faster than writing data on this device');
    zeroChunk ??= new Uint8Array(scratchBytes);
    const zeroes = zeroChunk;
    const blocking = this.device.blocking;
    if (blocking !== undefined) {
      for (let done = 0; done < lengthBytes; done += scratchBytes) {
        blocking.writeSync(zeroes.subarray(0, Math.min(scratchBytes, lengthBytes - done)), offsetBytes + done);
      }
      return options.fua ? this.device.sync() : undefined;
    }
    return this.writeZeroesAsync(offsetBytes, lengthBytes, options.fua);
  }

  cache(offsetBytes: number, lengthBytes: number): Promise<void> | undefined {
    if (this.device.blocking !== undefined) return undefined;
    return this.readAndDrop(offsetBytes, lengthBytes);
  }

  blockStatus(_offsetBytes: number, lengthBytes: number): Extent[] {
    return [{ lengthBytes, zero: false, hole: false }];
  }

  private async writeZeroesAsync(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    const zeroes = zeroChunk ??= new Uint8Array(scratchBytes);
    for (let done = 0; done < lengthBytes; done += scratchBytes) {
      await this.device.write(zeroes.subarray(0, Math.min(scratchBytes, lengthBytes - done)), offsetBytes + done);
    }
    if (fua) await this.device.sync();
  }

  private async readAndDrop(offsetBytes: number, lengthBytes: number): Promise<void> {
    // A private buffer: a shared one could be read into by two requests at once.
    const scratch = new Uint8Array(Math.min(scratchBytes, lengthBytes));
    for (let done = 0; done < lengthBytes; done += scratch.length) {
      await this.device.read(scratch.subarray(0, Math.min(scratch.length, lengthBytes - done)), offsetBytes + done);
    }
  }
}
