// The server's side of the transmission phase as a pure codec: request decoding with boundary
// validation, and reply encoding. The error numbers its replies carry come from errno.ts.
//
// RequestDecoder pulls 28-byte request headers from a ByteQueue fed in arbitrary chunks and
// classifies each request (validateRequest) the moment its header is complete, before any
// payload is allocated: a WRITE that will be refused (out of range, too large, read-only,
// shutting down, bad flags) has its payload skipped, never buffered, so the stream keeps its
// framing. Only a bad request magic breaks framing; that throws, and the caller disconnects.
//
// Invariants:
// - A request that reaches the Export (problem === undefined) lies inside the export, has
//   offset and length that are multiples of 512, carries only flags valid for its command, and
//   a READ/WRITE/CACHE length of at most maxPayloadBytes.
// - 64-bit offsets become numbers through readU64BE only; values >= 2^53 arrive as +Infinity
//   and fail the range check.
// - Reply encoders write exactly the layout of proto.md; cookies are echoed byte for byte.

import { assert } from '../../lib/assert.js';
import { PcacheError } from '../../lib/errors.js';
import { readU64BE, writeU64BE } from '../../lib/units.js';
import { type ByteQueue, readU16BE, readU32BE, writeU16BE, writeU32BE } from './bytes.js';
import type { BlockStatusExtent } from './command_types.js';
import {
  blockDescriptorBytes,
  blockSizeMinimumBytes,
  blockStatusPrefixBytes,
  Command,
  CommandFlag,
  errorChunkPrefixBytes,
  maxPayloadBytes,
  NbdErrno,
  offsetDataPrefixBytes,
  ReplyFlag,
  ReplyType,
  requestHeaderBytes,
  requestMagic,
  simpleReplyBytes,
  simpleReplyMagic,
  StateFlag,
  structuredReplyHeaderBytes,
  structuredReplyMagic,
} from './constants.js';

/** Most descriptors sent in one BLOCK_STATUS reply; clients ask again for the rest. */
export const blockStatusDescriptorsMax = 2048;
/** Longest error message placed in a structured ERROR chunk. */
export const errorMessageMaxBytes = 256;

/** What the validator needs to know about the connection; `shuttingDown` changes once. */
export interface TransmissionContext {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly structuredReplies: boolean;
  readonly baseAllocationContextId: number | undefined;
  shuttingDown: boolean;
}

/** Why a request is refused at the boundary: the NBD error number and a message for humans. */
export interface RequestProblem {
  readonly errno: number;
  readonly message: string;
}

function problem(errno: number, message: string): RequestProblem {
  return { errno, message };
}

/** Every boundary refusal, allocated once. */
export const Problems = {
  shuttingDown: problem(NbdErrno.eshutdown, 'server is shutting down'),
  unknownCommand: problem(NbdErrno.einval, 'unknown command'),
  badFlags: problem(NbdErrno.einval, 'command flags not valid for this command'),
  flushRange: problem(NbdErrno.einval, 'FLUSH must have zero offset and length'),
  readOnly: problem(NbdErrno.eperm, 'export is read-only'),
  noMetaContext: problem(NbdErrno.einval, 'no metadata context was negotiated'),
  tooLarge: problem(NbdErrno.einval, `length exceeds the maximum of ${maxPayloadBytes} bytes`),
  writePastEnd: problem(NbdErrno.enospc, 'write extends past the end of the export'),
  pastEnd: problem(NbdErrno.einval, 'request extends past the end of the export'),
  misaligned: problem(NbdErrno.einval, `offset and length must be multiples of ${blockSizeMinimumBytes}`),
  emptyStatus: problem(NbdErrno.einval, 'BLOCK_STATUS length must not be zero'),
} as const;

/** One decoded request. The server reads these fields; only the decoder sets them. */
export class NbdRequest {
  /** WRITE data when the request was accepted; undefined otherwise (skipped payload). */
  payload: Uint8Array | undefined = undefined;
  /** Set when the request was refused at the boundary. */
  problem: RequestProblem | undefined = undefined;
  /** Monotonic time of dispatch, in ms; set only when the server has an observer (server/observer.ts). */
  dispatchedMs = 0;

  constructor(
    readonly type: number,
    readonly flags: number,
    readonly cookieHigh: number,
    readonly cookieLow: number,
    /** +Infinity when the wire value does not fit in 53 bits. */
    readonly offsetBytes: number,
    readonly lengthBytes: number,
  ) {}

  hasFlag(flag: number): boolean {
    return (this.flags & flag) !== 0;
  }
}

/** The command flags each known command accepts; undefined for an unknown command. */
function allowedFlags(type: number, context: TransmissionContext): number | undefined {
  // FUA is accepted on every command: "the server MUST accept all commands with this bit set
  // (even by ignoring the bit)" once SEND_FUA is advertised, which it always is here.
  const fua = CommandFlag.fua;
  switch (type) {
    case Command.read:
      return fua | (context.structuredReplies ? CommandFlag.df : 0);
    case Command.write:
    case Command.flush:
    case Command.trim:
    case Command.cache:
      return fua;
    case Command.writeZeroes:
      return fua | CommandFlag.noHole | CommandFlag.fastZero;
    case Command.blockStatus:
      return fua | CommandFlag.reqOne;
    case Command.disc:
      return 0xffff;
    default:
      return undefined;
  }
}

/**
 * Decides at the boundary whether a request may reach the Export, and if not, which error
 * it gets. Pure: the same header and context always give the same answer.
 */
export function validateRequest(request: NbdRequest, context: TransmissionContext): RequestProblem | undefined {
  const type = request.type;
  if (type === Command.disc) return undefined;
  if (context.shuttingDown) return Problems.shuttingDown;
  const allowed = allowedFlags(type, context);
  if (allowed === undefined) return Problems.unknownCommand;
  if ((request.flags & ~allowed) !== 0) return Problems.badFlags;

  const offset = request.offsetBytes;
  const length = request.lengthBytes;
  if (type === Command.flush) return offset === 0 && length === 0 ? undefined : Problems.flushRange;
  const writesData = type === Command.write || type === Command.trim || type === Command.writeZeroes;
  if (writesData && context.readOnly) return Problems.readOnly;
  if (type === Command.blockStatus && context.baseAllocationContextId === undefined) return Problems.noMetaContext;
  const carriesData = type === Command.read || type === Command.write || type === Command.cache;
  if (carriesData && length > maxPayloadBytes) return Problems.tooLarge;
  if (offset > context.sizeBytes || length > context.sizeBytes - offset) {
    // proto.md "Error values": ENOSPC for writes past the end, EINVAL for reads and trims.
    return type === Command.write || type === Command.writeZeroes ? Problems.writePastEnd : Problems.pastEnd;
  }
  if (offset % blockSizeMinimumBytes !== 0 || length % blockSizeMinimumBytes !== 0) return Problems.misaligned;
  if (type === Command.blockStatus && length === 0) return Problems.emptyStatus;
  return undefined;
}

/**
 * Where WRITE payloads go: a buffer of exactly `lengthBytes` that the request owns until it
 * completes (contents stale; every byte is overwritten before use). The server passes its
 * buffer pool; the default allocates.
 */
export type PayloadAllocator = (lengthBytes: number) => Uint8Array;

const allocatePayload: PayloadAllocator = (lengthBytes) => new Uint8Array(lengthBytes);
const emptyPayload = new Uint8Array(0);

/**
 * Decodes requests from a ByteQueue, one at a time, in any chunking. Call `next()` until it
 * returns undefined (more bytes needed); push more bytes into the queue and call again.
 * Nothing a request holds refers to the queue's chunks: headers are decoded from a scratch
 * copy and WRITE payloads are copied into their own buffers, so the chunks may be reused as
 * soon as `next()` returns.
 */
export class RequestDecoder {
  private readonly input: ByteQueue;
  private readonly context: TransmissionContext;
  private readonly allocate: PayloadAllocator;
  private readonly header = new Uint8Array(requestHeaderBytes);
  /** A WRITE whose header is decoded and whose payload is still arriving. */
  private pending: NbdRequest | undefined = undefined;
  private pendingFilledBytes = 0;
  private pendingSkipBytes = 0;

  constructor(input: ByteQueue, context: TransmissionContext, allocate: PayloadAllocator = allocatePayload) {
    this.input = input;
    this.context = context;
    this.allocate = allocate;
  }

  /** Bytes of WRITE payload buffered for the request still being received. */
  get partialPayloadBytes(): number {
    return this.pending?.payload === undefined ? 0 : this.pendingFilledBytes;
  }

  /**
   * Returns the next complete request, or undefined when more bytes are needed. Throws an
   * EINVAL PcacheError on a bad request magic; the stream is unusable after that.
   */
  next(): NbdRequest | undefined {
    if (this.pending === undefined) {
      if (this.input.length < requestHeaderBytes) return undefined;
      this.input.takeInto(this.header, 0);
      const request = this.decodeHeader(this.header);
      if (request.type !== Command.write) return request;
      this.pending = request;
      this.pendingFilledBytes = 0;
      if (request.problem === undefined) {
        // Validated: length <= maxPayloadBytes, so the buffer is bounded.
        request.payload = request.lengthBytes === 0 ? emptyPayload : this.allocate(request.lengthBytes);
        this.pendingSkipBytes = 0;
      } else {
        this.pendingSkipBytes = request.lengthBytes;
      }
    }
    return this.continuePayload();
  }

  private continuePayload(): NbdRequest | undefined {
    const request = this.pending;
    assert(request !== undefined, 'no payload in progress');
    if (request.payload !== undefined) {
      this.pendingFilledBytes += this.input.takeInto(request.payload, this.pendingFilledBytes);
      if (this.pendingFilledBytes < request.payload.length) return undefined;
    } else {
      this.pendingSkipBytes -= this.input.skip(this.pendingSkipBytes);
      if (this.pendingSkipBytes > 0) return undefined;
    }
    this.pending = undefined;
    this.pendingFilledBytes = 0;
    return request;
  }

  private decodeHeader(header: Uint8Array): NbdRequest {
    const magic = readU32BE(header, 0);
    if (magic !== requestMagic) {
      throw new PcacheError('EINVAL', `bad request magic 0x${magic.toString(16)}; framing lost`);
    }
    const request = new NbdRequest(
      readU16BE(header, 6),
      readU16BE(header, 4),
      readU32BE(header, 8),
      readU32BE(header, 12),
      readU64BE(header, 16),
      readU32BE(header, 24),
    );
    request.problem = validateRequest(request, this.context);
    return request;
  }
}

// --- Replies ---

/** Writes a 16-byte simple reply header at `at`. */
export function writeSimpleReply(target: Uint8Array, at: number, errno: number, request: NbdRequest): void {
  writeU32BE(target, at, simpleReplyMagic);
  writeU32BE(target, at + 4, errno);
  writeU32BE(target, at + 8, request.cookieHigh);
  writeU32BE(target, at + 12, request.cookieLow);
}

export function simpleReply(errno: number, request: NbdRequest): Uint8Array {
  const bytes = new Uint8Array(simpleReplyBytes);
  writeSimpleReply(bytes, 0, errno, request);
  return bytes;
}

/** Writes a 20-byte structured reply chunk header at `at`. */
export function writeChunkHeader(
  target: Uint8Array,
  at: number,
  chunk: { flags: number; type: number; payloadBytes: number },
  request: NbdRequest,
): void {
  writeU32BE(target, at, structuredReplyMagic);
  writeU16BE(target, at + 4, chunk.flags);
  writeU16BE(target, at + 6, chunk.type);
  writeU32BE(target, at + 8, request.cookieHigh);
  writeU32BE(target, at + 12, request.cookieLow);
  writeU32BE(target, at + 16, chunk.payloadBytes);
}

/** NBD_REPLY_TYPE_NONE with DONE: success for a command without reply data. */
export function noneChunk(request: NbdRequest): Uint8Array {
  const bytes = new Uint8Array(structuredReplyHeaderBytes);
  writeChunkHeader(bytes, 0, { flags: ReplyFlag.done, type: ReplyType.none, payloadBytes: 0 }, request);
  return bytes;
}

/** Bytes in front of READ data: a simple reply, or a chunk header plus the u64 offset. */
export function readReplyPrefixBytes(structuredReplies: boolean): number {
  return structuredReplies ? structuredReplyHeaderBytes + offsetDataPrefixBytes : simpleReplyBytes;
}

/**
 * Fills the prefix of a successful READ reply whose data already sits right behind it in
 * `target`: a simple reply, or a single OFFSET_DATA chunk flagged DONE (which also satisfies
 * DF). A zero-length read has no data to describe, so it is answered with NONE instead.
 */
export function writeReadReplyPrefix(target: Uint8Array, request: NbdRequest, structuredReplies: boolean): void {
  if (!structuredReplies) {
    writeSimpleReply(target, 0, NbdErrno.ok, request);
    return;
  }
  assert(request.lengthBytes > 0, 'OFFSET_DATA must carry at least one byte');
  const payloadBytes = offsetDataPrefixBytes + request.lengthBytes;
  writeChunkHeader(target, 0, { flags: ReplyFlag.done, type: ReplyType.offsetData, payloadBytes }, request);
  writeU64BE(target, structuredReplyHeaderBytes, request.offsetBytes);
}

/** NBD_REPLY_TYPE_ERROR with DONE, carrying a printable-ASCII message of bounded length. */
export function errorChunk(request: NbdRequest, errno: number, message: string): Uint8Array {
  assert(errno !== NbdErrno.ok, 'an error chunk needs a nonzero error');
  const text = printableAscii(message, errorMessageMaxBytes);
  const payloadBytes = errorChunkPrefixBytes + text.length;
  const bytes = new Uint8Array(structuredReplyHeaderBytes + payloadBytes);
  writeChunkHeader(bytes, 0, { flags: ReplyFlag.done, type: ReplyType.error, payloadBytes }, request);
  writeU32BE(bytes, structuredReplyHeaderBytes, errno);
  writeU16BE(bytes, structuredReplyHeaderBytes + 4, text.length);
  bytes.set(text, structuredReplyHeaderBytes + errorChunkPrefixBytes);
  return bytes;
}

/** Replies to a failed request in whichever form the connection negotiated. */
export function errorReply(request: NbdRequest, errno: number, message: string, structuredReplies: boolean): Uint8Array {
  return structuredReplies ? errorChunk(request, errno, message) : simpleReply(errno, request);
}

/**
 * One BLOCK_STATUS chunk (flagged DONE) for the extents an Export reported. Adjacent extents
 * with equal status are merged, REQ_ONE keeps only the first (clipped to the request), and at
 * most blockStatusDescriptorsMax descriptors are sent.
 */
export function blockStatusChunk(request: NbdRequest, contextId: number, extents: readonly BlockStatusExtent[]): Uint8Array {
  assert(extents.length > 0, 'blockStatus must describe at least one extent');
  const reqOne = request.hasFlag(CommandFlag.reqOne);
  const lengths: number[] = [];
  const states: number[] = [];
  let coveredBytes = 0;
  for (const extent of extents) {
    const length = extent.lengthBytes;
    assert(Number.isSafeInteger(length) && length > 0, 'extent length is not positive', length);
    assert(length % blockSizeMinimumBytes === 0, 'extent length is not a multiple of 512', length);
    coveredBytes += length;
    assert(coveredBytes <= request.lengthBytes, 'extents cover more than the requested range');
    const state = (extent.hole ? StateFlag.hole : 0) | (extent.zero ? StateFlag.zero : 0);
    const last = lengths.length - 1;
    if (last >= 0 && states[last] === state) {
      lengths[last] = (lengths[last] ?? 0) + length;
    } else {
      if (lengths.length === blockStatusDescriptorsMax) break;
      lengths.push(length);
      states.push(state);
    }
    if (reqOne) break;
  }
  const count = lengths.length;
  const payloadBytes = blockStatusPrefixBytes + count * blockDescriptorBytes;
  const bytes = new Uint8Array(structuredReplyHeaderBytes + payloadBytes);
  writeChunkHeader(bytes, 0, { flags: ReplyFlag.done, type: ReplyType.blockStatus, payloadBytes }, request);
  writeU32BE(bytes, structuredReplyHeaderBytes, contextId);
  for (let i = 0; i < count; i += 1) {
    const at = structuredReplyHeaderBytes + blockStatusPrefixBytes + i * blockDescriptorBytes;
    writeU32BE(bytes, at, lengths[i] ?? 0);
    writeU32BE(bytes, at + 4, states[i] ?? 0);
  }
  return bytes;
}

/** Encodes `text` as printable ASCII (other characters become '?'), cut to `maxBytes`. */
function printableAscii(text: string, maxBytes: number): Uint8Array {
  const length = Math.min(text.length, maxBytes);
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i += 1) {
    const code = text.charCodeAt(i);
    bytes[i] = code >= 0x20 && code < 0x7f ? code : 0x3f;
  }
  return bytes;
}
