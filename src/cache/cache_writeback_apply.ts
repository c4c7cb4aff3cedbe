// Applying one writeback round's plan to the backing device.
//
// The plan (cache_writeback_plan.ts) is a list of extents in offset order that never overlap.
// Contiguous extents of one kind join into runs of up to writebackRunMaxBytes: a dirty run is
// one backing write of data read from the cache device, a ZERO run a discard (or writes of
// zeroes). Dirty runs travel in batches. Where the backing device takes several writes in one
// request (BlockDevice.writeMany: a file hands them to its writer thread, one message instead
// of one thread-pool request per write), a batch holds up to writebackBatchWritesMax runs and
// writebackBatchBytesMax bytes, read into one SharedArrayBuffer. Where, besides, the cache
// device can say which file holds the data (a file, or a volume of one) and no data CRC needs
// checking, the batch carries only those places (BlockDevice.copyMany) and the writer thread
// reads the data itself: the event loop copies nothing. The data stays put meanwhile: its keys
// lie at or past dirty_tail, and a data segment is freed only once GC has passed every key into
// it, which GC never does past dirty_tail (cache_segment.ts, cache_gc.ts). Elsewhere (a
// remote store, which wants its writes side by side on the wire) a batch is one run and one
// write().
// At most writebackWritesInFlightMax batches and writebackInFlightBytesMax bytes are in flight.
//
// Because the extents never overlap, the order in which writes complete does not matter: the
// round syncs the backing device once all have. Nothing is thrown while writes are in flight:
// the first failure stops issuing and is thrown once every write issued has settled, so a
// retried round never races a write of the failed one.

import { assert } from '../lib/assert.js';
import { crc32c } from '../lib/crc32c.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { MiB } from '../lib/units.js';
import { keyFlagZero } from '../ondisk/kset.js';
import type { DeviceCopy, DeviceWrite, FileExtent } from '../device/block_device.js';
import type { CacheContext } from './cache_context.js';
import type { IndexKey } from './cache_tree.js';

export const writebackInFlightBytesMax = 64 * MiB;
/** Backing requests (batches) in flight: a slow (network) store needs many to reach its throughput. */
export const writebackWritesInFlightMax = 64;
/** Contiguous extents are gathered into backing writes of at most this size. */
export const writebackRunMaxBytes = 1 * MiB;
/** A batch for a device with writeMany: at most this many writes... */
export const writebackBatchWritesMax = 256;
/** ...and this many bytes (more when one run is larger). */
export const writebackBatchBytesMax = 4 * MiB;
/**
 * A run's data is read from a synchronous cache device before it is issued, so issuing many
 * runs works long without a break: after this many bytes, other work (client requests, the
 * control socket) gets a turn of the event loop.
 */
const writebackYieldBytes = 4 * MiB;
/**
 * Batch buffers kept for reuse once their writes have settled: a fresh 4 MiB SharedArrayBuffer
 * is mapped and zeroed by the kernel, which cost the event loop as much as reading the data
 * into it (profile of 4 KiB random writes wrapping the cache). The spares are the process's,
 * not one applier's: every volume's writeback takes from them, and a cache opened again (each
 * recovery of the crash simulator, where a fresh one per open was 7% of the CPU) finds them
 * ready. A spare is referenced by no write in flight, so any applier may take it.
 */
const spareBatchBuffersMax = 4;
const spareBatchBuffers: SharedArrayBuffer[] = [];
const zeroChunkBytes = 1 * MiB;

/** Bounds what is in flight, and keeps the first failure until everything issued has settled. */
class InFlight {
  private count = 0;
  private bytes = 0;
  private wake: (() => void) | undefined;
  private readonly settled: Promise<void>[] = [];
  failure: { error: unknown } | undefined;

  /**
   * Waits for room for one more request; false when a request failed meanwhile, and nothing
   * more may be issued (a store that is failing may hold new requests until it returns, and
   * the round would wait for them).
   */
  async room(): Promise<boolean> {
    while (this.count >= writebackWritesInFlightMax || this.bytes >= writebackInFlightBytesMax) {
      await new Promise<void>((resolve) => { this.wake = resolve; });
    }
    return this.failure === undefined;
  }

  start(bytes: number, io: () => Promise<void>): void {
    this.count++;
    this.bytes += bytes;
    this.settled.push(io().then(
      () => undefined,
      (error: unknown) => { this.fail(error); },
    ).finally(() => {
      this.count--;
      this.bytes -= bytes;
      const resume = this.wake;
      this.wake = undefined;
      resume?.();
    }));
  }

  fail(error: unknown): void {
    this.failure ??= { error };
  }

  async finish(): Promise<void> {
    await Promise.all(this.settled);
    if (this.failure !== undefined) throw this.failure.error;
  }
}

/** A batch of copies being filled. */
interface CopyBatch {
  readonly copies: DeviceCopy[];
  bytes: number;
}

/** A batch being filled: its data buffer and the writes that use it. */
interface Batch {
  readonly data: Uint8Array;
  readonly writes: DeviceWrite[];
  usedBytes: number;
}

export class WritebackApplier {
  private readonly ctx: CacheContext;
  private zeroes: Uint8Array | undefined;

  constructor(ctx: CacheContext) {
    this.ctx = ctx;
  }

  /** Writes the plan's extents to the backing device (see the file comment). */
  async apply(parts: readonly IndexKey[]): Promise<void> {
    const ctx = this.ctx;
    const batched = ctx.backing.writeMany !== undefined;
    const copyMany = ctx.backing.copyMany?.bind(ctx.backing);
    const copying = copyMany !== undefined && !ctx.dataCrc && ctx.dev.locatable;
    const inFlight = new InFlight();
    let copyBatch: CopyBatch | undefined;
    let batch: Batch | undefined;
    let issuedSinceYield = 0;

    const send = async (): Promise<void> => {
      const full = batch;
      batch = undefined;
      if (full === undefined || full.writes.length === 0) return;
      if (!(await inFlight.room())) return;
      this.count(full.writes.length, full.usedBytes);
      inFlight.start(full.usedBytes, () => this.backingWrite(full.writes).finally(() => { this.recycle(full.data); }));
    };
    const sendCopies = async (): Promise<void> => {
      const full = copyBatch;
      copyBatch = undefined;
      if (full === undefined || copyMany === undefined) return;
      if (!(await inFlight.room())) return;
      this.count(full.copies.length, full.bytes);
      inFlight.start(full.bytes, () => this.counted(() => copyMany(full.copies)));
    };
    // Issuing a run is synchronous in the common case (a copy joining the batch being filled):
    // it returns a promise only when it has to wait, so a round of thousands of runs does not
    // pay an async call and a microtask for each.
    const issueRun = (run: readonly IndexKey[], bytes: number): Promise<void> | undefined => {
      const first = run[0];
      assert(first !== undefined, 'empty writeback run');
      if (inFlight.failure !== undefined) return undefined;
      if ((first.flags & keyFlagZero) !== 0) return issueZero(first.offsetBytes, bytes);
      const copy = copying ? this.copyOf(run, first.offsetBytes) : undefined;
      if (copy !== undefined) {
        if (copyBatch !== undefined && (copyBatch.copies.length >= writebackBatchWritesMax || copyBatch.bytes + bytes > writebackBatchBytesMax)) {
          return sendCopies().then(() => { addCopy(copy, bytes); });
        }
        addCopy(copy, bytes);
        return undefined;
      }
      return issueWrite(run, bytes);
    };
    const addCopy = (copy: DeviceCopy, bytes: number): void => {
      copyBatch ??= { copies: [], bytes: 0 };
      copyBatch.copies.push(copy);
      copyBatch.bytes += bytes;
    };
    const issueZero = async (offsetBytes: number, bytes: number): Promise<void> => {
      if (!(await inFlight.room())) return;
      this.count(1, bytes);
      inFlight.start(bytes, () => this.zero(offsetBytes, bytes));
    };
    const issueWrite = async (run: readonly IndexKey[], bytes: number): Promise<void> => {
      if (batch !== undefined && (batch.writes.length >= writebackBatchWritesMax || batch.usedBytes + bytes > batch.data.length)) await send();
      batch ??= this.newBatch(batched, bytes);
      const source = batch.data.subarray(batch.usedBytes, batch.usedBytes + bytes);
      await this.readRun(run, source);
      batch.usedBytes += bytes;
      batch.writes.push({ source, offsetBytes: (run[0] as IndexKey).offsetBytes });
      if (!batched) await send();
    };
    const addRun = (run: readonly IndexKey[], bytes: number): Promise<void> | undefined => {
      issuedSinceYield += bytes;
      if (issuedSinceYield >= writebackYieldBytes) {
        issuedSinceYield = 0;
        return ctx.timers.yieldToOthers().then(() => issueRun(run, bytes));
      }
      // A completion resumes this loop inside the poll phase, where a client's request may be
      // waiting behind it: the copy (a synchronous read of the cache device) waits for the
      // turn's background slice (lib/timers.ts).
      const paced = ctx.timers.pace();
      if (paced !== undefined) return paced.then(() => issueRun(run, bytes));
      return issueRun(run, bytes);
    };

    let run: IndexKey[] = [];
    let runBytes = 0;
    try {
      for (const key of parts) {
        if (inFlight.failure !== undefined) break;
        const last = run[run.length - 1];
        const joins = last !== undefined && last.offsetBytes + last.lengthBytes === key.offsetBytes &&
          (last.flags & keyFlagZero) === (key.flags & keyFlagZero) && runBytes + key.lengthBytes <= writebackRunMaxBytes;
        if (!joins && run.length > 0) {
          const issuing = addRun(run, runBytes);
          if (issuing !== undefined) await issuing;
          run = [];
          runBytes = 0;
        }
        run.push(key);
        runBytes += key.lengthBytes;
      }
      if (run.length > 0 && inFlight.failure === undefined) await addRun(run, runBytes);
      if (inFlight.failure === undefined) await send();
      if (inFlight.failure === undefined) await sendCopies();
    } catch (error) {
      // A read of the cache device failed (or a data CRC did not match): nothing more is
      // issued, and the error waits for what is in flight.
      inFlight.fail(error);
    }
    await inFlight.finish();
  }

  /**
   * A batch for a run of `bytes`: for a device with writeMany, a SharedArrayBuffer (a writer
   * thread takes views of one without a copy, file_writer.ts) of writebackBatchBytesMax, reused
   * when one is spare; otherwise the run's own buffer.
   */
  private newBatch(batched: boolean, bytes: number): Batch {
    if (!batched) return { data: new Uint8Array(bytes), writes: [], usedBytes: 0 };
    const buffer = bytes <= writebackBatchBytesMax ? spareBatchBuffers.pop() ?? new SharedArrayBuffer(writebackBatchBytesMax) : new SharedArrayBuffer(bytes);
    return { data: new Uint8Array(buffer), writes: [], usedBytes: 0 };
  }

  private recycle(data: Uint8Array): void {
    const buffer = data.buffer;
    if (buffer instanceof SharedArrayBuffer && buffer.byteLength === writebackBatchBytesMax && spareBatchBuffers.length < spareBatchBuffersMax) spareBatchBuffers.push(buffer);
  }

  private count(writes: number, bytes: number): void {
    this.ctx.stats.writebackBackingWrites += writes;
    this.ctx.stats.writebackBackingBytes += bytes;
  }

  /** Where a run's data lies in the cache device's file, or undefined when it cannot say for every piece. */
  private copyOf(run: readonly IndexKey[], offsetBytes: number): DeviceCopy | undefined {
    const sources: { from: FileExtent; lengthBytes: number }[] = [];
    for (const part of run) {
      const from = this.ctx.dev.locateData(part.segment, part.segmentOffsetBytes, part.lengthBytes);
      if (from === undefined) return undefined;
      sources.push({ from, lengthBytes: part.lengthBytes });
    }
    return { offsetBytes, sources };
  }

  /** Gathers a run's contiguous extents from the cache device. */
  private async readRun(run: readonly IndexKey[], target: Uint8Array): Promise<void> {
    let at = 0;
    for (const part of run) {
      await this.readPart(part, target.subarray(at, at + part.lengthBytes));
      at += part.lengthBytes;
    }
  }

  /** Reads one extent's data from the cache device, checking its data CRC when the cache has one. */
  private async readPart(key: IndexKey, target: Uint8Array): Promise<void> {
    const ctx = this.ctx;
    if (!ctx.dataCrc) {
      const io = ctx.dev.readData(target, key.segment, key.segmentOffsetBytes);
      if (io !== undefined) await io;
      return;
    }
    const extent = new Uint8Array(key.crcLengthBytes);
    const io = ctx.dev.readData(extent, key.segment, key.segmentOffsetBytes - key.crcDeltaBytes);
    if (io !== undefined) await io;
    if (crc32c(extent) !== key.crc) {
      ctx.stats.dataCrcErrors++;
      throw new PcacheError('EIO', `writeback: data CRC mismatch in extent ${key.offsetBytes}+${key.lengthBytes} (segment ${key.segment})`);
    }
    target.set(extent.subarray(key.crcDeltaBytes, key.crcDeltaBytes + key.lengthBytes));
  }

  private async zero(offsetBytes: number, lengthBytes: number): Promise<void> {
    const backing = this.ctx.backing;
    if (backing.discard !== undefined) {
      const discard = backing.discard.bind(backing);
      await this.counted(() => discard(offsetBytes, lengthBytes));
      return;
    }
    this.zeroes ??= new Uint8Array(zeroChunkBytes);
    for (let done = 0; done < lengthBytes; done += zeroChunkBytes) {
      const piece = this.zeroes.subarray(0, Math.min(zeroChunkBytes, lengthBytes - done));
      await this.counted(() => backing.write(piece, offsetBytes + done));
    }
  }

  private backingWrite(writes: readonly DeviceWrite[]): Promise<void> {
    const backing = this.ctx.backing;
    if (backing.writeMany !== undefined) {
      const writeMany = backing.writeMany.bind(backing);
      return this.counted(() => writeMany(writes));
    }
    const only = writes[0];
    assert(writes.length === 1 && only !== undefined, 'a batch of several writes for a device without writeMany');
    return this.counted(() => backing.write(only.source, only.offsetBytes));
  }

  /** Counts a failed backing write as one; the caller keeps the error. */
  private async counted(write: () => Promise<void>): Promise<void> {
    try {
      await write();
    } catch (error) {
      if (isPcacheError(error)) this.ctx.stats.backingWriteErrors++;
      throw error;
    }
  }
}

