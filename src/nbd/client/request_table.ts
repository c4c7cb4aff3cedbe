// The bookkeeping of one open client connection's requests: a caller's request (Operation) is
// split into pieces (Piece), one per request on the wire; the RequestTable knows which pieces
// are in flight under which cookie, which wait for room, and how much data is out.
//
// Nothing here touches the socket or a timer: client.ts sends what the table admits, and
// reports replies and failures to the pieces.
//
// Invariants:
// - Cookies are u32 values unique among the pieces in flight.
// - In flight: at most inFlightRequestsMax pieces and inFlightBytesMax bytes of READ/WRITE
//   data, except that a single piece is always admitted when nothing else is in flight; the
//   rest waits in a FIFO of at most queuedRequestsMax pieces. Nothing overtakes a waiting
//   piece, so a large request cannot starve.
// - An Operation settles exactly once, after all of its pieces have, with the first error any
//   piece had: no late piece writes into a buffer its caller has been given back.
// - A READ's structured chunks may not overlap, and at most readFragmentsMax of them make up
//   one piece; a server that breaks either is a protocol violation (PcacheError 'EIO').

import { assert } from '../../lib/assert.js';
import { PcacheError } from '../../lib/errors.js';
import { Command } from '../protocol/constants.js';
import type { ReplyTarget } from '../protocol/transmission_client.js';
import type { NbdClientLimits } from './connect.js';

/** A READ answered in more fragments than this is treated as a broken server. */
const readFragmentsMax = 4096;

/** One caller's request; settles when every piece has. */
export class Operation {
  private remaining: number;
  private error: PcacheError | undefined;
  private readonly resolve: () => void;
  private readonly reject: (error: PcacheError) => void;

  constructor(pieces: number, resolve: () => void, reject: (error: PcacheError) => void) {
    assert(pieces > 0, 'an operation has at least one piece');
    this.remaining = pieces;
    this.resolve = resolve;
    this.reject = reject;
  }

  pieceSettled(error: PcacheError | undefined): void {
    assert(this.remaining > 0, 'a piece settled twice');
    this.remaining -= 1;
    this.error ??= error;
    if (this.remaining > 0) return;
    if (this.error === undefined) this.resolve();
    else this.reject(this.error);
  }
}

/** One request on the wire (or waiting for room). */
export class Piece implements ReplyTarget {
  cookie = 0;
  sentAtMs = 0;
  error: PcacheError | undefined;
  /** READ with structured replies: bytes of the range filled so far, and by which chunks. */
  coveredBytes = 0;
  fragments: number[] | undefined;

  constructor(
    readonly operation: Operation,
    readonly command: number,
    readonly flags: number,
    readonly offsetBytes: number,
    readonly lengthBytes: number,
    readonly readTarget: Uint8Array | undefined,
    readonly payload: Uint8Array | undefined,
  ) {}

  /** Bytes of data this piece holds in flight (READ buffer or WRITE payload). */
  get dataBytes(): number {
    return this.command === Command.read || this.command === Command.write ? this.lengthBytes : 0;
  }

  get isWrite(): boolean {
    return this.command === Command.write || this.command === Command.trim || this.command === Command.writeZeroes;
  }

  /** Records that a structured READ chunk filled a range; overlapping chunks are a violation. */
  cover(offsetBytes: number, lengthBytes: number): void {
    const start = offsetBytes - this.offsetBytes;
    const end = start + lengthBytes;
    if (start === 0 && lengthBytes === this.lengthBytes && this.coveredBytes === 0) {
      this.coveredBytes = lengthBytes;
      this.fragments = [0, lengthBytes];
      return;
    }
    const fragments = (this.fragments ??= []);
    for (let i = 0; i < fragments.length; i += 2) {
      if (start < (fragments[i + 1] ?? 0) && (fragments[i] ?? 0) < end) {
        throw new PcacheError('EIO', `NBD protocol violation by the server: overlapping READ chunks at ${offsetBytes}`);
      }
    }
    if (fragments.length >= 2 * readFragmentsMax) {
      throw new PcacheError('EIO', `NBD protocol violation by the server: a READ in more than ${readFragmentsMax} chunks`);
    }
    fragments.push(start, end);
    this.coveredBytes += lengthBytes;
  }
}

/** What happens to a new piece: it goes on the wire now, waits for room, or finds the queue full. */
export type Admission = 'send' | 'queued' | 'full';

export class RequestTable {
  private readonly limits: NbdClientLimits;
  private readonly inFlight = new Map<number, Piece>();
  private inFlightBytes = 0;
  private waiting: Piece[] = [];
  private nextCookie = 0;
  private peakInFlight = 0;

  constructor(limits: NbdClientLimits) {
    this.limits = limits;
  }

  /** Pieces on the wire. */
  get inFlightCount(): number {
    return this.inFlight.size;
  }

  /** Pieces in flight plus pieces waiting. */
  get load(): number {
    return this.inFlight.size + this.waiting.length;
  }

  /** The most pieces that were on the wire at once. */
  get peakInFlightRequests(): number {
    return this.peakInFlight;
  }

  /** The piece in flight under `cookie`. */
  get(cookie: number): Piece | undefined {
    return this.inFlight.get(cookie);
  }

  /** The piece in flight longest (a Map iterates in insertion order). */
  oldest(): Piece | undefined {
    const first = this.inFlight.values().next();
    return first.done === true ? undefined : first.value;
  }

  /** Decides about a new piece; a 'queued' one is kept until nextAdmitted() returns it. */
  admit(piece: Piece): Admission {
    // FIFO: nothing overtakes a waiting piece, so a large request cannot starve.
    if (this.waiting.length > 0 || !this.admits(piece)) {
      if (this.waiting.length >= this.limits.queuedRequestsMax) return 'full';
      this.waiting.push(piece);
      return 'queued';
    }
    return 'send';
  }

  /** The first waiting piece, taken off the queue, if it may go on the wire now. */
  nextAdmitted(): Piece | undefined {
    const next = this.waiting[0];
    if (next === undefined || !this.admits(next)) return undefined;
    this.waiting.shift();
    return next;
  }

  /** Gives the piece a cookie unique among those in flight and records it as in flight. */
  start(piece: Piece): void {
    let cookie = this.nextCookie;
    do {
      cookie = (cookie + 1) >>> 0;
    } while (this.inFlight.has(cookie));
    this.nextCookie = cookie;
    piece.cookie = cookie;
    piece.sentAtMs = performance.now();
    this.inFlight.set(cookie, piece);
    this.inFlightBytes += piece.dataBytes;
    this.peakInFlight = Math.max(this.peakInFlight, this.inFlight.size);
  }

  /** Forgets a piece that got its final reply. */
  finish(piece: Piece): void {
    this.inFlight.delete(piece.cookie);
    this.inFlightBytes -= piece.dataBytes;
  }

  /** Empties the table of pieces in flight and returns them (the connection is gone). */
  takeInFlight(): Piece[] {
    const pieces = [...this.inFlight.values()];
    this.inFlight.clear();
    this.inFlightBytes = 0;
    return pieces;
  }

  /** Empties the queue of waiting pieces and returns them. */
  takeWaiting(): Piece[] {
    const waiting = this.waiting;
    this.waiting = [];
    return waiting;
  }

  private admits(piece: Piece): boolean {
    if (this.inFlight.size >= this.limits.inFlightRequestsMax) return false;
    return this.inFlight.size === 0 || this.inFlightBytes + piece.dataBytes <= this.limits.inFlightBytesMax;
  }
}
