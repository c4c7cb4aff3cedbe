// The client side of the transmission phase as a pure codec: the request encoder and the reply
// decoder (simple replies and structured reply chunks). The mirror image of
// transmission_server.ts; the error numbers it reports map back to PcacheError codes in errno.ts.
//
// ReplyDecoder pulls replies from a ByteQueue fed in arbitrary chunks. It cannot frame a reply
// alone — a simple reply to a READ is followed by data whose length only the request knows —
// so it asks a lookup for the request behind each cookie, and copies READ data straight into
// that request's buffer: nothing is allocated for data from the wire.
//
// Invariants:
// - Every length and offset from the wire is checked before it is used: a chunk's payload
//   length against the chunk type's layout and against the request, an OFFSET_DATA/HOLE
//   range against the request's range, a message length against the payload. Only payloads
//   of non-data chunks (errors; at most chunkPayloadMaxBytes) are buffered.
// - Anything the protocol forbids — an unknown cookie, a bad magic, a structured chunk when
//   structured replies were not negotiated, a simple success reply to a READ when they were,
//   a data chunk for a command without data, a non-error chunk type we cannot parse, an
//   error chunk with error 0 — throws a PcacheError 'EIO' naming the violation. Framing is
//   lost after that; the caller closes the connection.
// - Cookies are u32 values in the low half of the u64 field; a reply with a nonzero high half
//   names no request of ours.
// - 64-bit offsets become numbers through readU64BE only.

import { assert } from '../../lib/assert.js';
import { PcacheError } from '../../lib/errors.js';
import { KiB, readU64BE, writeU64BE } from '../../lib/units.js';
import { type ByteQueue, readU16BE, readU32BE, writeU16BE, writeU32BE } from './bytes.js';
import {
  Command,
  errorChunkPrefixBytes,
  NbdErrno,
  offsetDataPrefixBytes,
  ReplyFlag,
  ReplyType,
  requestHeaderBytes,
  requestMagic,
  simpleReplyBytes,
  simpleReplyMagic,
  structuredReplyHeaderBytes,
  structuredReplyMagic,
} from './constants.js';

/** Largest non-data chunk payload accepted (error chunks: 6 + a message of <= 4096 + 8). */
export const chunkPayloadMaxBytes = 16 * KiB;
/** OFFSET_HOLE payload: u64 offset + u32 size. */
const offsetHolePayloadBytes = 12;
/** ERROR_OFFSET carries a u64 offset after the message. */
const errorOffsetSuffixBytes = 8;
/** Bit 15 of a chunk type marks an error chunk, known or not (proto.md "Structured reply chunk types"). */
const errorTypeBit = 0x8000;
const replyMagicBytes = 4;

export interface RequestFields {
  readonly type: number;
  readonly flags: number;
  /** A u32; sent in the low half of the u64 cookie field. */
  readonly cookie: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
}

/** Writes a 28-byte compact request header at `at`. */
export function writeRequestHeader(target: Uint8Array, at: number, fields: RequestFields): void {
  assert(Number.isInteger(fields.cookie) && fields.cookie >= 0 && fields.cookie <= 0xffff_ffff, 'cookie must be a u32');
  writeU32BE(target, at, requestMagic);
  writeU16BE(target, at + 4, fields.flags);
  writeU16BE(target, at + 6, fields.type);
  writeU32BE(target, at + 8, 0);
  writeU32BE(target, at + 12, fields.cookie);
  writeU64BE(target, at + 16, fields.offsetBytes);
  writeU32BE(target, at + 24, fields.lengthBytes);
}

export function requestHeader(fields: RequestFields): Uint8Array {
  const bytes = new Uint8Array(requestHeaderBytes);
  writeRequestHeader(bytes, 0, fields);
  return bytes;
}

/** What the decoder needs to know about the request a reply answers. */
export interface ReplyTarget {
  readonly command: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  /** READ only: receives the data; exactly lengthBytes long. */
  readonly readTarget: Uint8Array | undefined;
}

export type ReplyLookup = (cookie: number) => ReplyTarget | undefined;

export type ReplyEvent =
  /** A simple reply; for a successful READ the data is already in the request's buffer. */
  | { readonly kind: 'simple'; readonly cookie: number; readonly errno: number }
  /** OFFSET_DATA or OFFSET_HOLE: this range of the request's buffer is filled. */
  | { readonly kind: 'data'; readonly cookie: number; readonly offsetBytes: number; readonly lengthBytes: number; readonly done: boolean }
  /** NONE: the request completed (DONE is always set). */
  | { readonly kind: 'none'; readonly cookie: number }
  /** ERROR, ERROR_OFFSET or an unknown error type. */
  | { readonly kind: 'error'; readonly cookie: number; readonly errno: number; readonly message: string; readonly done: boolean };

type Stage = 'magic' | 'simpleHeader' | 'chunkHeader' | 'simpleData' | 'dataOffset' | 'chunkData' | 'chunkPayload';

const textDecoder = new TextDecoder('utf-8', { fatal: false });

export class ReplyDecoder {
  private readonly input: ByteQueue;
  private readonly lookup: ReplyLookup;
  private readonly structuredReplies: boolean;
  private stage: Stage = 'magic';
  // The reply being decoded.
  private cookie = 0;
  private target: ReplyTarget | undefined;
  private chunkFlags = 0;
  private chunkType = 0;
  private payloadBytes = 0;
  /** For data being copied: the window of the request's buffer still to fill. */
  private window: Uint8Array | undefined;
  private windowFilledBytes = 0;
  private dataOffsetBytes = 0;

  constructor(input: ByteQueue, lookup: ReplyLookup, structuredReplies: boolean) {
    this.input = input;
    this.lookup = lookup;
    this.structuredReplies = structuredReplies;
  }

  /**
   * The next complete reply event, or undefined when more bytes are needed. Throws a
   * PcacheError 'EIO' on a protocol violation; the stream is unusable after that.
   */
  next(): ReplyEvent | undefined {
    for (;;) {
      switch (this.stage) {
        case 'magic': {
          if (this.input.length < replyMagicBytes) return undefined;
          const magic = readU32BE(this.input.take(replyMagicBytes), 0);
          if (magic === simpleReplyMagic) this.stage = 'simpleHeader';
          else if (magic === structuredReplyMagic && this.structuredReplies) this.stage = 'chunkHeader';
          else if (magic === structuredReplyMagic) throw violation('a structured reply chunk, but structured replies were not negotiated');
          else throw violation(`bad reply magic 0x${magic.toString(16)}`);
          continue;
        }
        case 'simpleHeader': {
          if (this.input.length < simpleReplyBytes - replyMagicBytes) return undefined;
          const event = this.simpleHeader(this.input.take(simpleReplyBytes - replyMagicBytes));
          if (event !== undefined) return event;
          continue;
        }
        case 'simpleData': {
          if (!this.fillWindow()) return undefined;
          this.stage = 'magic';
          return { kind: 'simple', cookie: this.cookie, errno: NbdErrno.ok };
        }
        case 'chunkHeader': {
          if (this.input.length < structuredReplyHeaderBytes - replyMagicBytes) return undefined;
          const event = this.chunkHeader(this.input.take(structuredReplyHeaderBytes - replyMagicBytes));
          if (event !== undefined) return event;
          continue;
        }
        case 'dataOffset': {
          if (this.input.length < offsetDataPrefixBytes) return undefined;
          this.dataOffset(readU64BE(this.input.take(offsetDataPrefixBytes), 0));
          continue;
        }
        case 'chunkData': {
          if (!this.fillWindow()) return undefined;
          this.stage = 'magic';
          return this.dataEvent(this.window?.length ?? 0);
        }
        case 'chunkPayload': {
          if (this.input.length < this.payloadBytes) return undefined;
          const payload = this.input.take(this.payloadBytes);
          this.stage = 'magic';
          return this.chunkPayload(payload);
        }
      }
    }
  }

  /** Error, cookie (after the magic). Returns the event unless READ data follows. */
  private simpleHeader(header: Uint8Array): ReplyEvent | undefined {
    const errno = readU32BE(header, 0);
    const target = this.request(header, 4);
    if (errno !== NbdErrno.ok || target.command !== Command.read) {
      this.stage = 'magic';
      return { kind: 'simple', cookie: this.cookie, errno };
    }
    // proto.md: with structured replies a READ MUST be answered with chunks.
    if (this.structuredReplies) throw violation('a simple success reply to READ although structured replies were negotiated');
    assert(target.readTarget !== undefined && target.readTarget.length === target.lengthBytes, 'READ without a buffer of its length');
    this.openWindow(target.readTarget);
    this.stage = 'simpleData';
    return undefined;
  }

  /** Flags, type, cookie, length (after the magic). Returns the event when no payload follows. */
  private chunkHeader(header: Uint8Array): ReplyEvent | undefined {
    this.chunkFlags = readU16BE(header, 0);
    this.chunkType = readU16BE(header, 2);
    const target = this.request(header, 4);
    const length = readU32BE(header, 12);
    this.payloadBytes = length;
    const type = this.chunkType;
    if (type === ReplyType.none) {
      if (length !== 0) throw violation(`NONE chunk with ${length} payload bytes`);
      if (!this.done) throw violation('NONE chunk without the DONE flag');
      this.stage = 'magic';
      return { kind: 'none', cookie: this.cookie };
    }
    if (type === ReplyType.offsetData) {
      if (target.command !== Command.read) throw violation('OFFSET_DATA chunk for a request that is not a READ');
      if (length <= offsetDataPrefixBytes) throw violation(`OFFSET_DATA chunk of ${length} bytes carries no data`);
      if (length - offsetDataPrefixBytes > target.lengthBytes) throw violation('OFFSET_DATA chunk longer than its READ');
      this.stage = 'dataOffset';
      return undefined;
    }
    if (type === ReplyType.offsetHole) {
      if (target.command !== Command.read) throw violation('OFFSET_HOLE chunk for a request that is not a READ');
      if (length !== offsetHolePayloadBytes) throw violation(`OFFSET_HOLE chunk of ${length} bytes, not ${offsetHolePayloadBytes}`);
    } else if ((type & errorTypeBit) !== 0) {
      if (length < errorChunkPrefixBytes) {
        throw violation(`error chunk of ${length} bytes, shorter than its ${errorChunkPrefixBytes}-byte prefix`);
      }
    } else {
      // BLOCK_STATUS (never asked for) and non-error types from later protocol versions.
      throw violation(`unexpected chunk type ${type}`);
    }
    if (length > chunkPayloadMaxBytes) throw violation(`chunk payload of ${length} bytes exceeds ${chunkPayloadMaxBytes}`);
    this.stage = 'chunkPayload';
    return undefined;
  }

  /** The u64 offset in front of OFFSET_DATA's data, checked against the request's range. */
  private dataOffset(offsetBytes: number): void {
    const target = this.currentTarget();
    const dataBytes = this.payloadBytes - offsetDataPrefixBytes;
    const start = this.checkRange(offsetBytes, dataBytes, target, 'OFFSET_DATA');
    assert(target.readTarget !== undefined, 'READ without a buffer');
    this.dataOffsetBytes = offsetBytes;
    this.openWindow(target.readTarget.subarray(start, start + dataBytes));
    this.stage = 'chunkData';
  }

  /** A fully buffered OFFSET_HOLE or error chunk payload. */
  private chunkPayload(payload: Uint8Array): ReplyEvent {
    const target = this.currentTarget();
    if (this.chunkType === ReplyType.offsetHole) {
      const offsetBytes = readU64BE(payload, 0);
      const holeBytes = readU32BE(payload, 8);
      if (holeBytes === 0) throw violation('OFFSET_HOLE of zero bytes');
      const start = this.checkRange(offsetBytes, holeBytes, target, 'OFFSET_HOLE');
      assert(target.readTarget !== undefined, 'READ without a buffer');
      target.readTarget.fill(0, start, start + holeBytes);
      this.dataOffsetBytes = offsetBytes;
      return this.dataEvent(holeBytes);
    }
    const errno = readU32BE(payload, 0);
    if (errno === NbdErrno.ok) throw violation('error chunk with error value 0');
    const messageBytes = readU16BE(payload, 4);
    if (messageBytes > payload.length - errorChunkPrefixBytes) throw violation('error message longer than its chunk');
    const expectedBytes = errorChunkPrefixBytes + messageBytes + (this.chunkType === ReplyType.errorOffset ? errorOffsetSuffixBytes : 0);
    const known = this.chunkType === ReplyType.error || this.chunkType === ReplyType.errorOffset;
    if (known && payload.length !== expectedBytes) throw violation(`error chunk of ${payload.length} bytes, expected ${expectedBytes}`);
    if (this.chunkType === ReplyType.errorOffset) {
      const offsetBytes = readU64BE(payload, expectedBytes - errorOffsetSuffixBytes);
      if (offsetBytes < target.offsetBytes || offsetBytes >= target.offsetBytes + target.lengthBytes) {
        throw violation('ERROR_OFFSET outside its request');
      }
    }
    const message = textDecoder.decode(payload.subarray(errorChunkPrefixBytes, errorChunkPrefixBytes + messageBytes));
    return { kind: 'error', cookie: this.cookie, errno, message, done: this.done };
  }

  private dataEvent(lengthBytes: number): ReplyEvent {
    return { kind: 'data', cookie: this.cookie, offsetBytes: this.dataOffsetBytes, lengthBytes, done: this.done };
  }

  /** Reads the cookie at `at` and finds its request; an unknown cookie breaks framing. */
  private request(header: Uint8Array, at: number): ReplyTarget {
    const high = readU32BE(header, at);
    const low = readU32BE(header, at + 4);
    const target = high === 0 ? this.lookup(low) : undefined;
    if (target === undefined) throw violation(`reply for unknown cookie 0x${((BigInt(high) << 32n) | BigInt(low)).toString(16)}`);
    this.cookie = low;
    this.target = target;
    return target;
  }

  /** Checks [offset, offset + length) lies inside the request; returns its start in the buffer. */
  private checkRange(offsetBytes: number, lengthBytes: number, target: ReplyTarget, what: string): number {
    if (offsetBytes < target.offsetBytes || offsetBytes - target.offsetBytes > target.lengthBytes - lengthBytes) {
      throw violation(`${what} range ${offsetBytes}+${lengthBytes} lies outside its READ ${target.offsetBytes}+${target.lengthBytes}`);
    }
    return offsetBytes - target.offsetBytes;
  }

  private currentTarget(): ReplyTarget {
    assert(this.target !== undefined, 'no request for the current reply');
    return this.target;
  }

  private get done(): boolean {
    return (this.chunkFlags & ReplyFlag.done) !== 0;
  }

  private openWindow(window: Uint8Array): void {
    this.window = window;
    this.windowFilledBytes = 0;
  }

  /** Copies queued bytes into the window; true once it is full. */
  private fillWindow(): boolean {
    const window = this.window;
    assert(window !== undefined, 'no data window open');
    this.windowFilledBytes += this.input.takeInto(window, this.windowFilledBytes);
    return this.windowFilledBytes === window.length;
  }
}

function violation(what: string): PcacheError {
  return new PcacheError('EIO', `NBD protocol violation by the server: ${what}`);
}
