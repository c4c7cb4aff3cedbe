// One client connection: drives the handshake codec, then decodes requests, dispatches them to
// the Export it negotiated concurrently, and sends replies in batches (reply_batch.ts). The
// Export is resolved once, when the handshake ends (export_catalog.ts); requests never look it up.
//
// Life of a connection: greeting -> handshake (bounded by a time limit; it may include a TLS
// upgrade, after which it starts again inside TLS) -> transmission ->
// ending (no more requests are read; in-flight requests finish and get their replies; then our
// side is closed) -> closed (socket gone; in-flight Export calls still settle, their replies
// are dropped) -> finished (closed and nothing in flight; the server forgets it).
//
// Invariants:
// - Nothing is written after the socket closed or after our side ended; 'error' is always
//   handled, so a client that vanishes mid-reply cannot crash the process.
// - Requests are dispatched as soon as they are decoded; replies go out in completion order,
//   in one socket write per event-loop turn (ReplyBatch), or per read when it left none in flight.
// - The socket is read into one buffer reused for every read (socket_input.ts); whatever a
//   read leaves queued is copied out (ByteQueue.own) before the next one. WRITE payloads are
//   copied into buffers from the server's pool, which go back to it when the WRITE succeeds.
//   After a TLS upgrade the TLS socket is read the documented way ('data', a fresh buffer per
//   read): node offers no reused buffer for a TLS socket wrapped around a connected one, and
//   decryption costs more than that allocation anyway. A plaintext connection is unchanged.
// - STARTTLS (the codec's "starttls" verdict): reading stops at once, the ACK is handed to the
//   plaintext socket before anything else, and only then does the TLS handshake start
//   (tls.ts); not a byte more is read in plaintext. The handshake time limit runs through the
//   upgrade. A failed upgrade is reported to the host (which logs it) and closes this
//   connection only.
// - READ reply buffers come from the same pool and go back to it only after the socket has
//   written them out, in write order (buffer_pool.ts says why that is safe).
// - Memory per connection is bounded: reading pauses while in-flight requests, in-flight
//   bytes (READ buffers, WRITE payloads) or unsent reply bytes exceed their limits, so at most
//   inFlightBytesMax + maxPayloadBytes is held by requests, plus one partially received WRITE
//   payload (<= maxPayloadBytes), plus replyBacklogBytesMax of replies, plus the read buffer
//   and what one read left queued. A large READ (256 KiB or more) on a plaintext socket waits,
//   decoded, while 1 MiB of replies is unsent: reading further ahead only lets its data go
//   cold before the socket takes it (largeReadWaits).
// - An Export failure that is a PcacheError becomes an NBD error reply (nbdErrnoOf); anything
//   else is a programmer error and is rethrown outside every handler, crashing the process.
// - With an observer (observer.ts: the export's own, else the server's) every answered request
//   is reported once, with numbers only; without one, no clock is read and nothing is called.
// - Handed off (the export chosen is served elsewhere, export_catalog.ts): at the end of
//   negotiation reading stops at once, the last handshake reply is handed to the socket, and
//   once the socket has written everything the connection lets go of it (no listener of ours
//   is left on it) and gives it, the terms and the bytes read past the handshake to the
//   export's handOff; for the server it is then finished. An adopted connection (the other
//   side: NbdServer.adopt) starts in transmission with those terms and bytes, as if it had
//   negotiated them itself.

import type net from 'node:net';
import type tls from 'node:tls';
import { assert } from '../../lib/assert.js';
import { PcacheError } from '../../lib/errors.js';
import { ByteQueue } from '../protocol/bytes.js';
import type { BlockStatusExtent } from '../protocol/command_types.js';
import { Command, NbdErrno, TransmissionFlag } from '../protocol/constants.js';
import { nbdErrnoOf } from '../protocol/errno.js';
import { Handshake, type HandshakeConfig, type Negotiated } from '../protocol/handshake_server.js';
import {
  blockStatusChunk,
  errorReply,
  type NbdRequest,
  noneChunk,
  readReplyPrefixBytes,
  RequestDecoder,
  type TransmissionContext,
  writeReadReplyPrefix,
} from '../protocol/transmission_server.js';
import type { BufferPool } from './buffer_pool.js';
import type { BusyPoll } from './busy_poll.js';
import type { ConnectionLimits, NbdCounters } from './connection_limits.js';
import type { Export } from './export.js';
import type { HandedOffTerms, ServedExport } from './export_catalog.js';
import type { NbdRequestObserver } from './observer.js';
import { ReplyBatch } from './reply_batch.js';
import { costBytes, invokeExport, isThenable, settle } from './export_call.js';
import { startReading } from './socket_input.js';
import type { NbdTlsFailure, ServerTls, TlsUpgradeResult } from './tls.js';

/** What a connection needs from its server. */
export interface ConnectionHost {
  readonly handshakeConfig: HandshakeConfig<ServedExport>;
  readonly limits: ConnectionLimits;
  readonly counters: NbdCounters;
  readonly shuttingDown: boolean;
  /** Where READ reply buffers and WRITE payload buffers come from and go back to. */
  readonly buffers: BufferPool;
  /** Told about input and about connections going idle (busy_poll.ts). */
  readonly busyPoll: BusyPoll;
  /** Told about every answered request, when metrics are on (observer.ts); undefined costs nothing. */
  readonly observer: NbdRequestObserver | undefined;
  /** The TLS credentials and mode, when the server offers TLS (the handshake config says the mode too). */
  readonly tls: ServerTls | undefined;
  /** Called once, when the socket has closed and no Export call is in flight. */
  connectionFinished(connection: Connection): void;
  /** A TLS handshake failed (the connection is closing). */
  tlsFailed(failure: NbdTlsFailure): void;
}

type Phase = 'handshake' | 'transmission';

/** A READ at least this long is a large read (Connection.largeReadWaits)... */
const largeReadBytesMin = 256 * 1024;
/** ...which is dispatched only while fewer reply bytes than this wait to be sent. */
const largeReadBacklogBytesMax = 1024 * 1024;

/** A connection negotiated elsewhere: the export it chose here, the terms, the bytes already read. */
export interface AdoptedTerms {
  readonly served: ServedExport;
  readonly terms: HandedOffTerms;
  readonly leftover: Uint8Array;
}

let clientsNumbered = 0;
/** Numbers connections 1, 2, ... (past 2^53 it would repeat; no process lives that long). */
const nextClientId = (): number => (clientsNumbered += 1);

export class Connection {
  /** The plaintext socket, then the TLS socket once STARTTLS has succeeded. */
  private socket: net.Socket;
  private readonly host: ConnectionHost;
  /** The negotiated export and its catalog name; undefined until transmission. */
  private exp: Export | undefined;
  private servedName: string | undefined;
  /** Chosen with the export: its own observer, else the server's. */
  private observer: NbdRequestObserver | undefined;
  private phase: Phase = 'handshake';
  private handshake: Handshake<ServedExport> | undefined;
  private readonly input: ByteQueue;
  private decoder: RequestDecoder | undefined;
  private context: TransmissionContext | undefined;
  private structuredReplies = false;
  private contextId = 0;

  private inFlightCount = 0;
  /** Requests dispatched since in-flight work last dropped to nothing (busy_poll.ts). */
  private busyRequests = 0;
  private inFlightBytes = 0;
  private readPaused = false;
  /** A large READ decoded and held back until the reply backlog falls (largeReadWaits). */
  private heldRead: NbdRequest | undefined;
  /** Large READs wait for the reply backlog (a plaintext socket; a TLS one is not measured yet). */
  private largeReadsPaced = true;
  private pumping = false;
  /** No further requests are read: DISC, client EOF, broken framing, or our side ended. */
  private inputEnded = false;
  private socketClosed = false;
  private finishedReported = false;

  /** This turn's replies; it also knows whether anything may still be written. Replaced at a TLS upgrade. */
  private replies: ReplyBatch;
  private handshakeTimer: NodeJS.Timeout | undefined;
  private handshakeTimedOut = false;
  private graceTimer: NodeJS.Timeout | undefined;
  // Bound once per connection so that decoding needs no per-request closure.
  private readonly takePayload = (lengthBytes: number): Uint8Array => this.host.buffers.take(lengthBytes);
  /** Bytes arrive in a buffer reused by the next read (socket_input.ts); never after a TLS upgrade. */
  private inputReused: boolean;
  /** Who the client is, for TLS failure reports. */
  private readonly peer: string;
  private readonly onEnd = (): void => { this.stopReading(); };
  private readonly onDrain = (): void => { this.maybeResume(); };
  private readonly onCloseBound = (): void => { this.onClose(); };
  private readonly onSecureData = (chunk: Buffer): void => { this.onData(chunk); };
  private readonly onSocketError = (): void => { this.socket.destroy(); };
  /** This connection's number, unique while the process runs: the Export's `client`. */
  private readonly clientId = nextClientId();
  /** Settles when the socket has closed and no Export call is in flight (the host is told then too). */
  readonly finished: Promise<void>;
  private resolveFinished: (() => void) | undefined;

  /** `adopted`: the connection was negotiated elsewhere and starts in transmission (NbdServer.adopt). */
  constructor(accepted: net.Socket, host: ConnectionHost, adopted?: AdoptedTerms) {
    const { socket, reused, buffered } = startReading(accepted, (bytes) => { this.onData(bytes); });
    this.socket = socket;
    this.inputReused = reused;
    this.host = host;
    this.finished = new Promise((resolve) => { this.resolveFinished = resolve; });
    this.replies = new ReplyBatch(socket, host.buffers, host.counters, () => { this.afterReplies(); });
    this.peer = socket.remoteAddress === undefined ? 'unix socket' : `${socket.remoteAddress}:${socket.remotePort ?? 0}`;
    host.counters.connectionsTotal += 1;
    this.listen(socket);
    if (adopted !== undefined) {
      this.handshake = undefined;
      this.input = new ByteQueue();
      const { served, terms } = adopted;
      this.enterTransmission({
        export: served,
        sizeBytes: terms.sizeBytes,
        transmissionFlags: terms.transmissionFlags,
        structuredReplies: terms.structuredReplies,
        baseAllocationContextId: terms.baseAllocationContextId,
      });
      this.input.push(new Uint8Array(adopted.leftover)); // a copy (a Buffer's slice() would be a view)
      for (const chunk of buffered) this.input.push(chunk);
      this.pump();
      if (this.inFlightCount === 0) this.replies.flush();
      return;
    }
    this.handshake = new Handshake(host.handshakeConfig);
    this.input = this.handshake.input;
    this.handshakeTimer = setTimeout(() => { this.onHandshakeTimeout(); }, host.limits.handshakeTimeoutMs);
    this.replies.queue(this.handshake.greeting());
  }

  private listen(socket: net.Socket): void {
    socket.on('end', this.onEnd);
    socket.on('drain', this.onDrain);
    // Errors (ECONNRESET, EPIPE, a TLS record that fails) are expected from hostile or vanished
    // clients. node destroys a plain socket that failed, but not a TLS socket whose session
    // failed after its handshake: destroying it here makes 'close' follow every error.
    socket.on('error', this.onSocketError);
    socket.on('close', this.onCloseBound);
  }

  private unlisten(socket: net.Socket): void {
    socket.off('end', this.onEnd);
    socket.off('drain', this.onDrain);
    socket.off('error', this.onSocketError);
    socket.off('close', this.onCloseBound);
    socket.off('data', this.onSecureData);
  }

  /** The catalog name of the export being served; undefined while negotiating. */
  get exportName(): string | undefined {
    return this.servedName;
  }

  /** Server shutdown: refuse new work, finish in-flight work, then close. */
  beginShutdown(): void {
    if (this.socketClosed) return;
    if (this.phase === 'handshake') {
      // No state and no work yet: a hard disconnect loses nothing.
      this.socket.destroy();
      return;
    }
    assert(this.context !== undefined, 'transmission phase without a context');
    this.context.shuttingDown = true;
    this.maybeFinish();
  }

  /** Forced close after the shutdown time limit. In-flight Export calls still settle. */
  destroy(): void {
    this.socket.destroy();
  }

  private onData(chunk: Uint8Array): void {
    this.host.busyPoll.noteInput();
    if (this.inputEnded) return;
    if (this.phase === 'transmission') {
      this.input.push(chunk);
      this.pump();
      // All answered (read hits complete synchronously): send now, not after the turn's other
      // callbacks (at QD1 the client waits for it); with requests in flight, batch per turn.
      if (this.inFlightCount === 0) this.replies.flush();
      // The next read reuses the buffer: keep what this one left (usually nothing, or part
      // of a request header; everything queued while reading is paused).
      if (this.inputReused) this.input.own();
      return;
    }
    const handshake = this.handshake;
    assert(handshake !== undefined, 'handshake phase without a handshake');
    const replies: Uint8Array[] = [];
    // Negotiation is a few small messages: a copy keeps the handshake codec free of the rule.
    const verdict = handshake.push(this.inputReused ? chunk.slice() : chunk, replies);
    for (const reply of replies) this.replies.queue(reply);
    switch (verdict.kind) {
      case 'negotiating':
        return;
      case 'transmission':
        this.enterTransmission(verdict.negotiated);
        this.pump();
        return;
      case 'starttls':
        this.startTls();
        return;
      case 'closed':
        // ABORT, an unknown export for EXPORT_NAME, or a broken rule: send what was produced
        // (the ABORT ack, for one) and close.
        if (verdict.violation) this.host.counters.protocolViolationsTotal += 1;
        this.stopReading();
        return;
    }
  }

  /** STARTTLS was acknowledged: send the ACK in plaintext, then run the TLS handshake (tls.ts). */
  private startTls(): void {
    const serverTls = this.host.tls;
    assert(serverTls !== undefined, 'STARTTLS acknowledged by a server without TLS');
    // Not a byte more in plaintext: the client's next bytes are its TLS ClientHello, and they
    // belong to the TLS layer, which reads the socket's handle from now on.
    this.socket.pause();
    this.replies.flush();
    assert(this.replies.queuedBytes === 0, 'replies left behind the STARTTLS acknowledgement');
    serverTls.upgrade(this.socket, (result) => { this.tlsUpgraded(result); });
  }

  private tlsUpgraded(result: TlsUpgradeResult): void {
    if (!result.ok) {
      this.host.counters.tlsFailuresTotal += 1;
      // A handshake cut short by our own shutdown is not the client's failure.
      if (!this.host.shuttingDown) {
        this.host.tlsFailed({ peer: this.peer, reason: this.handshakeTimedOut ? 'the TLS handshake did not finish within the handshake time limit' : result.reason });
      }
      // tls.ts destroyed the plaintext socket; its 'close' finishes this connection.
      return;
    }
    const secure: tls.TLSSocket = result.socket;
    if (this.socketClosed || this.handshake === undefined) {
      // Shut down or timed out while the handshake ran.
      secure.destroy();
      return;
    }
    this.host.counters.tlsSessionsTotal += 1;
    const plain = this.socket;
    plain.off('end', this.onEnd);
    plain.off('drain', this.onDrain);
    plain.off('close', this.onCloseBound);
    plain.off('error', this.onSocketError);
    // The plaintext socket stays with the TLS one: its errors are the TLS socket's too.
    plain.on('error', () => { plain.destroy(); });
    // node closes the TLS socket when the plaintext one closes, and the reverse: from now on
    // the TLS socket is the connection.
    this.socket = secure;
    this.inputReused = false;
    this.largeReadsPaced = false;
    this.replies.end();
    this.replies = new ReplyBatch(secure, this.host.buffers, this.host.counters, () => { this.afterReplies(); });
    this.listen(secure);
    this.handshake.tlsStarted();
    secure.on('data', this.onSecureData);
  }

  private enterTransmission(negotiated: Negotiated<ServedExport>): void {
    if (negotiated.export.handOff !== undefined) {
      this.handOff(negotiated);
      return;
    }
    this.exp = negotiated.export.target;
    this.servedName = negotiated.export.name;
    this.observer = negotiated.export.observer ?? this.host.observer;
    clearTimeout(this.handshakeTimer);
    this.handshakeTimer = undefined;
    this.phase = 'transmission';
    this.handshake = undefined;
    this.structuredReplies = negotiated.structuredReplies;
    this.contextId = negotiated.baseAllocationContextId ?? 0;
    this.context = {
      sizeBytes: negotiated.sizeBytes,
      readOnly: (negotiated.transmissionFlags & TransmissionFlag.readOnly) !== 0,
      structuredReplies: negotiated.structuredReplies,
      baseAllocationContextId: negotiated.baseAllocationContextId,
      shuttingDown: this.host.shuttingDown,
    };
    this.decoder = new RequestDecoder(this.input, this.context, this.takePayload);
  }

  /**
   * The export chosen is served elsewhere: stop reading, let the last handshake reply reach
   * the socket, then give the socket away (see the file comment).
   */
  private handOff(negotiated: Negotiated<ServedExport>): void {
    const handOff = negotiated.export.handOff;
    assert(handOff !== undefined, 'handOff without a handOff');
    clearTimeout(this.handshakeTimer);
    this.handshakeTimer = undefined;
    this.handshake = undefined;
    // Not a byte more is read here: what the client sends next belongs to the new owner.
    this.socket.pause();
    this.inputEnded = true;
    this.replies.flush(true);
    assert(this.replies.queuedBytes === 0, 'replies left behind the end of negotiation');
    this.replies.end();
    const leftover = new Uint8Array(this.input.length);
    this.input.takeInto(leftover, 0);
    const terms: HandedOffTerms = {
      exportName: negotiated.export.name,
      sizeBytes: negotiated.sizeBytes,
      transmissionFlags: negotiated.transmissionFlags,
      structuredReplies: negotiated.structuredReplies,
      baseAllocationContextId: negotiated.baseAllocationContextId,
    };
    const socket = this.socket;
    const give = (): void => {
      if (this.socketClosed || socket.destroyed) return;
      this.unlisten(socket);
      this.socketClosed = true;
      this.maybeFinish();
      handOff(socket, terms, leftover);
    };
    // The GO reply must reach the socket before the socket leaves: a plaintext one has almost
    // always written it at once (writev took it); otherwise (TLS encrypts on its own schedule)
    // an empty write's callback comes once everything before it is written.
    if (socket.writableLength === 0) give();
    else socket.write(new Uint8Array(0), give);
  }

  /** Decodes and dispatches queued requests until the input runs dry or a limit is reached. */
  private pump(): void {
    const decoder = this.decoder;
    if (this.pumping || decoder === undefined) return;
    this.pumping = true;
    while (!this.inputEnded) {
      if (this.overLimit()) {
        this.pauseReading();
        break;
      }
      let request = this.heldRead;
      this.heldRead = undefined;
      try {
        request ??= decoder.next();
      } catch (error) {
        if (!(error instanceof PcacheError)) throw error;
        // Bad request magic: framing is lost, so this client is cut off; nobody else is.
        this.host.counters.protocolViolationsTotal += 1;
        this.stopReading();
        break;
      }
      if (request === undefined) break;
      if (this.largeReadWaits(request)) {
        this.heldRead = request;
        this.pauseReading();
        break;
      }
      this.dispatch(request);
    }
    this.pumping = false;
  }

  private dispatch(request: NbdRequest): void {
    this.host.counters.requestsTotal += 1;
    if (request.type === Command.disc) {
      // Finish what is outstanding, then close; anything after DISC is ignored.
      this.stopReading();
      return;
    }
    const problem = request.problem;
    const observer = this.observer;
    if (problem !== undefined) {
      this.host.counters.requestErrorsTotal += 1;
      this.replies.queue(errorReply(request, problem.errno, problem.message, this.structuredReplies));
      observer?.requestAnswered(request.type, request.lengthBytes, 0, true);
      return;
    }
    if (observer !== undefined) request.dispatchedMs = performance.now();
    if (request.lengthBytes === 0 && request.type !== Command.flush) {
      // Zero-length READ/WRITE/TRIM/WRITE_ZEROES/CACHE: nothing to do, and no Export method is
      // asked to handle an empty range (BLOCK_STATUS of zero bytes was refused above).
      if (request.type === Command.read && this.structuredReplies) this.replies.queue(noneChunk(request));
      else this.replies.queueSimpleReply(NbdErrno.ok, request);
      observer?.requestAnswered(request.type, 0, 0, false);
      return;
    }

    let readBuffer: Uint8Array | undefined;
    if (request.type === Command.read) {
      // One buffer for the reply prefix and the data: the Export reads straight into it and the
      // data is never copied again. Reused from the pool (not zeroed: see buffer_pool.ts).
      readBuffer = this.host.buffers.take(readReplyPrefixBytes(this.structuredReplies) + request.lengthBytes);
    }
    this.inFlightCount += 1;
    this.busyRequests += 1;
    this.inFlightBytes += costBytes(request);

    let result: unknown;
    try {
      assert(this.exp !== undefined, 'request before an export was negotiated');
      result = invokeExport(this.exp, request, readBuffer, this.clientId);
    } catch (error) {
      if (!(error instanceof PcacheError)) throw error;
      this.complete(request, undefined, error, readBuffer);
      return;
    }
    if (isThenable(result)) {
      void settle(this, request, result, readBuffer);
    } else {
      // Completed synchronously: reply without a promise round trip.
      this.complete(request, result, undefined, readBuffer);
    }
  }

  /** Records the outcome of a request and queues its reply (unless the client is gone). */
  complete(request: NbdRequest, value: unknown, error: PcacheError | undefined, readBuffer: Uint8Array | undefined): void {
    assert(this.inFlightCount > 0, 'completion without a request in flight');
    this.inFlightCount -= 1;
    this.inFlightBytes -= costBytes(request);
    if (error !== undefined) {
      this.host.counters.requestErrorsTotal += 1;
      this.replies.queue(errorReply(request, nbdErrnoOf(error.code), error.message, this.structuredReplies));
    } else if (request.type === Command.read) {
      assert(readBuffer !== undefined, 'READ completed without its buffer');
      writeReadReplyPrefix(readBuffer, request, this.structuredReplies);
      this.replies.queue(readBuffer, true);
    } else if (request.type === Command.blockStatus) {
      assert(Array.isArray(value), 'blockStatus must return an array of extents');
      this.replies.queue(blockStatusChunk(request, this.contextId, value as BlockStatusExtent[]));
    } else {
      // The Export is done with a successful WRITE's payload (export.ts): reuse it. After a
      // failure it is left to the GC, as an asynchronous device might still read from it.
      if (request.payload !== undefined && request.payload.length > 0) this.host.buffers.give(request.payload);
      this.replies.queueSimpleReply(NbdErrno.ok, request);
    }
    this.observer?.requestAnswered(request.type, request.lengthBytes, performance.now() - request.dispatchedMs, error !== undefined);
    this.maybeResume();
    this.maybeFinish();
  }

  private overLimit(): boolean {
    const limits = this.host.limits;
    return this.inFlightCount >= limits.inFlightRequestsMax ||
      this.inFlightBytes >= limits.inFlightBytesMax ||
      this.replyBacklogFull();
  }

  /**
   * Too many reply bytes wait for the client. Counted only where something is sure to call
   * maybeResume later: the batch's scheduled flush (afterReplies), or the 'drain' the socket
   * owes us.
   */
  private replyBacklogFull(): boolean {
    return this.replyBacklogAtLeast(this.host.limits.replyBacklogBytesMax);
  }

  private replyBacklogAtLeast(limit: number): boolean {
    if (this.replies.queuedBytes >= limit) return true;
    return this.socket.writableNeedDrain && this.socket.writableLength >= limit;
  }

  /**
   * A large READ waits while largeReadBacklogBytesMax of replies are unsent. Why: reading a
   * large reply's data long before the socket can take it only makes it cold in the CPU's
   * caches by the time it is copied out. With the 16 MiB backlog alone, 1 MiB reads at queue
   * depth 8 read eight replies ahead and ran at 0.8x the speed of depth 2; held back to about
   * one reply ahead they ran 1.2-1.45x faster (docs/performance.md, "Large reads held back").
   * Only large reads wait: a turn of small replies (32 reads of 64 KiB) split in two by a
   * pause cost 8-10% (same section). The same triggers as replyBacklogFull resume reading.
   */
  private largeReadWaits(request: NbdRequest): boolean {
    return this.largeReadsPaced && request.type === Command.read && request.problem === undefined &&
      request.lengthBytes >= largeReadBytesMin && this.replyBacklogAtLeast(largeReadBacklogBytesMax);
  }

  private pauseReading(): void {
    if (this.readPaused) return;
    this.readPaused = true;
    this.host.counters.readPausesTotal += 1;
    this.socket.pause();
  }

  private maybeResume(): void {
    if (!this.readPaused || this.inputEnded || this.overLimit()) return;
    if (this.heldRead !== undefined && this.largeReadWaits(this.heldRead)) return;
    this.readPaused = false;
    this.socket.resume();
    // Requests may already be queued from before the pause; serve them without waiting for data.
    this.pump();
  }

  /** Stops reading requests; what is in flight still completes. */
  private stopReading(): void {
    if (!this.inputEnded) {
      this.inputEnded = true;
      this.input.clear();
      this.heldRead = undefined;
      // Keep the socket flowing so that whatever the client still sends is read and dropped
      // rather than left unread in the kernel (which would turn our close into a reset).
      this.readPaused = false;
      if (!this.socketClosed) this.socket.resume();
    }
    this.maybeFinish();
  }

  /** Ends our side once nothing is in flight and no more requests will be served. */
  private maybeFinish(): void {
    if (this.inFlightCount > 0) return;
    if (this.socketClosed) {
      if (!this.finishedReported) {
        this.finishedReported = true;
        this.host.connectionFinished(this);
        this.resolveFinished?.();
      }
      return;
    }
    if (this.inputEnded || this.context?.shuttingDown === true) this.endGracefully();
  }

  private endGracefully(): void {
    if (this.replies.ended) return;
    clearTimeout(this.handshakeTimer);
    this.inputEnded = true;
    this.input.clear();
    this.heldRead = undefined;
    this.replies.flush(true);
    this.replies.end();
    this.socket.end();
    this.graceTimer = setTimeout(() => { this.socket.destroy(); }, this.host.limits.closeGraceMs);
  }

  private onHandshakeTimeout(): void {
    this.handshakeTimer = undefined;
    this.handshakeTimedOut = true;
    this.host.counters.protocolViolationsTotal += 1;
    this.socket.destroy();
  }

  private onClose(): void {
    if (this.socketClosed) return;
    this.socketClosed = true;
    this.inputEnded = true;
    this.input.clear();
    this.replies.end();
    clearTimeout(this.handshakeTimer);
    clearTimeout(this.graceTimer);
    this.maybeFinish();
  }

  /** After a batch of replies went to the socket (reply_batch.ts). */
  private afterReplies(): void {
    // Everything asked has been answered: the client's next request may be close behind.
    if (this.inFlightCount === 0 && this.phase === 'transmission') {
      this.host.busyPoll.idle(this.busyRequests);
      this.busyRequests = 0;
    }
    // Reading may have paused on the batch; the socket's own backlog takes over from here.
    this.maybeResume();
  }
}
