// MemoryDevice: a BlockDevice held in memory, for tests, benchmarks and experiments.
//
// Every write is immediately visible and `sync` does nothing, so a MemoryDevice models a
// device that never loses a completed write. Crash behaviour (unsynced writes lost or torn)
// is the crash simulator's job, not this device's.

import { assert } from '../lib/assert.js';
import { PcacheError } from '../lib/errors.js';
import { rangeProblem, type BlockDevice, type BlockingIo, type DeviceWrite } from './block_device.js';

export class MemoryDevice implements BlockDevice, BlockingIo {
  readonly sizeBytes: number;
  readonly identity: string | undefined;
  readonly blocking: BlockingIo;
  /** The device's contents; tests may inspect them directly. */
  readonly bytes: Uint8Array;
  private closed = false;

  constructor(sizeBytesOrContents: number | Uint8Array, options: { identity?: string } = {}) {
    this.bytes = typeof sizeBytesOrContents === 'number' ? new Uint8Array(sizeBytesOrContents) : sizeBytesOrContents;
    this.sizeBytes = this.bytes.length;
    this.identity = options.identity;
    this.blocking = this;
  }

  readSync(target: Uint8Array, offsetBytes: number): void {
    this.check(offsetBytes, target.length);
    target.set(this.bytes.subarray(offsetBytes, offsetBytes + target.length));
  }

  writeSync(source: Uint8Array, offsetBytes: number): void {
    this.check(offsetBytes, source.length);
    this.bytes.set(source, offsetBytes);
  }

  // The promise-returning methods report every failure as a rejection, never a synchronous throw.

  writevSync(sources: readonly Uint8Array[], offsetBytes: number): void {
    let at = offsetBytes;
    for (const source of sources) {
      this.writeSync(source, at);
      at += source.length;
    }
  }

  async read(target: Uint8Array, offsetBytes: number): Promise<void> {
    this.readSync(target, offsetBytes);
    return Promise.resolve();
  }

  async write(source: Uint8Array, offsetBytes: number): Promise<void> {
    this.writeSync(source, offsetBytes);
    return Promise.resolve();
  }

  async writeMany(writes: readonly DeviceWrite[]): Promise<void> {
    for (const w of writes) this.writeSync(w.source, w.offsetBytes);
    return Promise.resolve();
  }

  async sync(): Promise<void> {
    if (this.closed) throw closedError();
    return Promise.resolve();
  }

  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.check(offsetBytes, lengthBytes);
    this.bytes.fill(0, offsetBytes, offsetBytes + lengthBytes);
    return Promise.resolve();
  }

  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }

  private check(offsetBytes: number, lengthBytes: number): void {
    if (this.closed) throw closedError();
    const problem = rangeProblem(this, offsetBytes, lengthBytes);
    assert(problem === undefined, problem);
  }
}

function closedError(): PcacheError {
  return new PcacheError('ENODEV', 'memory device is closed');
}
