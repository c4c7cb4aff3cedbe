// The cache device: its geometry, the I/O helpers the engine uses on it, and every metadata
// write (cache_metadata.ts formats a device and reads its metadata back).
//
// I/O helpers return undefined when the device completed the request synchronously (it
// offers blocking I/O) and a promise otherwise, so the request path pays for a promise only
// when the device is really asynchronous. Metadata writes go to the older copy of each
// dual-copy record and, after the next sync, into the other one too (sync); nothing here syncs
// except where a comment says so — the callers own the ordering between writes and syncs,
// because that ordering is the crash contract (docs/design.md, "Barriers").

import { assert } from '../lib/assert.js';
import type { BlockDevice, DeviceRead, FileExtent } from '../device/block_device.js';
import { encodeCacheInfo, type CacheInfo } from '../ondisk/cache_info.js';
import { encodeCachePos, type CachePos } from '../ondisk/cache_pos.js';
import { ksetCrcSeed, ksetHeaderBytesFor } from '../ondisk/kset.js';
import { cacheInfoOffsetsBytes, layoutFor, segmentDataOffsetBytes, segmentDataSizeBytes, segmentOffsetBytes, type Layout } from '../ondisk/layout.js';
import { DualCopyWriter } from '../ondisk/meta_header.js';
import { encodeSegmentGen } from '../ondisk/segment_gen.js';
import type { Superblock } from '../ondisk/superblock.js';
import type { CacheMetadata } from './cache_metadata.js';
import type { Io } from './cache_types.js';

export class CacheDev {
  readonly device: BlockDevice;
  readonly sb: Superblock;
  readonly layout: Layout;
  /** The kset header of this device's format (kset.ts). */
  readonly ksetHeaderBytes: number;
  readonly segmentCount: number;
  readonly segmentSizeBytes: number;
  readonly dataSizeBytes: number;
  readonly crcSeed: number;
  private readonly cacheInfoWriter: DualCopyWriter;
  private readonly keyTailWriter: DualCopyWriter;
  private readonly dirtyTailWriter: DualCopyWriter;
  /** Per segment: which generation copy is newest (0, 1, or 2 for neither) and its seq. */
  private readonly genLatestIndex: Uint8Array;
  private readonly genLatestSeq: Uint8Array;
  /** Second copies waiting for a sync to make their first copy durable, by record (see sync). */
  private readonly mirrors = new Map<string, Mirror>();
  /** Second-copy writes in flight, by record: an update of the record waits for its mirror. */
  private readonly mirrorWrites = new Map<string, Promise<void>>();

  constructor(device: BlockDevice, metadata: CacheMetadata) {
    this.device = device;
    this.sb = metadata.sb;
    this.layout = layoutFor(metadata.sb.formatVersion);
    this.ksetHeaderBytes = ksetHeaderBytesFor(this.layout.extendedKsets);
    this.segmentCount = metadata.sb.segmentCount;
    this.segmentSizeBytes = metadata.sb.segmentSizeBytes;
    this.dataSizeBytes = segmentDataSizeBytes(this.segmentSizeBytes);
    this.crcSeed = ksetCrcSeed(metadata.sb.cacheUuid);
    this.cacheInfoWriter = new DualCopyWriter(metadata.cacheInfo);
    this.keyTailWriter = new DualCopyWriter(metadata.keyTail);
    this.dirtyTailWriter = new DualCopyWriter(metadata.dirtyTail);
    this.genLatestIndex = new Uint8Array(this.segmentCount).fill(2);
    this.genLatestSeq = new Uint8Array(this.segmentCount);
    metadata.gens.forEach((choice, segment) => {
      this.genLatestIndex[segment] = choice.latestIndex ?? 2;
      this.genLatestSeq[segment] = choice.latestSeq;
    });
  }

  /** Absolute device offset of byte `offsetBytes` of segment `segment`'s data area. */
  dataOffset(segment: number, offsetBytes: number): number {
    assert(segment >= 0 && segment < this.segmentCount, 'segment out of range', segment);
    assert(offsetBytes >= 0 && offsetBytes <= this.dataSizeBytes, 'data offset out of range', offsetBytes);
    return segmentOffsetBytes(segment, this.segmentSizeBytes) + segmentDataOffsetBytes + offsetBytes;
  }

  readData(target: Uint8Array, segment: number, offsetBytes: number): Io {
    assert(offsetBytes + target.length <= this.dataSizeBytes, 'read runs past the segment');
    return this.read(target, this.dataOffset(segment, offsetBytes));
  }

  /** Whether readDataMany can read off the event loop (the device has a thread for batches of reads). */
  get readsOffThread(): boolean {
    return this.device.readMany !== undefined;
  }

  /**
   * Reads data ranges, `targets[i]` from segment `segments[i]` at `offsetsBytes[i]` of its data
   * area, as one batch off the event loop (readsOffThread must hold).
   */
  readDataMany(targets: readonly Uint8Array[], segments: readonly number[], offsetsBytes: readonly number[]): Promise<void> {
    const readMany = this.device.readMany;
    assert(readMany !== undefined, 'readDataMany on a device without readMany');
    const reads: DeviceRead[] = new Array<DeviceRead>(targets.length);
    for (let i = 0; i < targets.length; i++) {
      const target = targets[i] as Uint8Array;
      const offsetBytes = offsetsBytes[i] ?? 0;
      assert(offsetBytes + target.length <= this.dataSizeBytes, 'read runs past the segment');
      reads[i] = { target, offsetBytes: this.dataOffset(segments[i] ?? -1, offsetBytes) };
    }
    return readMany.call(this.device, reads);
  }

  /** Where a data range lives in an open file, when the device can say (BlockingIo.locate). */
  locateData(segment: number, offsetBytes: number, lengthBytes: number): FileExtent | undefined {
    assert(offsetBytes + lengthBytes <= this.dataSizeBytes, 'range runs past the segment');
    return this.device.blocking?.locate?.(this.dataOffset(segment, offsetBytes), lengthBytes);
  }

  /** Whether reads and writes complete before they return (the device offers blocking I/O): then no Io is a promise. */
  get synchronous(): boolean {
    return this.device.blocking !== undefined;
  }

  /** Whether locateData can answer at all. */
  get locatable(): boolean {
    return this.device.blocking?.locate !== undefined;
  }

  writeData(source: Uint8Array, segment: number, offsetBytes: number): Io {
    assert(offsetBytes + source.length <= this.dataSizeBytes, 'write runs past the segment');
    return this.write(source, this.dataOffset(segment, offsetBytes));
  }

  /** Writes `sources` back to back into a segment's data area, in one call where the device allows. */
  writeDataRun(sources: readonly Uint8Array[], segment: number, offsetBytes: number): Io {
    let total = 0;
    for (const source of sources) total += source.length;
    assert(offsetBytes + total <= this.dataSizeBytes, 'write runs past the segment');
    const start = this.dataOffset(segment, offsetBytes);
    const blocking = this.device.blocking;
    if (blocking?.writevSync !== undefined && sources.length > 1) {
      blocking.writevSync(sources, start);
      return undefined;
    }
    let at = start;
    const pending: Promise<void>[] = [];
    for (const source of sources) {
      const io = this.write(source, at);
      if (io !== undefined) pending.push(io);
      at += source.length;
    }
    return pending.length === 0 ? undefined : Promise.all(pending).then(() => undefined);
  }

  read(target: Uint8Array, offsetBytes: number): Io {
    const blocking = this.device.blocking;
    if (blocking === undefined) return this.device.read(target, offsetBytes);
    blocking.readSync(target, offsetBytes);
    return undefined;
  }

  write(source: Uint8Array, offsetBytes: number): Io {
    const blocking = this.device.blocking;
    if (blocking === undefined) return this.device.write(source, offsetBytes);
    blocking.writeSync(source, offsetBytes);
    return undefined;
  }

  /**
   * Makes every completed write durable. Then writes the second copies of the records updated
   * before the sync began (the mirrors): their first copy is durable now, so a torn second copy
   * can only leave the first one readable. The mirrors become durable at the next sync (close
   * ends with settleMirrors).
   */
  sync(): Promise<void> {
    if (this.mirrors.size === 0) return this.device.sync();
    const due = [...this.mirrors];
    return this.device.sync().then(() => this.writeMirrors(due));
  }

  /** Writes the pending second copies and makes them durable (clean shutdown). */
  async settleMirrors(): Promise<void> {
    if (this.mirrors.size === 0) return;
    await this.sync();
    await this.device.sync();
  }

  private writeMirrors(due: readonly [string, Mirror][]): Promise<void> | undefined {
    const pending: Promise<void>[] = [];
    for (const [record, mirror] of due) {
      // Superseded or dropped by a newer update of the record since this sync began.
      if (this.mirrors.get(record) !== mirror) continue;
      this.mirrors.delete(record);
      const io = this.write(mirror.bytes, mirror.offsetBytes);
      if (io === undefined) continue;
      const done = io.finally(() => { if (this.mirrorWrites.get(record) === done) this.mirrorWrites.delete(record); });
      this.mirrorWrites.set(record, done);
      pending.push(done);
    }
    return pending.length === 0 ? undefined : Promise.all(pending).then(() => undefined);
  }

  /**
   * Writes one update of a dual-copy record: drops its pending mirror, waits for a mirror write
   * of it still in flight (two writes to one copy must never race), writes the older copy, and
   * once that succeeded lets the next sync mirror it into the other copy.
   */
  private writeRecord(record: string, writer: { target(): { index: 0 | 1; seq: number }; written(slot: { index: 0 | 1; seq: number }): void },
    offsets: readonly [number, number], encode: (seq: number) => Uint8Array): Io {
    this.mirrors.delete(record);
    const inFlight = this.mirrorWrites.get(record);
    const start = (): Io => {
      const slot = writer.target();
      const bytes = encode(slot.seq);
      const done = (): void => {
        writer.written(slot);
        this.mirrors.set(record, { bytes, offsetBytes: offsets[slot.index === 0 ? 1 : 0] });
      };
      const io = this.write(bytes, offsets[slot.index]);
      if (io === undefined) {
        done();
        return undefined;
      }
      return io.then(done);
    };
    return inFlight === undefined ? start() : inFlight.then(start);
  }

  /**
   * Writes segment `segment`'s generation into its older copy (no sync; the next sync mirrors
   * it into the other). Completes synchronously (returns undefined) on a blocking device.
   */
  writeGen(segment: number, gen: number): Io {
    const start = segmentOffsetBytes(segment, this.segmentSizeBytes);
    const offsets = this.layout.segmentGenOffsetsBytes;
    const writer = {
      target: (): { index: 0 | 1; seq: number } => ({ index: this.genLatestIndex[segment] === 0 ? 1 : 0, seq: ((this.genLatestSeq[segment] ?? 0) + 1) & 0xff }),
      written: (slot: { index: 0 | 1; seq: number }): void => {
        this.genLatestIndex[segment] = slot.index;
        this.genLatestSeq[segment] = slot.seq;
      },
    };
    return this.writeRecord(`gen ${segment}`, writer, [start + offsets[0], start + offsets[1]], (seq) => encodeSegmentGen(gen, seq, this.layout.version));
  }

  async writeKeyTail(pos: CachePos): Promise<void> {
    await this.writeRecord('key_tail', this.keyTailWriter, this.layout.keyTailOffsetsBytes, (seq) => encodeCachePos(pos, seq, this.layout.version));
  }

  async writeDirtyTail(pos: CachePos): Promise<void> {
    await this.writeRecord('dirty_tail', this.dirtyTailWriter, this.layout.dirtyTailOffsetsBytes, (seq) => encodeCachePos(pos, seq, this.layout.version));
  }

  async writeCacheInfo(info: CacheInfo): Promise<void> {
    await this.writeRecord('cache_info', this.cacheInfoWriter, cacheInfoOffsetsBytes, (seq) => encodeCacheInfo(info, seq, this.layout.version));
  }
}

/** A record's second copy: the bytes its first copy got, for the other place. */
interface Mirror {
  readonly bytes: Uint8Array;
  readonly offsetBytes: number;
}
