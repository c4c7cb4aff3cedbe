// BufferPool: reuses READ reply buffers and WRITE payload buffers instead of allocating one per
// request.
//
// Why: a READ reply is one buffer (reply header, then the data the Export reads straight into
// it). Allocating it per request costs, for large reads, an mmap, a page fault per 4 KiB on
// first touch, a munmap, and garbage collections triggered by the external memory — a 1 MiB
// read at queue depth 1 spent more time there than reading and sending the data (see
// docs/performance.md, "NBD: pcache vs nbdkit"). Reused buffers are already mapped. A WRITE
// payload is copied out of the connection's read buffer into one of these (socket_input.ts).
//
// Rules:
// - Buffers are pooled by exact byte length (a READ reply's header + data, a WRITE's data), so
//   a reply is always exactly one whole buffer and the Export's target is exactly the data
//   part of it.
// - A READ buffer goes back to the pool only once the socket has handed all of it to the
//   kernel (its write callback, without error), and only for a successful reply: after a
//   failed Export call an asynchronous read might still be writing into it, so it is left to
//   the GC. A WRITE payload goes back when the Export completed the write successfully (the
//   Export keeps no reference after that: export.ts); after a failure it is left to the GC.
// - Buffers of at least sharedBufferBytesMin are shared memory (SharedArrayBuffer), so an Export
//   may have another thread fill a large READ's data in place (BlockDevice.readMany) instead of
//   copying it over from a buffer of its own. Node's sockets send them like any other bytes.
//   Smaller ones stay ordinary memory: no thread is worth its hand-off for them, and the 4 KiB
//   hot path keeps exactly what it had.
// - Reused buffers are not zeroed. The Export contract is to fill the whole target on success;
//   should an Export break it, stale bytes from an earlier READ of the same export (which any
//   client may read anyway) would go out, never memory of anything else. One pool per server.
// - The pool is bounded: at most bufferPoolBytesMax bytes and bufferPoolPerSizeMax buffers of
//   one length are kept. A buffer that would exceed the bytes first evicts free buffers of
//   other lengths (the workload has moved on), then is dropped for the GC if it still does
//   not fit.

import { assert } from '../../lib/assert.js';
import { KiB, MiB } from '../../lib/units.js';

/** Free bytes the pool may keep (on top of the buffers in use, which backpressure bounds). */
export const bufferPoolBytesMax = 64 * MiB;
/** Buffers this long or longer are SharedArrayBuffers (see the file comment); as cache_read.ts's threshold for reading on a thread. */
export const sharedBufferBytesMin = 64 * KiB;
/** Free buffers of one length the pool may keep. */
export const bufferPoolPerSizeMax = 256;

export class BufferPool {
  private readonly free = new Map<number, Uint8Array[]>();
  private freeBytes = 0;

  /** A buffer of exactly `lengthBytes`, reused when one is free (its contents are stale). */
  take(lengthBytes: number): Uint8Array {
    assert(Number.isSafeInteger(lengthBytes) && lengthBytes > 0, 'pooled buffer length must be positive');
    const list = this.free.get(lengthBytes);
    const buffer = list?.pop();
    if (list === undefined || buffer === undefined) {
      return lengthBytes >= sharedBufferBytesMin ? new Uint8Array(new SharedArrayBuffer(lengthBytes)) : new Uint8Array(lengthBytes);
    }
    if (list.length === 0) this.free.delete(lengthBytes); // no empty lists: the map stays as small as the pool
    this.freeBytes -= lengthBytes;
    return buffer;
  }

  /** Returns a buffer nobody references any more (see the file comment for when that is). */
  give(buffer: Uint8Array): void {
    assert(buffer.byteOffset === 0 && buffer.byteLength === buffer.buffer.byteLength, 'only whole buffers from take() are pooled');
    const length = buffer.byteLength;
    let list = this.free.get(length);
    // Over budget: buffers of other lengths make room, when that can be enough. Without this,
    // the buffers of one workload (64 of 1 MiB after sequential reads) would hold the budget
    // for good, and every 4 KiB WRITE after them would allocate its payload afresh.
    const overBytes = this.freeBytes + length - bufferPoolBytesMax;
    if (overBytes > 0 && ((list?.length ?? 0) + 1) * length <= bufferPoolBytesMax) this.evictOtherThan(length, overBytes);
    if (this.freeBytes + length > bufferPoolBytesMax) return;
    if (list === undefined) {
      list = [];
      this.free.set(length, list);
    }
    if (list.length >= bufferPoolPerSizeMax) return;
    list.push(buffer);
    this.freeBytes += length;
  }

  /** Drops free buffers of lengths other than `keep` until `bytes` are dropped or none are left. */
  private evictOtherThan(keep: number, bytes: number): void {
    let dropped = 0;
    for (const [length, list] of this.free) {
      if (length === keep) continue;
      while (dropped < bytes && list.pop() !== undefined) {
        dropped += length;
        this.freeBytes -= length;
      }
      if (list.length === 0) this.free.delete(length);
      if (dropped >= bytes) return;
    }
  }

  get freeBytesHeld(): number {
    return this.freeBytes;
  }
}
