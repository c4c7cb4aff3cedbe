// Helpers for engine tests: memory devices, a cache opened on them with manual timers, and a
// device whose reads can be held in flight.
import type { BlockDevice, DeviceRead } from '../../src/device/block_device.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache, type CacheOpenOptions, type FormatOptions } from '../../src/cache/cache.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { PcacheError, type PcacheErrorCode } from '../../src/lib/errors.js';
import { MiB } from '../../src/lib/units.js';
import { cacheDeviceBytesFor } from '../../src/ondisk/layout.js';

/** Cache device bytes for `segments` segments of 1 MiB (plus the metadata ahead of them and the superblock copy after them). */
export function cacheBytesFor(segments: number, segmentSizeBytes = MiB): number {
  return cacheDeviceBytesFor(segments, segmentSizeBytes);
}

export interface Rig {
  cacheDevice: MemoryDevice;
  backingDevice: MemoryDevice;
  timers: ManualTimers;
  cache: Cache;
  reopen(options?: Partial<CacheOpenOptions>): Promise<Cache>;
}

export async function openRig(options: {
  segments?: number;
  backingBytes?: number;
  format?: FormatOptions;
  background?: boolean;
  backing?: MemoryDevice;
} = {}): Promise<Rig> {
  const cacheDevice = new MemoryDevice(cacheBytesFor(options.segments ?? 8));
  const backingDevice = options.backing ?? new MemoryDevice(options.backingBytes ?? 64 * MiB);
  const timers = new ManualTimers();
  const open = (extra: Partial<CacheOpenOptions> = {}): Promise<Cache> =>
    Cache.open({
      cacheDevice,
      backingDevice,
      formatIfBlank: { segmentSizeBytes: MiB, cacheUuid: new Uint8Array(16).fill(7), formatTimeMs: 0, ...options.format },
      background: options.background ?? false,
      timers,
      ...extra,
    });
  const rig: Rig = {
    cacheDevice,
    backingDevice,
    timers,
    cache: await open(),
    async reopen(extra) {
      rig.cache = await open(extra);
      return rig.cache;
    },
  };
  return rig;
}

/** Bytes whose every 512-byte sector names `tag` and its own offset, so misplaced data shows. */
export function pattern(tag: number, offsetBytes: number, lengthBytes: number): Buffer {
  const bytes = Buffer.alloc(lengthBytes, tag & 0xff);
  for (let at = 0; at < lengthBytes; at += 512) {
    bytes.writeUInt32LE(tag >>> 0, at);
    bytes.writeUInt32LE((offsetBytes + at) / 512, at + 4);
  }
  return bytes;
}

export async function readBytes(cache: Cache, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
  const out = Buffer.alloc(lengthBytes);
  await cache.read(out, offsetBytes);
  return out;
}

/**
 * A BlockDevice over memory whose reads wait until the test releases them (while `gated`), and
 * whose writes wait until it lets them go one by one (while `holdWrites`).
 */
/**
 * A memory device with a thread for batches of reads, as a file has (BlockDevice.readMany): a
 * batch is read later, once `gate` resolves when one is set, else on a later turn of the event
 * loop, so other work runs between a read's walk and its pieces' reads. Counts its batches.
 */
export class ThreadedMemoryDevice extends MemoryDevice {
  /** The number of reads in each batch, in order. */
  readonly batches: number[] = [];
  gate: Promise<void> | undefined;
  /** Batches fail with this, when set. */
  failure: PcacheError | undefined;
  readMany = async (reads: readonly DeviceRead[]): Promise<void> => {
    this.batches.push(reads.length);
    await (this.gate ?? new Promise<void>((resolve) => { setImmediate(resolve); }));
    if (this.failure !== undefined) throw this.failure;
    for (const r of reads) this.readSync(r.target, r.offsetBytes);
  };
}

export class GatedDevice implements BlockDevice {
  readonly inner: MemoryDevice;
  readonly sizeBytes: number;
  readonly identity = undefined;
  readonly blocking = undefined;
  gated = false;
  holdWrites = false;
  /** Writes of exactly this many bytes fail with EIO (one kind of write, picked by its size). */
  failWritesOfBytes: number | undefined;
  private held: (() => void)[] = [];
  readonly heldWrites: { offsetBytes: number; lengthBytes: number; release: () => void }[] = [];

  constructor(inner: MemoryDevice) {
    this.inner = inner;
    this.sizeBytes = inner.sizeBytes;
  }

  get heldReads(): number {
    return this.held.length;
  }

  async read(target: Uint8Array, offsetBytes: number): Promise<void> {
    if (this.gated) await new Promise<void>((resolve) => { this.held.push(resolve); });
    this.inner.readSync(target, offsetBytes);
  }

  async write(source: Uint8Array, offsetBytes: number): Promise<void> {
    if (this.holdWrites) await new Promise<void>((resolve) => { this.heldWrites.push({ offsetBytes, lengthBytes: source.length, release: resolve }); });
    if (source.length === this.failWritesOfBytes) throw new PcacheError('EIO', `injected failure of a ${source.length}-byte write`);
    this.inner.writeSync(source, offsetBytes);
  }

  /** Lets the first held write of `lengthBytes` go. */
  releaseWrite(lengthBytes: number): void {
    const at = this.heldWrites.findIndex((write) => write.lengthBytes === lengthBytes);
    if (at < 0) throw new Error(`no held write of ${lengthBytes} bytes (held: ${this.heldWrites.map((write) => write.lengthBytes).join(', ')})`);
    const [write] = this.heldWrites.splice(at, 1);
    write?.release();
  }

  /** Stops holding writes and lets every held one go. */
  releaseWrites(): void {
    this.holdWrites = false;
    for (const write of this.heldWrites.splice(0)) write.release();
  }

  sync(): Promise<void> {
    return Promise.resolve();
  }

  discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.inner.discard(offsetBytes, lengthBytes);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  release(): void {
    const held = this.held;
    this.held = [];
    for (const resolve of held) resolve();
  }
}

/** Lets every queued promise callback run. */
export async function settle(): Promise<void> {
  for (let i = 0; i < 50; i++) await Promise.resolve();
}

export interface DeviceEvent {
  readonly device: string;
  readonly kind: 'write' | 'sync' | 'discard';
  readonly offsetBytes: number;
  readonly lengthBytes: number;
}

/**
 * Wraps a MemoryDevice and appends every write, discard and sync to a shared event list, so a
 * test can check the order of operations across two devices. Failures can be switched on.
 */
export class RecordingDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly identity: string | undefined;
  readonly blocking: BlockDevice['blocking'];
  failWrites: string | undefined;
  failSyncs: string | undefined;
  /** Reads fail too (with the failWrites message) while set. */
  failReads = false;
  failCode: PcacheErrorCode = 'EIO';

  constructor(readonly inner: MemoryDevice, readonly name: string, readonly events: DeviceEvent[], options: { blocking?: boolean } = {}) {
    this.sizeBytes = inner.sizeBytes;
    this.identity = inner.identity;
    this.blocking = options.blocking === false ? undefined : {
      readSync: (target, offset) => { inner.readSync(target, offset); },
      writeSync: (source, offset) => {
        if (this.failWrites !== undefined) throw new PcacheError(this.failCode, this.failWrites);
        this.record('write', offset, source.length);
        inner.writeSync(source, offset);
      },
    };
  }

  async read(target: Uint8Array, offsetBytes: number): Promise<void> {
    await Promise.resolve();
    if (this.failReads) throw new PcacheError(this.failCode, this.failWrites ?? 'read failed');
    await this.inner.read(target, offsetBytes);
  }

  async write(source: Uint8Array, offsetBytes: number): Promise<void> {
    await Promise.resolve();
    if (this.failWrites !== undefined) throw new PcacheError(this.failCode, this.failWrites);
    this.record('write', offsetBytes, source.length);
    await this.inner.write(source, offsetBytes);
  }

  async sync(): Promise<void> {
    await Promise.resolve();
    if (this.failSyncs !== undefined) throw new PcacheError(this.failCode, this.failSyncs);
    this.record('sync', 0, 0);
  }

  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    await Promise.resolve();
    if (this.failWrites !== undefined) throw new PcacheError(this.failCode, this.failWrites);
    this.record('discard', offsetBytes, lengthBytes);
    await this.inner.discard(offsetBytes, lengthBytes);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  private record(kind: DeviceEvent['kind'], offsetBytes: number, lengthBytes: number): void {
    this.events.push({ device: this.name, kind, offsetBytes, lengthBytes });
  }
}

/** XORs `mask` into byte `at` (damaging a device image on purpose). */
export function flipBits(bytes: Uint8Array, at: number, mask = 1): void {
  bytes[at] = (bytes[at] ?? 0) ^ mask;
}
