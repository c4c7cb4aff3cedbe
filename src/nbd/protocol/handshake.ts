// What the two sides of the fixed-newstyle handshake share: the machine that feeds a received
// stream to one side's message handling, one complete message at a time; the export name as
// bytes; what a finished negotiation established on both sides (TransmissionTerms); and the
// framing of the handshake's messages, of which an option (client to server) and an option
// reply (server to client) are two instances: a u64 magic, u32 fields, the u32 length of the
// data, the data. Both the reader of framed messages (stepFrame) and their one encoder (option,
// optionReply) live here.
//
// The sides themselves are handshake_server.ts (Handshake) and handshake_client.ts
// (ClientHandshake); each is a HandshakeMachine with its own opening, stages and verdicts, and
// says what a framed message's header and data mean to it.
//
// Invariants:
// - No sockets and no clocks: the same transcript fed in any chunking produces the same output
//   and the same verdict (whoever owns the socket owns the time limit).
// - Once a machine has failed it never reads or produces anything again: push() drops what it
//   is given. Once negotiation has succeeded it stops reading, and bytes stay in `input` for
//   the transmission phase.
// - A framed message's data is read only after its side checked the header (magic, count,
//   length cap), so a length field from the wire never sizes an allocation beyond the side's cap.
// - Every framed message's header is exactly the size named in constants.ts for it.

import { assert } from '../../lib/assert.js';
import { ByteQueue, writeU32BE, writeU64BEBig } from './bytes.js';
import { optionHeaderBytes, optionMagic, optionReplyHeaderBytes, optionReplyMagic, stringMaxBytes } from './constants.js';

const textEncoder = new TextEncoder();

/** What both sides know once negotiation has succeeded, whichever side reports it. */
export interface TransmissionTerms {
  readonly sizeBytes: number;
  /** The server's transmission flags (constants.ts TransmissionFlag). */
  readonly transmissionFlags: number;
  /** Structured replies were negotiated. */
  readonly structuredReplies: boolean;
}

/**
 * A handshake side as a state machine over the bytes it receives. A subclass says how to
 * handle one complete message (`step`); this class owns the queue, the verdict and the loop.
 */
export abstract class HandshakeMachine<Verdict extends { readonly kind: string }> {
  /** Received bytes not consumed yet; after success they belong to the transmission phase. */
  readonly input = new ByteQueue();
  protected verdict: Verdict;
  /** The verdict kind after which bytes are dropped. */
  private readonly failedKind: Verdict['kind'];
  /** Data length of the framed message whose header has been read; undefined between messages. */
  private frameDataBytes: number | undefined = undefined;

  protected constructor(initial: Verdict, failedKind: Verdict['kind']) {
    this.verdict = initial;
    this.failedKind = failedKind;
  }

  get status(): Verdict {
    return this.verdict;
  }

  /**
   * Consumes as much of the received stream as possible, appending what this side must send
   * to `out`, and returns the verdict. While negotiating, an incomplete message simply waits
   * for more bytes; once negotiation succeeded, bytes are only queued in `input`; once it
   * failed, they are dropped.
   */
  push(chunk: Uint8Array, out: Uint8Array[]): Verdict {
    if (this.verdict.kind === this.failedKind) return this.verdict;
    this.input.push(chunk);
    while (this.step(out)) {
      // Each step consumes one complete message.
    }
    return this.verdict;
  }

  /**
   * Handles one complete message if enough bytes are queued. False when more are needed or
   * when negotiation is over (the rest of the input then belongs to the transmission phase).
   */
  protected abstract step(out: Uint8Array[]): boolean;

  /**
   * One step through the next framed message: its header of `headerBytes` (which
   * receiveFrameHeader checks) or, after that, its data (which receiveFrame handles). True when
   * either was consumed; false while more bytes are needed.
   */
  protected stepFrame(headerBytes: number, out: Uint8Array[]): boolean {
    const dataBytes = this.frameDataBytes;
    if (dataBytes === undefined) {
      if (this.input.length < headerBytes) return false;
      this.frameDataBytes = this.receiveFrameHeader(this.input.take(headerBytes));
      return true;
    }
    if (this.input.length < dataBytes) return false;
    const data = this.input.take(dataBytes);
    this.frameDataBytes = undefined;
    this.receiveFrame(data, out);
    return true;
  }

  /**
   * Checks the header of a framed message and returns the length of its data, or undefined
   * when the header ended negotiation (the verdict says how; nothing more is read).
   */
  protected abstract receiveFrameHeader(header: Uint8Array): number | undefined;

  /** Handles the data of the framed message whose header was accepted last. */
  protected abstract receiveFrame(data: Uint8Array, out: Uint8Array[]): void;
}

/** An export name as the protocol carries it: UTF-8, at most stringMaxBytes. */
export function exportNameBytes(exportName: string): Uint8Array {
  const bytes = textEncoder.encode(exportName);
  assert(bytes.length <= stringMaxBytes, 'export name longer than the protocol allows');
  return bytes;
}

/** One option, client to server: IHAVEOPT, option code, data length, data. */
export function option(code: number, data: Uint8Array): Uint8Array {
  return framedMessage(optionMagic, [code], data, optionHeaderBytes);
}

/** One fixed-newstyle option reply, server to client: magic, option, type, length, data. */
export function optionReply(option: number, type: number, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  return framedMessage(optionReplyMagic, [option, type], payload, optionReplyHeaderBytes);
}

/** The magic at the front of every framed message. */
const frameMagicBytes = 8;
/** Each field after the magic, and the data length that ends the header, is a u32. */
const frameFieldBytes = 4;

/** A u64 magic, u32 fields, the u32 length of the data, then the data. */
function framedMessage(magic: bigint, fields: readonly number[], data: Uint8Array, headerBytes: number): Uint8Array {
  assert(headerBytes === frameMagicBytes + frameFieldBytes * (fields.length + 1), 'header size and fields disagree');
  const bytes = new Uint8Array(headerBytes + data.length);
  writeU64BEBig(bytes, 0, magic);
  let at = frameMagicBytes;
  for (const field of fields) {
    writeU32BE(bytes, at, field);
    at += frameFieldBytes;
  }
  writeU32BE(bytes, at, data.length);
  bytes.set(data, headerBytes);
  return bytes;
}
