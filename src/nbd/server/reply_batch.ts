// ReplyBatch: the replies one connection produces in one event-loop turn, written to its socket
// together once the turn is over.
//
// Why: each socket.write costs far more in the stream machinery than copying 16 bytes, and a
// busy connection answers many requests per turn. So small replies (WRITE, FLUSH and TRIM
// acknowledgements, errors, handshake answers) are copied back to back into a staging buffer
// and leave as one buffer; large replies and pooled READ buffers are queued as they are; and
// the whole batch is handed to the socket corked, so the kernel gets it in one writev.
//
// Invariants:
// - Order is kept: replies reach the socket in the order they were queued. A large or pooled
//   entry first closes the staged run before it.
// - Nothing is written once the batch has ended (our side of the socket ended, or the socket is
//   gone): queued replies are dropped and later ones are ignored.
// - A pooled READ buffer goes back to the pool only from its write callback, without error, in
//   write order (buffer_pool.ts says why that is safe); after an error it is left to the GC.
// - At most one flush is scheduled at a time (setImmediate, after the turn's I/O callbacks);
//   the staging buffer is allocated once per connection and never handed to the socket.
// - Straight to the descriptor: when the socket is a plaintext one with nothing of its own
//   still queued, a batch is written with one writev system call on the socket's descriptor
//   instead of through the stream machinery (whose write costs a callback object, a nextTick
//   and a callback per batch: about 1 us of a 20 us QD1 round trip here, docs/performance.md).
//   The kernel has copied whatever writev accepted, so pooled buffers written in full go back
//   to the pool at once; the part it did not take (a full socket buffer) goes to the socket in
//   order, and so does everything when writev fails (the stream then reports the error). The
//   descriptor is read from the live handle at each flush, after the destroyed check, so a
//   closed socket's number (which the kernel may have reused) is never written to. A TLS
//   socket always goes through the stream, which encrypts.
// - A TLS socket gets writes of at most tlsWriteBytesMax, at most tlsWritesInFlightMax at a
//   time, the next from a completed one's callback. Why: node's TLS socket encrypts a write
//   whole before any of it leaves, and completes it only once all of its records are out;
//   writes that pile up behind it are joined (a copy) and encrypted whole again. With a turn's
//   1 MiB READ replies handed over at once, the server encrypted while the client waited, then
//   the client decrypted while the server waited: each side was half idle. Pieces of 128 KiB
//   let the client decrypt one while the server encrypts the next, and the second piece in
//   flight is encrypted as soon as the first is out, without waiting for a turn of the loop.
//   Replies keep their order (the queue is FIFO, and the stream keeps its writes in order); a
//   pooled buffer goes back to the pool after the write that carried its last byte.

import fs from 'node:fs';
import type net from 'node:net';
import tls from 'node:tls';
import { simpleReplyBytes } from '../protocol/constants.js';
import { type NbdRequest, writeSimpleReply } from '../protocol/transmission_server.js';
import type { BufferPool } from './buffer_pool.js';

/** Replies up to this size are copied into the staging buffer (see queue)... */
const stageReplyBytesMax = 512;
/** ...which holds this many bytes; a fuller turn closes a run and starts another. */
const stagingBytes = 64 * 1024;
/** Entries one writev may carry (Linux's IOV_MAX); a larger batch goes through the stream. */
const writevEntriesMax = 1024;
/** Most bytes handed to a TLS socket in one write (see the file comment)... */
const tlsWriteBytesMax = 128 * 1024;
/** ...and most such writes handed to it at once: one being encrypted and sent, one waiting behind it. */
const tlsWritesInFlightMax = 2;

interface HandleOwner {
  _handle?: { fd?: unknown } | null;
}

/** The server counter a batch adds to (connection.ts NbdCounters). */
export interface ReplyBatchCounters {
  replyBatchesTotal: number;
}

export class ReplyBatch {
  private readonly socket: net.Socket;
  private readonly buffers: BufferPool;
  private readonly counters: ReplyBatchCounters;
  /** Called after a batch was handed to the socket (not after one was dropped). */
  private readonly afterWrite: () => void;
  /** Our side of the socket has ended (or the socket is gone): nothing more may be written. */
  private writeEnded = false;

  /** Small replies of this turn, back to back (queue). */
  private readonly staged = new Uint8Array(stagingBytes);
  private stagedBytes = 0;
  /** Replies of this turn in order: closed staged runs, large replies, pooled READ buffers. */
  private readonly outbox: Uint8Array[] = [];
  /** Parallel to outbox: whether the entry is a pooled READ buffer to give back once written. */
  private readonly outboxPooled: boolean[] = [];
  private outboxBytes = 0;
  /** Pooled buffers handed to the socket, oldest first; their write callbacks come in this order. */
  private readonly written: Uint8Array[] = [];
  private flushScheduled = false;
  /** A plaintext socket, whose descriptor may be written directly (see the file comment). */
  private readonly plaintext: boolean;
  /** TLS only: flushed replies not yet handed to the socket, in order, each at most tlsWriteBytesMax. */
  private readonly tlsQueue: Uint8Array[] = [];
  /** Parallel to tlsQueue: the pooled buffer whose last byte the entry carries, else undefined. */
  private readonly tlsQueuePooled: (Uint8Array | undefined)[] = [];
  private tlsQueueBytes = 0;
  /** TLS only: per write in flight, oldest first, the pooled buffers it completes (at most tlsWritesInFlightMax). */
  private readonly tlsInFlight: Uint8Array[][] = [];
  private readonly tlsWrittenBound = (error: Error | null | undefined): void => {
    const completed = this.tlsInFlight.shift();
    if (error !== null && error !== undefined) {
      this.tlsInFlight.length = 0; // the socket is gone; buffers go to the GC
      return;
    }
    if (completed !== undefined) for (const buffer of completed) this.buffers.give(buffer);
    if (this.tlsQueue.length === 0) return;
    this.writeTls();
    this.afterWrite();
  };
  // Bound once per connection so that batching needs no per-reply closure.
  private readonly flushBound = (): void => {
    this.flushScheduled = false;
    this.flush();
  };
  private readonly writtenBound = (error: Error | null | undefined): void => {
    const buffer = this.written.shift();
    // After an error the socket is gone; the buffer is simply left to the GC.
    if (buffer !== undefined && (error === null || error === undefined)) this.buffers.give(buffer);
  };

  constructor(socket: net.Socket, buffers: BufferPool, counters: ReplyBatchCounters, afterWrite: () => void) {
    this.socket = socket;
    this.plaintext = !(socket instanceof tls.TLSSocket);
    this.buffers = buffers;
    this.counters = counters;
    this.afterWrite = afterWrite;
  }

  /** True once end() was called: nothing more is written. */
  get ended(): boolean {
    return this.writeEnded;
  }

  /** Reply bytes queued and not yet handed to the socket (this turn's, and a TLS socket's queue). */
  get queuedBytes(): number {
    return this.outboxBytes + this.tlsQueueBytes;
  }

  /**
   * Adds a reply to this turn's batch; the batch is written once, after the turn. Small
   * replies are copied into the staging buffer, so a turn's acknowledgements leave as one
   * buffer. `pooled`: a READ buffer from the pool, given back once the socket has written it.
   */
  queue(bytes: Uint8Array, pooled = false): void {
    if (this.writeEnded) return;
    if (!pooled && bytes.length <= stageReplyBytesMax) {
      this.stage(bytes.length).set(bytes, this.stagedBytes);
      this.stagedBytes += bytes.length;
    } else {
      this.closeStaged();
      this.outbox.push(bytes);
      this.outboxPooled.push(pooled);
    }
    this.outboxBytes += bytes.length;
    this.scheduleFlush();
  }

  /** queue() for a simple reply, encoded straight into the staging buffer. */
  queueSimpleReply(errno: number, request: NbdRequest): void {
    if (this.writeEnded) return;
    writeSimpleReply(this.stage(simpleReplyBytes), this.stagedBytes, errno, request);
    this.stagedBytes += simpleReplyBytes;
    this.outboxBytes += simpleReplyBytes;
    this.scheduleFlush();
  }

  /**
   * Hands everything queued to the socket now (or drops it when nothing may be written); a
   * TLS socket gets it one write at a time (see the file comment), unless `whole` asks for
   * everything at once (the last flush before our side ends).
   */
  flush(whole = false): void {
    this.closeStaged();
    const count = this.outbox.length;
    if (count === 0 && !(whole && this.tlsQueue.length > 0)) return;
    if (this.writeEnded || this.socket.destroyed) {
      this.dropOutbox();
      return;
    }
    if (count > 0) this.counters.replyBatchesTotal += 1;
    if (!this.plaintext) {
      this.enqueueTls(count);
      this.dropOutbox();
      if (whole) this.writeTlsWhole();
      else this.writeTls();
      this.afterWrite();
      return;
    }
    if (this.writeDirect(count)) {
      this.dropOutbox();
      this.afterWrite();
      return;
    }
    // Corked writes are handed to the kernel together (one writev) on uncork.
    if (count > 1) this.socket.cork();
    for (let index = 0; index < count; index++) {
      const bytes = this.outbox[index] as Uint8Array;
      if (this.outboxPooled[index] === true) {
        this.written.push(bytes);
        this.socket.write(bytes, this.writtenBound);
      } else {
        this.socket.write(bytes);
      }
    }
    if (count > 1) this.socket.uncork();
    this.dropOutbox();
    this.afterWrite();
  }

  /** Moves the outbox's `count` entries to the TLS queue, cut into pieces of at most tlsWriteBytesMax. */
  private enqueueTls(count: number): void {
    for (let index = 0; index < count; index++) {
      const bytes = this.outbox[index] as Uint8Array;
      const pooled = this.outboxPooled[index] === true;
      for (let at = 0; at < bytes.length; at += tlsWriteBytesMax) {
        const end = Math.min(bytes.length, at + tlsWriteBytesMax);
        this.tlsQueue.push(at === 0 && end === bytes.length ? bytes : bytes.subarray(at, end));
        this.tlsQueuePooled.push(pooled && end === bytes.length ? bytes : undefined);
      }
      this.tlsQueueBytes += bytes.length;
    }
  }

  /**
   * Hands the TLS socket its next write: the queue's first entries up to tlsWriteBytesMax
   * (at least one), joined by a cork when there are several (small replies).
   */
  private writeTls(): void {
    while (this.tlsQueue.length > 0 && this.tlsInFlight.length < tlsWritesInFlightMax) this.writeTlsPiece();
  }

  private writeTlsPiece(): void {
    let take = 1;
    let takeBytes = (this.tlsQueue[0] as Uint8Array).length;
    while (take < this.tlsQueue.length) {
      const next = (this.tlsQueue[take] as Uint8Array).length;
      if (takeBytes + next > tlsWriteBytesMax) break;
      takeBytes += next;
      take++;
    }
    const completed: Uint8Array[] = [];
    if (take > 1) this.socket.cork();
    for (let index = 0; index < take; index++) {
      const pooled = this.tlsQueuePooled[index];
      if (pooled !== undefined) completed.push(pooled);
      if (index === take - 1) this.socket.write(this.tlsQueue[index] as Uint8Array, this.tlsWrittenBound);
      else this.socket.write(this.tlsQueue[index] as Uint8Array);
    }
    if (take > 1) this.socket.uncork();
    this.tlsInFlight.push(completed);
    this.dequeueTls(take, takeBytes);
  }

  /**
   * Hands the whole TLS queue to the socket in one go, after any write in flight (the stream
   * keeps the order). Its pooled buffers are left to the GC: this is the last flush.
   */
  private writeTlsWhole(): void {
    const take = this.tlsQueue.length;
    if (take === 0) return;
    this.socket.cork();
    for (let index = 0; index < take; index++) this.socket.write(this.tlsQueue[index] as Uint8Array);
    this.socket.uncork();
    this.dequeueTls(take, this.tlsQueueBytes);
  }

  private dequeueTls(take: number, takeBytes: number): void {
    this.tlsQueue.splice(0, take);
    this.tlsQueuePooled.splice(0, take);
    this.tlsQueueBytes -= takeBytes;
  }

  /** The socket's descriptor when the batch may be written to it directly, else undefined. */
  private directFd(count: number): number | undefined {
    if (!this.plaintext || count > writevEntriesMax || this.socket.writableLength > 0) return undefined;
    const fd = (this.socket as unknown as HandleOwner)._handle?.fd;
    return typeof fd === 'number' && fd >= 0 ? fd : undefined;
  }

  /**
   * Writes the outbox's `count` entries to the descriptor with one writev; what the kernel did
   * not take goes to the socket in order. False (nothing written) when the descriptor may not be
   * used or writev failed: the caller then hands the whole batch to the stream.
   */
  private writeDirect(count: number): boolean {
    const fd = this.directFd(count);
    if (fd === undefined) return false;
    let done: number;
    try {
      done = count === 1 ? fs.writeSync(fd, this.outbox[0] as Uint8Array) : fs.writevSync(fd, this.outbox);
    } catch {
      return false;
    }
    for (let index = 0; index < count; index++) {
      const bytes = this.outbox[index] as Uint8Array;
      const pooled = this.outboxPooled[index] === true;
      if (done >= bytes.length) {
        done -= bytes.length;
        if (pooled) this.buffers.give(bytes);
        continue;
      }
      // The socket buffer is full: the rest waits in the stream, which keeps the order.
      const rest = done === 0 ? bytes : bytes.subarray(done);
      done = 0;
      if (pooled) {
        this.written.push(bytes);
        this.socket.write(rest, this.writtenBound);
      } else {
        this.socket.write(rest);
      }
    }
    return true;
  }

  /** Our side has ended or the socket is gone: drops what is queued; nothing more is written. */
  end(): void {
    this.writeEnded = true;
    this.dropOutbox();
    this.tlsQueue.length = 0;
    this.tlsQueuePooled.length = 0;
    this.tlsQueueBytes = 0;
  }

  /** The staging buffer, with room for `lengthBytes` more at stagedBytes. */
  private stage(lengthBytes: number): Uint8Array {
    if (this.stagedBytes + lengthBytes > this.staged.length) this.closeStaged();
    return this.staged;
  }

  /** Moves the staged run into the outbox as a buffer of its own (the socket may keep it). */
  private closeStaged(): void {
    const length = this.stagedBytes;
    if (length === 0) return;
    const run = Buffer.allocUnsafe(length);
    run.set(this.staged.subarray(0, length));
    this.outbox.push(run);
    this.outboxPooled.push(false);
    this.stagedBytes = 0;
  }

  private scheduleFlush(): void {
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(this.flushBound);
    }
  }

  private dropOutbox(): void {
    this.outbox.length = 0;
    this.outboxPooled.length = 0;
    this.outboxBytes = 0;
    this.stagedBytes = 0;
  }
}
