// VolumeDevice: one volume's share of a pool (ondisk/pool_layout.ts), seen as a whole cache
// device, so the engine runs on it unchanged.
//
//   volume offset                         pool offset
//   0 .. frontBytes                       slot .. slot + frontBytes         (front metadata)
//   frontBytes + i * seg .. + seg         the i-th unit of the volume's extents
//   frontBytes + n * seg .. + endBytes    slot + frontBytes ..              (its last block)
//
// A request that spans pieces is split at their edges; the engine's data I/O stays inside one
// segment, so on the hot path a request maps to one pool request with one array lookup.
// Closing a VolumeDevice does not close the pool's device: the pool owns it.

import { assert } from '../lib/assert.js';
import { PcacheError } from '../lib/errors.js';
import { rangeProblem, type BlockDevice, type BlockingIo, type DeviceRead } from './block_device.js';

export interface VolumeGeometry {
  /** Where the volume's slot starts on the pool device. */
  readonly slotOffsetBytes: number;
  /** Bytes of the slot before its last block: the volume's front metadata. */
  readonly frontBytes: number;
  /** Bytes of the slot's last block: the volume device's last block. */
  readonly endBytes: number;
  readonly segmentSizeBytes: number;
  /** Pool offset of each of the volume's segments, in order. */
  readonly unitOffsetsBytes: readonly number[];
}

export class VolumeDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly identity: string | undefined = undefined;
  readonly blocking: BlockingIo | undefined;
  readonly readMany: ((reads: readonly DeviceRead[]) => Promise<void>) | undefined;
  private readonly pool: BlockDevice;
  private readonly geometry: VolumeGeometry;
  private readonly unitsEndBytes: number;
  private closed = false;

  constructor(pool: BlockDevice, geometry: VolumeGeometry) {
    this.pool = pool;
    this.geometry = geometry;
    this.unitsEndBytes = geometry.frontBytes + geometry.unitOffsetsBytes.length * geometry.segmentSizeBytes;
    this.sizeBytes = this.unitsEndBytes + geometry.endBytes;
    const poolReadMany = pool.readMany?.bind(pool);
    this.readMany = poolReadMany === undefined ? undefined : async (reads) => {
      const mapped: DeviceRead[] = [];
      for (const r of reads) {
        this.check(r.offsetBytes, r.target.length);
        this.each(r.target, r.offsetBytes, (part, at) => { mapped.push({ target: part, offsetBytes: at }); });
      }
      await poolReadMany(mapped);
    };
    const poolBlocking = pool.blocking;
    this.blocking = poolBlocking === undefined ? undefined : {
      readSync: (target, offsetBytes) => { this.each(target, offsetBytes, (part, at) => { poolBlocking.readSync(part, at); }); },
      writeSync: (source, offsetBytes) => { this.each(source, offsetBytes, (part, at) => { poolBlocking.writeSync(part, at); }); },
      ...(poolBlocking.locate === undefined ? {} : {
        locate: (offsetBytes: number, lengthBytes: number) => {
          this.check(offsetBytes, lengthBytes);
          const [at, runBytes] = this.map(offsetBytes);
          return lengthBytes <= runBytes ? poolBlocking.locate?.(at, lengthBytes) : undefined;
        },
      }),
      ...(poolBlocking.writevSync === undefined ? {} : {
        writevSync: (sources: readonly Uint8Array[], offsetBytes: number) => {
          let total = 0;
          for (const source of sources) total += source.length;
          const [at, runBytes] = this.map(offsetBytes);
          // Back-to-back buffers inside one piece go down in one call; otherwise one by one.
          if (total <= runBytes) poolBlocking.writevSync?.(sources, at);
          else {
            let offset = offsetBytes;
            for (const source of sources) {
              this.each(source, offset, (part, partAt) => { poolBlocking.writeSync(part, partAt); });
              offset += source.length;
            }
          }
        },
      }),
    };
  }

  async read(target: Uint8Array, offsetBytes: number): Promise<void> {
    this.check(offsetBytes, target.length);
    const [at, runBytes] = this.map(offsetBytes);
    if (target.length <= runBytes) return this.pool.read(target, at);
    const parts: Promise<void>[] = [];
    this.each(target, offsetBytes, (part, partAt) => { parts.push(this.pool.read(part, partAt)); });
    await Promise.all(parts);
  }

  async write(source: Uint8Array, offsetBytes: number): Promise<void> {
    this.check(offsetBytes, source.length);
    const [at, runBytes] = this.map(offsetBytes);
    if (source.length <= runBytes) return this.pool.write(source, at);
    const parts: Promise<void>[] = [];
    this.each(source, offsetBytes, (part, partAt) => { parts.push(this.pool.write(part, partAt)); });
    await Promise.all(parts);
  }

  /** Syncs the whole pool device: a sync cannot be narrower than the device under it. */
  sync(): Promise<void> {
    if (this.closed) return Promise.reject(new PcacheError('ENODEV', 'the volume device is closed'));
    return this.pool.sync();
  }

  /** The volume's view closes; the pool device stays open for the other volumes. */
  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }

  private check(offsetBytes: number, lengthBytes: number): void {
    if (this.closed) throw new PcacheError('ENODEV', 'the volume device is closed');
    const problem = rangeProblem(this, offsetBytes, lengthBytes);
    if (problem !== undefined) throw new PcacheError('EINVAL', `volume device: ${problem}`);
  }

  /** The pool offset of volume offset `offsetBytes`, and how many bytes from there are contiguous. */
  private map(offsetBytes: number): [number, number] {
    const g = this.geometry;
    if (offsetBytes < g.frontBytes) return [g.slotOffsetBytes + offsetBytes, g.frontBytes - offsetBytes];
    if (offsetBytes < this.unitsEndBytes) {
      const inUnits = offsetBytes - g.frontBytes;
      const index = Math.floor(inUnits / g.segmentSizeBytes);
      const within = inUnits - index * g.segmentSizeBytes;
      const unitAt = g.unitOffsetsBytes[index];
      assert(unitAt !== undefined, 'volume segment out of range', index);
      return [unitAt + within, g.segmentSizeBytes - within];
    }
    const inEnd = offsetBytes - this.unitsEndBytes;
    return [g.slotOffsetBytes + g.frontBytes + inEnd, g.endBytes - inEnd];
  }

  /** Calls `io` for each piece of [offsetBytes, offsetBytes + buffer.length) with its part of `buffer`. */
  private each(buffer: Uint8Array, offsetBytes: number, io: (part: Uint8Array, poolOffsetBytes: number) => void): void {
    let done = 0;
    while (done < buffer.length) {
      const [at, runBytes] = this.map(offsetBytes + done);
      const length = Math.min(runBytes, buffer.length - done);
      io(buffer.subarray(done, done + length), at);
      done += length;
    }
  }
}
