// FileWriter: a file's writer thread, for batches of positional writes (BlockDevice.writeMany)
// and of copies from other open files into this one (BlockDevice.copyMany); and, on the cache
// device, batches of reads (BlockDevice.readMany: a fragmented client read's pieces, read
// while the event loop sends other replies).
//
// Why a thread of its own: an asynchronous write goes to libuv's thread pool, and each one
// costs the event loop a hand-off (a lock and a wake-up of a pool thread, which on a small
// machine preempts the event loop) and a completion callback. Writeback sends thousands of
// small writes a second to a fast backing device, and a profile of 4 KiB random writes
// wrapping the cache put a fifth of the event loop's time in those hand-offs. A batch costs one
// message each way, whatever its number of writes. The thread writes synchronously, one piece
// after another: buffered writes to a file or block device land in the page cache, which takes
// them as fast one at a time as side by side, and the sync after them (fdatasync on the pool)
// makes them durable together. A copy batch names where the bytes are (another device's file
// descriptor and offsets) instead of carrying them, so the event loop does not even read them.
//
// Invariants: batches are answered in the order they were sent (one thread, one queue); every
// batch sent is answered or failed before close() resolves, so the file descriptor is never
// closed under a write; at most batchesQueuedMax batches wait in the thread's queue (callers
// bound their own, this is the backstop). The thread is started on first use, and keeps the
// process alive only while a batch is out.

import { Worker } from 'node:worker_threads';
import { assert } from '../lib/assert.js';
import { PcacheError } from '../lib/errors.js';
import type { DeviceCopy, DeviceRead, DeviceWrite } from './block_device.js';
import { pieceFields, runFields, sourceFields, type BatchFailure, type CopyBatchRequest, type ReadBatchRequest, type WriteBatchReply, type WriteBatchRequest } from './file_writer_thread.js';

export type BatchKind = 'write' | 'copy' | 'read';

/** Batches sent and not yet answered, at most. */
export const batchesQueuedMax = 1024;

interface Pending {
  readonly kind: BatchKind;
  readonly resolve: () => void;
  readonly reject: (error: unknown) => void;
}

export class FileWriter {
  private readonly path: string;
  private readonly fd: number;
  /** Turns a failure the thread reports for a batch of `kind` into the device layer's error. */
  private readonly toError: (failure: BatchFailure, kind: BatchKind) => PcacheError;
  private worker: Worker | undefined;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closed = false;
  private drained: (() => void) | undefined;

  constructor(path: string, fd: number, toError: (failure: BatchFailure, kind: BatchKind) => PcacheError) {
    this.path = path;
    this.fd = fd;
    this.toError = toError;
  }

  /** Batches sent and not yet answered. */
  get queued(): number {
    return this.pending.size;
  }

  /** Writes `writes` (already checked against the device) in the writer thread. */
  write(writes: readonly DeviceWrite[]): Promise<void> {
    if (writes.length === 0) return Promise.resolve();
    const { buffer, pieces } = layOut(writes.map((w) => w.source), writes.map((w) => w.offsetBytes), true);
    return this.send((id) => ({ kind: 'write', id, fd: this.fd, buffer, pieces }));
  }

  /**
   * Reads `reads` (already checked against the device) in the writer thread: in place when
   * every target is a view of one SharedArrayBuffer, else through a shared buffer copied out
   * once every read has completed.
   */
  async read(reads: readonly DeviceRead[]): Promise<void> {
    if (reads.length === 0) return;
    const targets = reads.map((r) => r.target);
    const { buffer, pieces, shared } = layOut(targets, reads.map((r) => r.offsetBytes), false);
    await this.send((id): ReadBatchRequest => ({ kind: 'read', id, fd: this.fd, buffer, pieces }));
    if (shared) return;
    const bytes = new Uint8Array(buffer);
    for (let i = 0; i < targets.length; i++) {
      const at = pieces[i * pieceFields] ?? 0;
      const target = targets[i] as Uint8Array;
      target.set(bytes.subarray(at, at + target.length));
    }
  }

  /** Copies `copies` (already checked against the device) in the writer thread: it reads the sources itself. */
  copy(copies: readonly DeviceCopy[]): Promise<void> {
    if (copies.length === 0) return Promise.resolve();
    let numbers = 0;
    for (const copy of copies) numbers += runFields + copy.sources.length * sourceFields;
    const runs = new Float64Array(numbers);
    let at = 0;
    let runBytesMax = 0;
    for (const copy of copies) {
      runs[at++] = copy.offsetBytes;
      runs[at++] = copy.sources.length;
      let runBytes = 0;
      for (const source of copy.sources) {
        runs[at++] = source.from.fd;
        runs[at++] = source.from.offsetBytes;
        runs[at++] = source.lengthBytes;
        runBytes += source.lengthBytes;
      }
      runBytesMax = Math.max(runBytesMax, runBytes);
    }
    return this.send((id) => ({ kind: 'copy', id, fd: this.fd, runs, runBytesMax }));
  }

  private send(request: (id: number) => WriteBatchRequest | CopyBatchRequest | ReadBatchRequest): Promise<void> {
    if (this.closed) return Promise.reject(new PcacheError('ENODEV', `${this.path} is closed`));
    assert(this.pending.size < batchesQueuedMax, `${this.path}: more than ${batchesQueuedMax} batches queued`);
    const id = this.nextId++;
    const message = request(id);
    return new Promise<void>((resolve, reject) => {
      const thread = this.thread();
      this.pending.set(id, { kind: message.kind, resolve, reject });
      // While a batch is out, the thread keeps the process alive (nothing else may: a test or a
      // command awaiting a write); once none is, it does not (see thread()).
      if (this.pending.size === 1) thread.ref();
      thread.postMessage(message);
    });
  }

  /** Waits for every batch sent, then stops the thread. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.pending.size > 0) await new Promise<void>((resolve) => { this.drained = resolve; });
    const worker = this.worker;
    this.worker = undefined;
    if (worker !== undefined) await worker.terminate();
  }

  private thread(): Worker {
    if (this.worker !== undefined) return this.worker;
    const worker = new Worker(new URL('./file_writer_thread.js', import.meta.url));
    worker.on('message', (reply: WriteBatchReply) => { this.answer(reply); });
    // The thread dying (it should not: it catches every write error) fails what it held; the
    // next batch starts a new one.
    const fail = (reason: string): void => {
      if (this.worker !== worker) return;
      this.worker = undefined;
      const error = new PcacheError('EIO', `${this.path}: writer thread ${reason}`);
      for (const id of [...this.pending.keys()]) this.settle(id, error);
    };
    worker.on('error', (error) => { fail(`failed: ${error.message}`); });
    worker.on('exit', (code) => { fail(`exited (${code})`); });
    // Only now: a 'message' listener added after unref() refs the thread's port again (node 20),
    // and an idle writer thread then kept the process from exiting.
    worker.unref();
    this.worker = worker;
    return worker;
  }

  private answer(reply: WriteBatchReply): void {
    const kind = this.pending.get(reply.id)?.kind ?? 'write';
    this.settle(reply.id, reply.failure === undefined ? undefined : this.toError(reply.failure, kind));
  }

  private settle(id: number, error: PcacheError | undefined): void {
    const waiter = this.pending.get(id);
    if (waiter === undefined) return;
    this.pending.delete(id);
    if (error === undefined) waiter.resolve();
    else waiter.reject(error);
    if (this.pending.size === 0) {
      this.worker?.unref();
      const drained = this.drained;
      this.drained = undefined;
      drained?.();
    }
  }
}

/**
 * A batch's pieces as the thread takes them: one SharedArrayBuffer, and per piece its place in
 * it, its length and its file offset. Views of one SharedArrayBuffer (as writeback's batch
 * buffers and the NBD server's large pooled buffers are) go as they are (`shared`), so the
 * thread reads or writes them in place; anything else is laid back to back in a new buffer,
 * filled from the views for a write (`copyIn`), copied out by the caller after a read.
 */
function layOut(views: readonly Uint8Array[], fileOffsets: readonly number[], copyIn: boolean): { buffer: SharedArrayBuffer; pieces: Float64Array; shared: boolean } {
  const pieces = new Float64Array(views.length * pieceFields);
  const first = views[0]?.buffer;
  const shared = first instanceof SharedArrayBuffer && views.every((view) => view.buffer === first) ? first : undefined;
  let totalBytes = 0;
  views.forEach((view, i) => {
    pieces[i * pieceFields] = shared === undefined ? totalBytes : view.byteOffset;
    pieces[i * pieceFields + 1] = view.length;
    pieces[i * pieceFields + 2] = fileOffsets[i] ?? 0;
    totalBytes += view.length;
  });
  if (shared !== undefined) return { buffer: shared, pieces, shared: true };
  const buffer = new SharedArrayBuffer(totalBytes);
  if (copyIn) {
    const bytes = new Uint8Array(buffer);
    views.forEach((view, i) => { bytes.set(view, pieces[i * pieceFields] ?? 0); });
  }
  return { buffer, pieces, shared: false };
}
