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

  /** Reply bytes queued in this turn and not yet handed to the socket. */
  get queuedBytes(): number {
    return this.outboxBytes;
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

  /** Hands everything queued to the socket now (or drops it when nothing may be written). */
  flush(): void {
    this.closeStaged();
    const count = this.outbox.length;
    if (count === 0) return;
    if (this.writeEnded || this.socket.destroyed) {
      this.dropOutbox();
      return;
    }
    this.counters.replyBatchesTotal += 1;
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
