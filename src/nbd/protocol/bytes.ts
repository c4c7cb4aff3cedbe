// Byte plumbing for the NBD codec: big-endian field helpers and ByteQueue, the "expect N bytes"
// cursor over a stream that arrives in arbitrary chunks.
//
// Invariants:
// - ByteQueue never copies a chunk on arrival; it keeps references and copies only when a
//   caller asks for bytes that straddle chunks (a header split by the network), asks for them
//   to be placed in its own buffer (a WRITE payload), or calls `own()`. A chunk may be a view
//   of a buffer its producer reuses (the server reads every socket into one buffer): views
//   returned by `take` are then valid only until the producer's next read, and the producer
//   calls `own()` before that read so that bytes still queued survive it.
// - Nothing here allocates a size taken from the wire: callers bounds-check a length before
//   they ask `take` or `takeInto` for that many bytes. `take` asserts its bound.
// - 64-bit wire fields become numbers only through readU64BE (src/lib/units.ts), never here.

import { assert } from '../../lib/assert.js';

/** Largest single `take`: one option's data (the handshake caps it far below this). */
const takeMaxBytes = 1024 * 1024;
/** Copies up to this many bytes go byte by byte rather than through a subarray view. */
const smallCopyBytesMax = 64;

export function readU16BE(bytes: Uint8Array, offset: number): number {
  assert(offset + 2 <= bytes.length, 'readU16BE past the end');
  return ((bytes[offset] ?? 0) << 8) | (bytes[offset + 1] ?? 0);
}

export function readU32BE(bytes: Uint8Array, offset: number): number {
  assert(offset + 4 <= bytes.length, 'readU32BE past the end');
  return (
    ((bytes[offset] ?? 0) * 0x100_0000) +
    (((bytes[offset + 1] ?? 0) << 16) | ((bytes[offset + 2] ?? 0) << 8) | (bytes[offset + 3] ?? 0))
  );
}

/** Reads a u64 as a bigint; only for magics, which are compared and never used as numbers. */
export function readU64BEBig(bytes: Uint8Array, offset: number): bigint {
  assert(offset + 8 <= bytes.length, 'readU64BEBig past the end');
  return (BigInt(readU32BE(bytes, offset)) << 32n) | BigInt(readU32BE(bytes, offset + 4));
}

export function writeU16BE(bytes: Uint8Array, offset: number, value: number): void {
  assert(Number.isInteger(value) && value >= 0 && value <= 0xffff, 'u16 out of range', value);
  bytes[offset] = value >>> 8;
  bytes[offset + 1] = value & 0xff;
}

export function writeU32BE(bytes: Uint8Array, offset: number, value: number): void {
  assert(Number.isInteger(value) && value >= 0 && value <= 0xffff_ffff, 'u32 out of range', value);
  bytes[offset] = value >>> 24;
  bytes[offset + 1] = (value >>> 16) & 0xff;
  bytes[offset + 2] = (value >>> 8) & 0xff;
  bytes[offset + 3] = value & 0xff;
}

export function writeU64BEBig(bytes: Uint8Array, offset: number, value: bigint): void {
  writeU32BE(bytes, offset, Number(value >> 32n));
  writeU32BE(bytes, offset + 4, Number(value & 0xffff_ffffn));
}

/** A FIFO of received chunks read from the front, with one running byte count. */
export class ByteQueue {
  private readonly chunks: Uint8Array[] = [];
  /** Bytes of chunks[0] already consumed. */
  private headOffset = 0;
  private lengthBytes = 0;

  get length(): number {
    return this.lengthBytes;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.lengthBytes += chunk.length;
  }

  /**
   * Removes and returns the first `count` bytes. Returns a view into the received chunk when
   * the bytes are contiguous there, otherwise a fresh copy. The caller must have checked
   * `length >= count`.
   */
  take(count: number): Uint8Array {
    assert(count >= 0 && count <= takeMaxBytes, 'take exceeds the bound (bytes)', count);
    assert(count <= this.lengthBytes, 'take past the end of the queue');
    const first = this.chunks[0];
    if (count === 0 || first === undefined) return new Uint8Array(0);
    if (first.length - this.headOffset >= count) {
      const view = first.subarray(this.headOffset, this.headOffset + count);
      this.consume(count);
      return view;
    }
    const copy = new Uint8Array(count);
    const copied = this.takeInto(copy, 0);
    assert(copied === count, 'take copied too few bytes');
    return copy;
  }

  /**
   * Copies the bytes still queued into one buffer the queue owns, so that the chunks they came
   * in may be reused. Costs nothing when the queue is empty (the common case: a socket read
   * that ended on a request boundary).
   */
  own(): void {
    if (this.lengthBytes === 0) return;
    const owned = new Uint8Array(this.lengthBytes);
    this.takeInto(owned, 0);
    this.chunks.push(owned);
    this.lengthBytes = owned.length;
  }

  /**
   * Copies as many queued bytes as fit into `target[from..]` and removes them from the queue.
   * Returns the number of bytes copied.
   */
  takeInto(target: Uint8Array, from: number): number {
    let copied = 0;
    while (from + copied < target.length && this.lengthBytes > 0) {
      const first = this.chunks[0];
      assert(first !== undefined, 'queue length and chunks disagree');
      const available = first.length - this.headOffset;
      const count = Math.min(available, target.length - from - copied);
      if (count <= smallCopyBytesMax) {
        // A request header: a byte loop beats allocating the view that set() needs.
        const at = from + copied;
        for (let index = 0; index < count; index++) target[at + index] = first[this.headOffset + index] ?? 0;
      } else {
        target.set(first.subarray(this.headOffset, this.headOffset + count), from + copied);
      }
      this.consume(count);
      copied += count;
    }
    return copied;
  }

  /** Drops up to `count` bytes from the front; returns how many were dropped. */
  skip(count: number): number {
    const dropped = Math.min(count, this.lengthBytes);
    let remaining = dropped;
    while (remaining > 0) {
      const first = this.chunks[0];
      assert(first !== undefined, 'queue length and chunks disagree');
      const step = Math.min(remaining, first.length - this.headOffset);
      this.consume(step);
      remaining -= step;
    }
    return dropped;
  }

  /** Forgets everything queued (used once a connection stops reading its input). */
  clear(): void {
    this.chunks.length = 0;
    this.headOffset = 0;
    this.lengthBytes = 0;
  }

  private consume(count: number): void {
    const first = this.chunks[0];
    assert(first !== undefined, 'consume from an empty queue');
    assert(count <= first.length - this.headOffset, 'consume crosses a chunk');
    this.headOffset += count;
    this.lengthBytes -= count;
    if (this.headOffset === first.length) {
      this.chunks.shift();
      this.headOffset = 0;
    }
  }
}
