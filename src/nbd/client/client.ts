// NbdClient: one NBD client connection — connect, negotiate, then many requests in flight.
//
// Life of a connection: connecting (TCP or Unix socket, then the handshake, both under one
// time limit: connect.ts) -> open (requests are split, sent with cookies, answered in any
// order; request_table.ts keeps the books) -> closing (disconnect(): no new requests; in-flight
// ones finish; then NBD_CMD_DISC and our side ends) -> closed. The `closed` promise resolves
// once, with the reason, whichever way the connection ended.
//
// Invariants:
// - Every failure is a PcacheError. Server error replies map through pcacheCodeOfNbdErrno.
//   A connection that drops, times out, or receives a malformed reply fails every request in
//   flight or queued, and every later one, with 'ENODEV' at once: nothing waits on a dead
//   socket, and the process never crashes on what a server sends.
// - Requests are split to the server's maximum payload (at most 32 MiB) for READ/WRITE and to
//   zeroRequestMaxBytes for TRIM/WRITE_ZEROES; a logical request settles only after all of its
//   pieces have, so no late piece writes into a buffer its caller has been given back.
// - In flight per connection: at most inFlightRequestsMax pieces and inFlightBytesMax bytes of
//   READ/WRITE data (a single piece is always admitted when nothing else is in flight); the
//   rest waits in a FIFO of at most queuedRequestsMax pieces, beyond which requests fail.
//   RequestTable admits and queues; this class sends what it admits.
// - Cookies are u32 values unique among the pieces in flight; a READ's data is copied from the
//   socket straight into its caller's buffer, never into one sized by the wire.
// - Requests issued in one event-loop turn leave in one socket write (cork, uncork next tick).

import type net from 'node:net';
import { assert } from '../../lib/assert.js';
import { isPcacheError, PcacheError } from '../../lib/errors.js';
import { GiB } from '../../lib/units.js';
import type { ByteQueue } from '../protocol/bytes.js';
import type { WriteOptions, ZeroOptions } from '../protocol/command_types.js';
import { Command, CommandFlag, maxPayloadBytes, NbdErrno, TransmissionFlag } from '../protocol/constants.js';
import { nbdErrnoName, pcacheCodeOfNbdErrno } from '../protocol/errno.js';
import type { ExportInfo } from '../protocol/handshake_client.js';
import { ReplyDecoder, type ReplyEvent, type ReplyTarget, requestHeader } from '../protocol/transmission_client.js';
import { connectSession, type NbdClientLimits, type NbdClientOptions, type NbdSession } from './connect.js';
import { Operation, Piece, RequestTable } from './request_table.js';
import type { NbdAddress } from './uri.js';

/** The largest READ/WRITE piece sent, whatever the server allows: the spec's interoperable size. */
const clientPayloadMaxBytes = maxPayloadBytes;
/** TRIM and WRITE_ZEROES carry no payload and may exceed the payload limit; keep them in a u32. */
export const zeroRequestMaxBytes = 1 * GiB;
/** After our DISC, how long the server gets to close before the socket is destroyed. */
const discGraceMs = 2_000;
/** How often, at most, in-flight requests are checked against requestTimeoutMs. */
const timeoutCheckMinMs = 50;

type ClientState = 'open' | 'closing' | 'closed';

const commandNames: Record<number, string> = {
  [Command.read]: 'READ', [Command.write]: 'WRITE', [Command.flush]: 'FLUSH', [Command.trim]: 'TRIM',
  [Command.writeZeroes]: 'WRITE_ZEROES', [Command.disc]: 'DISC',
};

export class NbdClient {
  readonly info: ExportInfo;
  readonly limits: NbdClientLimits;
  /** Where this connection goes, for messages. */
  readonly where: string;
  /** Resolves once, with the reason, when the connection has ended for any reason. */
  readonly closed: Promise<PcacheError>;
  /** Largest READ/WRITE piece sent. */
  readonly payloadMaxBytes: number;
  /** Every offset and length must be a multiple of this (the server's minimum block size). */
  readonly minimumBlockBytes: number;

  private readonly socket: net.Socket;
  private readonly input: ByteQueue;
  private readonly decoder: ReplyDecoder;
  private state: ClientState = 'open';
  private closedError: PcacheError | undefined;
  private resolveClosed: ((error: PcacheError) => void) | undefined;
  private readonly requests: RequestTable;
  private corked = false;
  private timeoutTimer: NodeJS.Timeout | undefined;
  private idleWaiters: (() => void)[] = [];
  private writesCompletedCount = 0;
  /** The server answered ESHUTDOWN: finish what is in flight, then disconnect. */
  private serverShuttingDown = false;
  private disconnecting: Promise<void> | undefined;

  private readonly uncorkBound = (): void => {
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };
  private readonly lookupBound = (cookie: number): ReplyTarget | undefined => this.requests.get(cookie);

  /** Connects and negotiates (connect.ts); rejects with a PcacheError saying why it could not. */
  static connect(address: NbdAddress, options: NbdClientOptions): Promise<NbdClient> {
    return connectSession(address, options, (session) => new NbdClient(session));
  }

  private constructor(session: NbdSession) {
    this.socket = session.socket;
    this.info = session.info;
    this.input = session.input;
    this.limits = session.limits;
    this.where = session.where;
    this.requests = new RequestTable(session.limits);
    this.minimumBlockBytes = session.info.blockSize?.minimumBytes ?? 1;
    const serverMax = session.info.blockSize?.maximumBytes ?? clientPayloadMaxBytes;
    const payloadMax = Math.min(serverMax, clientPayloadMaxBytes);
    this.payloadMaxBytes = Math.max(this.minimumBlockBytes, payloadMax - (payloadMax % this.minimumBlockBytes));
    this.closed = new Promise((resolve) => { this.resolveClosed = resolve; });
    this.decoder = new ReplyDecoder(this.input, this.lookupBound, session.info.structuredReplies);
    const socket = this.socket;
    socket.on('data', (chunk: Buffer) => { this.receive(chunk); });
    socket.on('error', (error: Error) => {
      this.destroy(new PcacheError('ENODEV', `${this.where}: connection lost: ${error.message}`, { cause: error }));
    });
    socket.on('close', () => {
      this.destroy(new PcacheError('ENODEV', `${this.where}: the server closed the connection`));
    });
    const timeoutMs = session.limits.requestTimeoutMs;
    if (timeoutMs > 0) {
      this.timeoutTimer = setInterval(() => { this.checkTimeouts(); }, Math.max(timeoutCheckMinMs, timeoutMs / 4));
      this.timeoutTimer.unref();
    }
    // Bytes that arrived right behind the handshake's last reply.
    if (this.input.length > 0) this.receive(new Uint8Array(0));
  }

  // --- What the server offers ---

  private hasFlag(flag: number): boolean {
    const flags = this.info.transmissionFlags;
    // proto.md: without HAS_FLAGS no other bit means anything.
    return (flags & TransmissionFlag.hasFlags) !== 0 && (flags & flag) !== 0;
  }

  get sizeBytes(): number {
    return this.info.sizeBytes;
  }

  get readOnly(): boolean {
    return this.hasFlag(TransmissionFlag.readOnly);
  }

  get canFlush(): boolean {
    return this.hasFlag(TransmissionFlag.sendFlush);
  }

  get canFua(): boolean {
    return this.hasFlag(TransmissionFlag.sendFua);
  }

  get canTrim(): boolean {
    return this.hasFlag(TransmissionFlag.sendTrim);
  }

  get canWriteZeroes(): boolean {
    return this.hasFlag(TransmissionFlag.sendWriteZeroes);
  }

  get canMultiConn(): boolean {
    return this.hasFlag(TransmissionFlag.canMultiConn);
  }

  // --- State ---

  private currentState(): ClientState {
    return this.state;
  }

  /** True while new requests are accepted. */
  get isOpen(): boolean {
    return this.state === 'open';
  }

  /** Pieces in flight plus pieces waiting: how busy this connection is. */
  get load(): number {
    return this.requests.load;
  }

  /** WRITE, TRIM and WRITE_ZEROES pieces the server has acknowledged, since connecting. */
  get writesCompleted(): number {
    return this.writesCompletedCount;
  }

  /** The most pieces that were on the wire at once (for tests and benchmarks). */
  get peakInFlightRequests(): number {
    return this.requests.peakInFlightRequests;
  }

  // --- Requests ---

  read(target: Uint8Array, offsetBytes: number): Promise<void> {
    const problem = this.rangeProblem(offsetBytes, target.length);
    if (problem !== undefined) return Promise.reject(problem);
    return this.perform(Command.read, 0, offsetBytes, target.length, { readTarget: target, pieceBytes: this.payloadMaxBytes });
  }

  /** WRITE. With `fua` it is durable when this resolves (emulated with a FLUSH if the server lacks FUA). */
  async write(source: Uint8Array, offsetBytes: number, flags: Partial<WriteOptions> = {}): Promise<void> {
    const problem = this.writeProblem('WRITE') ?? this.rangeProblem(offsetBytes, source.length);
    if (problem !== undefined) throw problem;
    const fua = flags.fua === true;
    const wireFlags = fua && this.canFua ? CommandFlag.fua : 0;
    await this.perform(Command.write, wireFlags, offsetBytes, source.length, { payload: source, pieceBytes: this.payloadMaxBytes });
    if (fua && !this.canFua) await this.flush();
  }

  /**
   * Every write acknowledged on this connection before the FLUSH was sent is durable when it
   * completes (and, with CAN_MULTI_CONN, every write acknowledged on any connection). A
   * server that does not offer FLUSH has nothing volatile to flush: this resolves at once.
   */
  flush(): Promise<void> {
    if (!this.canFlush) return this.state === 'open' ? Promise.resolve() : Promise.reject(this.unavailable());
    return this.perform(Command.flush, 0, 0, 0, { pieceBytes: 1 });
  }

  /** TRIM: the range's contents become unspecified (the server may or may not zero them). */
  async trim(offsetBytes: number, lengthBytes: number, flags: Partial<WriteOptions> = {}): Promise<void> {
    const problem = this.writeProblem('TRIM') ?? this.rangeProblem(offsetBytes, lengthBytes);
    if (problem !== undefined) throw problem;
    if (!this.canTrim) throw new PcacheError('ENOTSUP', `${this.where}: the server does not offer TRIM`);
    await this.zeroLike(Command.trim, 0, offsetBytes, lengthBytes, flags.fua === true);
  }

  /**
   * WRITE_ZEROES: the range reads as zeroes afterwards. `noHole` asks the server to allocate
   * rather than punch a hole; this client never sends FAST_ZERO.
   */
  async writeZeroes(offsetBytes: number, lengthBytes: number, flags: Partial<Omit<ZeroOptions, 'fastZero'>> = {}): Promise<void> {
    const problem = this.writeProblem('WRITE_ZEROES') ?? this.rangeProblem(offsetBytes, lengthBytes);
    if (problem !== undefined) throw problem;
    if (!this.canWriteZeroes) throw new PcacheError('ENOTSUP', `${this.where}: the server does not offer WRITE_ZEROES`);
    await this.zeroLike(Command.writeZeroes, flags.noHole === true ? CommandFlag.noHole : 0, offsetBytes, lengthBytes, flags.fua === true);
  }

  /**
   * Clean disconnect: new requests fail at once, requests in flight get up to closeTimeoutMs
   * to finish, then NBD_CMD_DISC is sent and our side of the socket ends. Idempotent.
   */
  disconnect(): Promise<void> {
    this.disconnecting ??= this.disconnectCleanly();
    return this.disconnecting;
  }

  private async disconnectCleanly(): Promise<void> {
    if (this.state === 'closed') return;
    if (this.state === 'open') {
      this.state = 'closing';
      this.failWaiting(new PcacheError('ENODEV', `${this.where}: the connection is closing`));
    }
    await this.whenIdle(this.limits.closeTimeoutMs);
    // Read through a call: the connection may have closed while we waited.
    if (this.currentState() !== 'closing') return;
    if (this.requests.inFlightCount === 0 && !this.socket.destroyed) {
      this.socket.write(requestHeader({ type: Command.disc, flags: 0, cookie: 0, offsetBytes: 0, lengthBytes: 0 }));
      this.socket.end();
      const timer = setTimeout(() => { this.socket.destroy(); }, discGraceMs);
      timer.unref();
      await new Promise<void>((resolve) => {
        if (this.socket.closed) resolve();
        else this.socket.once('close', () => { resolve(); });
      });
      clearTimeout(timer);
    }
    this.destroy(new PcacheError('ENODEV', `${this.where}: disconnected`));
  }

  /** Hard close: every request in flight or waiting fails with `error`. Idempotent. */
  destroy(error: PcacheError): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.closedError = error;
    clearInterval(this.timeoutTimer);
    this.socket.destroy();
    this.input.clear();
    const pieces = this.requests.takeInFlight();
    for (const piece of pieces) piece.operation.pieceSettled(error);
    this.failWaiting(error);
    this.wakeIdle();
    this.resolveClosed?.(error);
  }

  // --- Sending ---

  private perform(
    command: number,
    flags: number,
    offsetBytes: number,
    lengthBytes: number,
    data: { readTarget?: Uint8Array; payload?: Uint8Array; pieceBytes: number },
  ): Promise<void> {
    if (this.state !== 'open') return Promise.reject(this.unavailable());
    if (lengthBytes === 0 && command !== Command.flush) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const pieceBytes = data.pieceBytes;
      const count = command === Command.flush ? 1 : Math.ceil(lengthBytes / pieceBytes);
      const operation = new Operation(count, resolve, reject);
      for (let i = 0; i < count; i += 1) {
        const start = i * pieceBytes;
        const length = Math.min(pieceBytes, lengthBytes - start);
        this.submit(new Piece(
          operation, command, flags, offsetBytes + start, length,
          data.readTarget?.subarray(start, start + length),
          data.payload?.subarray(start, start + length),
        ));
      }
    });
  }

  private async zeroLike(command: number, flags: number, offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    const wireFlags = flags | (fua && this.canFua ? CommandFlag.fua : 0);
    const pieceBytes = zeroRequestMaxBytes - (zeroRequestMaxBytes % this.minimumBlockBytes);
    await this.perform(command, wireFlags, offsetBytes, lengthBytes, { pieceBytes });
    if (fua && !this.canFua) await this.flush();
  }

  private submit(piece: Piece): void {
    if (this.state !== 'open') {
      piece.operation.pieceSettled(this.unavailable());
      return;
    }
    switch (this.requests.admit(piece)) {
      case 'send':
        this.send(piece);
        return;
      case 'queued':
        return;
      case 'full':
        piece.operation.pieceSettled(new PcacheError('EIO', `${this.where}: more than ${this.limits.queuedRequestsMax} requests queued`));
        return;
    }
  }

  private send(piece: Piece): void {
    this.requests.start(piece);
    // Requests issued in one event-loop turn leave in one write.
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncorkBound);
    }
    this.socket.write(requestHeader({
      type: piece.command, flags: piece.flags, cookie: piece.cookie, offsetBytes: piece.offsetBytes, lengthBytes: piece.lengthBytes,
    }));
    if (piece.payload !== undefined) this.socket.write(piece.payload);
  }

  private pump(): void {
    while (this.state === 'open') {
      const next = this.requests.nextAdmitted();
      if (next === undefined) return;
      this.send(next);
    }
  }

  // --- Receiving ---

  private receive(chunk: Uint8Array): void {
    if (this.state === 'closed') return;
    this.input.push(chunk);
    try {
      for (;;) {
        const event = this.decoder.next();
        if (event === undefined) break;
        this.handle(event);
      }
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      // Framing is lost: nothing more on this socket can be trusted.
      this.destroy(new PcacheError('ENODEV', `${this.where}: ${error.message}`, { cause: error }));
      return;
    }
    if (this.serverShuttingDown && this.state === 'open') {
      void this.disconnect();
      return;
    }
    this.pump();
  }

  private handle(event: ReplyEvent): void {
    const piece = this.requests.get(event.cookie);
    assert(piece !== undefined, 'the decoder only reports cookies in flight');
    switch (event.kind) {
      case 'simple':
        if (event.errno !== NbdErrno.ok) piece.error = this.serverError(piece, event.errno, '');
        return this.finish(piece);
      case 'none':
        return this.finish(piece);
      case 'data':
        piece.cover(event.offsetBytes, event.lengthBytes);
        if (event.done) this.finish(piece);
        return;
      case 'error':
        piece.error ??= this.serverError(piece, event.errno, event.message);
        if (event.done) this.finish(piece);
        return;
    }
  }

  private finish(piece: Piece): void {
    const succeeded = piece.error === undefined;
    if (succeeded && piece.command === Command.read && this.info.structuredReplies && piece.coveredBytes !== piece.lengthBytes) {
      throw new PcacheError('EIO',
        `NBD protocol violation by the server: a successful READ covered ${piece.coveredBytes} of ${piece.lengthBytes} bytes`);
    }
    this.requests.finish(piece);
    if (piece.error === undefined && piece.isWrite) this.writesCompletedCount += 1;
    piece.fragments = undefined;
    piece.operation.pieceSettled(piece.error);
    if (this.requests.inFlightCount === 0) this.wakeIdle();
  }

  private serverError(piece: Piece, errno: number, message: string): PcacheError {
    // ESHUTDOWN: the server is stopping. proto.md: the client must soft-disconnect.
    if (errno === NbdErrno.eshutdown) this.serverShuttingDown = true;
    const command = commandNames[piece.command] ?? `command ${piece.command}`;
    const range = piece.command === Command.flush ? '' : ` ${piece.offsetBytes}+${piece.lengthBytes}`;
    const detail = message === '' ? '' : `: ${message.slice(0, 200)}`;
    const text = `${this.where}: the server answered ${command}${range} with ${nbdErrnoName(errno)}${detail}`;
    return new PcacheError(pcacheCodeOfNbdErrno(errno), text);
  }

  private checkTimeouts(): void {
    const oldest = this.requests.oldest();
    if (oldest === undefined) return;
    const waitedMs = performance.now() - oldest.sentAtMs;
    if (waitedMs >= this.limits.requestTimeoutMs) {
      this.destroy(new PcacheError('ENODEV', `${this.where}: no reply for ${Math.round(waitedMs)} ms; the connection is presumed dead`));
    }
  }

  // --- Helpers ---

  private rangeProblem(offsetBytes: number, lengthBytes: number): PcacheError | undefined {
    if (!Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(lengthBytes) || offsetBytes < 0 || lengthBytes < 0) {
      return new PcacheError('EINVAL', `bad range ${offsetBytes}+${lengthBytes}`);
    }
    if (offsetBytes + lengthBytes > this.info.sizeBytes) {
      return new PcacheError('EINVAL', `range ${offsetBytes}+${lengthBytes} ends past the export's end ${this.info.sizeBytes}`);
    }
    if (offsetBytes % this.minimumBlockBytes !== 0 || lengthBytes % this.minimumBlockBytes !== 0) {
      const blockBytes = this.minimumBlockBytes;
      return new PcacheError('EINVAL', `range ${offsetBytes}+${lengthBytes} is not aligned to the server's ${blockBytes}-byte blocks`);
    }
    return undefined;
  }

  private writeProblem(command: string): PcacheError | undefined {
    if (this.state !== 'open') return this.unavailable();
    if (this.readOnly) return new PcacheError('EPERM', `${this.where}: ${command} on a read-only export`);
    return undefined;
  }

  private unavailable(): PcacheError {
    return this.closedError ?? new PcacheError('ENODEV', `${this.where}: the connection is closing`);
  }

  private failWaiting(error: PcacheError): void {
    for (const piece of this.requests.takeWaiting()) piece.operation.pieceSettled(error);
  }

  private whenIdle(timeoutMs: number): Promise<void> {
    if (this.requests.inFlightCount === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, timeoutMs);
      timer.unref();
      this.idleWaiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  private wakeIdle(): void {
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const wake of waiters) wake();
  }
}
