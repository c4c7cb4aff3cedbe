// DeviceModel: what a device holds and what would survive a power loss, as a state machine.
//
// The model follows the dm-log-writes rule (docs/testing.md, "The crash model"). It keeps:
// - `durable`: the contents that survive power loss;
// - `visible`: what reads return (durable plus every completed write, in completion order);
// - the volatile writes: every write not yet covered by a completed sync, completed ones in
//   completion order, followed by the ones still in flight in issue order.
// A sync covers exactly the writes that had completed when it was issued. When it completes
// those (and only those) move to `durable`, in completion order; writes that complete while it
// runs stay volatile. A failed sync moves nothing; with the fsyncgate option (Linux marks the
// pages clean after a failed writeback) its writes are also forgotten, so they stay visible
// but a later sync does not persist them.
//
// The model knows nothing about time, promises or faults: SimDevice drives it live, and the
// recording reader replays a side log through it. Invariants: ids are unique per model and
// every id is issued once; `durable` only ever changes through a completed sync, `settle`, or
// the bounded-volatile-list rule below; a crash point is an immutable snapshot.

import { assert } from '../src/lib/assert.js';
import { sectorSizeBytes } from '../src/lib/units.js';
import { PageImage, type ReadonlyPageImage } from './page_image.js';

/** One write not yet durable. Immutable: completing a write replaces its record. */
export interface VolatileWrite {
  /** Unique within the device, increasing in issue order. */
  readonly id: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  /** The bytes written, or undefined for a write of zeroes (a discard). */
  readonly data: Uint8Array | undefined;
  /** False while the write is in flight (issued, not yet completed). */
  readonly completed: boolean;
}

/** A device's state at one instant, from which crash states are built. */
export interface CrashPoint {
  readonly device: string;
  readonly sizeBytes: number;
  readonly identity: string | undefined;
  /** What survives power loss with no volatile write applied. Never changes. */
  readonly durable: ReadonlyPageImage;
  /** Equal ids mean equal durable contents (within one run); part of crash-state keys. */
  readonly durableId: string;
  /** Completed writes in completion order, then in-flight writes in issue order. */
  readonly volatile: readonly VolatileWrite[];
}

export interface DeviceModelOptions {
  /**
   * Bound on completed volatile writes. Past it the oldest one becomes durable, as a kernel's
   * background writeback may do at any time, so a workload that never syncs cannot grow the
   * list without bound. Default 100,000.
   */
  readonly volatileWritesMax?: number;
}

const volatileWritesMaxDefault = 100_000;
let nextModelInstance = 1;

export class DeviceModel {
  readonly sizeBytes: number;
  readonly volatileWritesMax: number;
  private durable: PageImage;
  private visible: PageImage;
  private completed: VolatileWrite[] = [];
  private readonly inFlight = new Map<number, VolatileWrite>();
  /** Pending syncs: the ids of the writes each one covers. */
  private readonly syncs = new Map<number, ReadonlySet<number>>();
  private readonly instance: number;
  private durableVersion = 0;
  private snapshot: { version: number; image: ReadonlyPageImage } | undefined;

  /** `image` becomes the durable (and visible) contents; the model owns it from now on. */
  constructor(image: PageImage, options: DeviceModelOptions = {}) {
    this.sizeBytes = image.sizeBytes;
    this.volatileWritesMax = options.volatileWritesMax ?? volatileWritesMaxDefault;
    assert(this.volatileWritesMax >= 1, 'the volatile list must hold at least one write');
    this.durable = image;
    this.visible = image.fork();
    this.instance = nextModelInstance;
    nextModelInstance += 1;
  }

  get volatileWriteCount(): number {
    return this.completed.length + this.inFlight.size;
  }

  get inFlightWriteCount(): number {
    return this.inFlight.size;
  }

  get pendingSyncCount(): number {
    return this.syncs.size;
  }

  issueWrite(id: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | undefined): void {
    assert(!this.inFlight.has(id), `write ${id} issued twice`);
    assert(data === undefined || data.length === lengthBytes, 'write data must match its length');
    assert(offsetBytes >= 0 && offsetBytes + lengthBytes <= this.sizeBytes, `write ${id} is out of range`);
    this.inFlight.set(id, { id, offsetBytes, lengthBytes, data, completed: false });
  }

  completeWrite(id: number): void {
    const write = this.inFlight.get(id);
    assert(write !== undefined, `write ${id} completed but is not in flight`);
    this.inFlight.delete(id);
    applyWrite(this.visible, write, undefined);
    this.completed.push({ ...write, completed: true });
    if (this.completed.length > this.volatileWritesMax) this.persistOldest();
  }

  /** A failed write applies nothing: it leaves no trace in any crash state. */
  failWrite(id: number): void {
    assert(this.inFlight.delete(id), `write ${id} failed but is not in flight`);
  }

  issueSync(id: number): void {
    assert(!this.syncs.has(id), `sync ${id} issued twice`);
    this.syncs.set(id, new Set(this.completed.map((write) => write.id)));
  }

  completeSync(id: number): void {
    const covered = this.takeSync(id);
    const remaining: VolatileWrite[] = [];
    let moved = 0;
    for (const write of this.completed) {
      // Writes an earlier-completing sync already persisted are no longer in the list.
      if (covered.has(write.id)) {
        applyWrite(this.durable, write, undefined);
        moved += 1;
      } else {
        remaining.push(write);
      }
    }
    this.completed = remaining;
    if (moved > 0) this.durableVersion += 1;
  }

  /**
   * A failed sync persists nothing. With `dropDirty` (fsyncgate) the writes it covered are
   * forgotten: they stay visible but can never become durable.
   */
  failSync(id: number, options: { dropDirty: boolean }): void {
    const covered = this.takeSync(id);
    if (options.dropDirty) this.completed = this.completed.filter((write) => !covered.has(write.id));
  }

  read(target: Uint8Array, offsetBytes: number): void {
    this.visible.read(target, offsetBytes);
  }

  readDurable(target: Uint8Array, offsetBytes: number): void {
    this.durable.read(target, offsetBytes);
  }

  crashPoint(device: string, identity: string | undefined): CrashPoint {
    if (this.snapshot?.version !== this.durableVersion) {
      // Forking is O(1); reusing the fork while durable is unchanged also spares the later
      // writes to `durable` from copying pages they would otherwise share with it.
      this.snapshot = { version: this.durableVersion, image: this.durable.fork() };
    }
    return {
      device,
      sizeBytes: this.sizeBytes,
      identity,
      durable: this.snapshot.image,
      durableId: `${this.instance}.${this.durableVersion}`,
      volatile: [...this.completed, ...this.inFlight.values()],
    };
  }

  /** A clean shutdown of the machine: the disk ends up holding exactly what reads return. */
  settle(): void {
    assert(this.inFlight.size === 0, 'cannot settle a device with writes in flight');
    assert(this.syncs.size === 0, 'cannot settle a device with syncs in flight');
    this.durable = this.visible.fork();
    this.completed = [];
    this.durableVersion += 1;
  }

  /** A fork of the durable contents. */
  durableImage(): PageImage {
    return this.durable.fork();
  }

  /** A fork of what reads currently return. */
  visibleImage(): PageImage {
    return this.visible.fork();
  }

  private takeSync(id: number): ReadonlySet<number> {
    const covered = this.syncs.get(id);
    assert(covered !== undefined, `sync ${id} finished but is not pending`);
    this.syncs.delete(id);
    return covered;
  }

  private persistOldest(): void {
    const oldest = this.completed.shift();
    assert(oldest !== undefined, 'the volatile list is over its bound, so it is not empty');
    applyWrite(this.durable, oldest, undefined);
    this.durableVersion += 1;
  }
}

/** How many device sectors a write touches (its tearing granularity). */
export function writeSectorCount(write: { offsetBytes: number; lengthBytes: number }): number {
  if (write.lengthBytes === 0) return 0;
  const first = Math.floor(write.offsetBytes / sectorSizeBytes);
  const end = Math.ceil((write.offsetBytes + write.lengthBytes) / sectorSizeBytes);
  return end - first;
}

/**
 * Applies a write to an image: whole, or (with a sector mask, one bit per touched sector,
 * least significant bit of byte 0 first) only the sectors whose bit is set.
 */
export function applyWrite(image: PageImage, write: VolatileWrite, sectorMask: Uint8Array | undefined): void {
  if (sectorMask === undefined) {
    if (write.data === undefined) image.zero(write.offsetBytes, write.lengthBytes);
    else image.write(write.data, write.offsetBytes);
    return;
  }
  const sectorCount = writeSectorCount(write);
  assert(sectorMask.length === Math.ceil(sectorCount / 8), 'a sector mask has one bit per touched sector');
  const firstSector = Math.floor(write.offsetBytes / sectorSizeBytes);
  const end = write.offsetBytes + write.lengthBytes;
  for (let index = 0; index < sectorCount; index += 1) {
    if (((sectorMask[index >>> 3] ?? 0) & (1 << (index & 7))) === 0) continue;
    const pieceStart = Math.max(write.offsetBytes, (firstSector + index) * sectorSizeBytes);
    const pieceEnd = Math.min(end, (firstSector + index + 1) * sectorSizeBytes);
    if (write.data === undefined) {
      image.zero(pieceStart, pieceEnd - pieceStart);
    } else {
      const from = pieceStart - write.offsetBytes;
      image.write(write.data.subarray(from, from + pieceEnd - pieceStart), pieceStart);
    }
  }
}
