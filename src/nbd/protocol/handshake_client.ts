// The client side of the fixed-newstyle handshake as a pure state machine: the server's bytes
// in, the client's bytes and a verdict out. The mirror image of handshake_server.ts, and like
// it a HandshakeMachine (handshake.ts).
//
// The client walks: greeting (18 bytes) -> client flags -> [STARTTLS -> "starttls" verdict,
// the owner starts TLS and calls tlsStarted()] -> STRUCTURED_REPLY (when asked for) -> GO with
// an INFO_BLOCK_SIZE request -> transmission. With TLS asked for, STARTTLS is the first option
// (proto.md: a client that wants TLS SHOULD send it first, so that nothing is negotiated in
// plaintext), and any answer but ACK fails the connection: an nbds:// URI never falls back to
// plaintext. A server that answers GO with
// ERR_UNSUP predates GO: the client falls back to EXPORT_NAME, whose reply is the size, the
// transmission flags and (unless NO_ZEROES was agreed) 124 zero bytes. Each option is sent
// only after the final reply to the previous one (proto.md: the client waits).
//
// Invariants:
// - No sockets, no clocks: the same server transcript in any chunking yields the same client
//   bytes and the same verdict (the connection owns the time limit).
// - An option reply's data is buffered only after its length passed optionReplyLengthMaxBytes;
//   every field inside it is checked against the bytes present before it is read.
// - A reply to an option we did not send, a reply type that makes no sense for the option, a
//   bad magic, an oldstyle server, a GO that ends without NBD_INFO_EXPORT, or bytes behind the
//   STARTTLS acknowledgement (they would be plaintext read as if TLS protected them) is a
//   protocol violation: the verdict is 'failed' and nothing more is read or written.
// - 64-bit sizes become numbers only through readU64BE; a size of 2^53 or more fails.

import { assert } from '../../lib/assert.js';
import type { PcacheErrorCode } from '../../lib/errors.js';
import { KiB, readU64BE } from '../../lib/units.js';
import { readU16BE, readU32BE, readU64BEBig, writeU16BE, writeU32BE } from './bytes.js';
import {
  ClientFlag,
  clientFlagsBytes,
  exportNamePaddingBytes,
  exportNameReplyBytes,
  greetingBytes,
  HandshakeFlag,
  Info,
  infoBlockSizeBytes,
  infoExportBytes,
  nbdMagic,
  Option,
  optionMagic,
  OptionReply,
  optionReplyHeaderBytes,
  optionReplyMagic,
  stringMaxBytes,
} from './constants.js';
import { exportNameBytes, HandshakeMachine, option, type TransmissionTerms } from './handshake.js';

/** Longest option reply accepted: INFO replies are at most 2 + 4096 bytes; error texts are short. */
export const optionReplyLengthMaxBytes = 64 * KiB;
/** Most option replies read in one negotiation (a GO answers with a few INFOs and an ACK). */
export const optionRepliesMax = 64;
/** Largest block-size minimum the protocol allows (proto.md "Block size constraints"). */
const blockSizeMinimumMaxBytes = 64 * KiB;
/** "Oldstyle" servers send this instead of IHAVEOPT after NBDMAGIC. */
const oldstyleMagic = 0x00420281861253n;
/** Longest server message quoted in an error of ours. */
const quotedMessageMaxChars = 200;

export interface ClientHandshakeConfig {
  readonly exportName: string;
  /** Ask for structured replies (the client still copes when the server says no). */
  readonly requestStructuredReplies: boolean;
  /** Send STARTTLS first and require the server to accept it (default false). */
  readonly startTls?: boolean;
}

/** The server's block-size constraints from NBD_INFO_BLOCK_SIZE. */
export interface BlockSizeConstraints {
  readonly minimumBytes: number;
  readonly preferredBytes: number;
  /** 0xffffffff means "no limit" in the protocol. */
  readonly maximumBytes: number;
}

/** What the handshake established about the export and the connection. */
export interface ExportInfo extends TransmissionTerms {
  /** Undefined when the server sent none (EXPORT_NAME, or a server without INFO_BLOCK_SIZE). */
  readonly blockSize: BlockSizeConstraints | undefined;
  readonly negotiatedWith: 'go' | 'export-name';
}

export type ClientHandshakeVerdict =
  | { readonly kind: 'negotiating' }
  | { readonly kind: 'ready'; readonly info: ExportInfo }
  /** The server acknowledged STARTTLS: start TLS on the transport, then call tlsStarted(). */
  | { readonly kind: 'starttls' }
  | { readonly kind: 'failed'; readonly code: PcacheErrorCode; readonly reason: string };

type Stage = 'greeting' | 'replies' | 'tls' | 'exportNameReply' | 'done';

const negotiating: ClientHandshakeVerdict = { kind: 'negotiating' };
const textDecoder = new TextDecoder('utf-8', { fatal: false });

export class ClientHandshake extends HandshakeMachine<ClientHandshakeVerdict> {
  private readonly config: ClientHandshakeConfig;
  private readonly exportNameBytes: Uint8Array;
  private stage: Stage = 'greeting';
  private noZeroes = false;
  private structuredReplies = false;
  /** The option whose replies we are reading. */
  private currentOption = 0;
  private pendingType = 0;
  private repliesRead = 0;
  private exportSizeBytes: number | undefined;
  private exportFlags = 0;
  private blockSize: BlockSizeConstraints | undefined;

  constructor(config: ClientHandshakeConfig) {
    // After 'ready' the bytes belong to the transmission phase; after 'failed' they are dropped.
    super(negotiating, 'failed');
    this.config = config;
    this.exportNameBytes = exportNameBytes(config.exportName);
  }

  protected step(out: Uint8Array[]): boolean {
    if (this.verdict.kind !== 'negotiating') return false;
    switch (this.stage) {
      case 'greeting': {
        if (this.input.length < greetingBytes) return false;
        this.receiveGreeting(this.input.take(greetingBytes), out);
        return true;
      }
      case 'replies':
        return this.stepFrame(optionReplyHeaderBytes, out);
      case 'tls':
        // Nothing is read until the owner has started TLS (tlsStarted).
        return false;
      case 'exportNameReply': {
        const paddingBytes = this.noZeroes ? 0 : exportNamePaddingBytes;
        if (this.input.length < exportNameReplyBytes + paddingBytes) return false;
        const reply = this.input.take(exportNameReplyBytes);
        // The padding is meaningless; skip it without copying.
        this.input.skip(paddingBytes);
        this.exportSizeBytes = readU64BE(reply, 0);
        this.exportFlags = readU16BE(reply, 8);
        this.finish('export-name');
        return true;
      }
      case 'done':
        return false;
    }
  }

  private receiveGreeting(greeting: Uint8Array, out: Uint8Array[]): void {
    if (readU64BEBig(greeting, 0) !== nbdMagic) return this.fail('EIO', 'the server did not greet with NBDMAGIC: not an NBD server');
    const second = readU64BEBig(greeting, 8);
    if (second === oldstyleMagic) return this.fail('ENOTSUP', 'the server speaks oldstyle negotiation, which is not supported');
    if (second !== optionMagic) return this.fail('EIO', 'the server greeting lacks IHAVEOPT');
    const flags = readU16BE(greeting, 16);
    if ((flags & HandshakeFlag.fixedNewstyle) === 0) {
      return this.fail('ENOTSUP', 'the server does not offer fixed newstyle negotiation');
    }
    this.noZeroes = (flags & HandshakeFlag.noZeroes) !== 0;
    // Only flags the server offered are set; setting anything else obliges it to hang up.
    out.push(clientFlags(ClientFlag.fixedNewstyle | (this.noZeroes ? ClientFlag.noZeroes : 0)));
    if (this.config.startTls === true) this.sendOption(Option.startTls, new Uint8Array(0), out);
    else this.sendFirstOption(out);
  }

  /**
   * The owner has started TLS after a "starttls" verdict: negotiation goes on inside TLS,
   * from its first option; what this side sends next is appended to `out`.
   */
  tlsStarted(out: Uint8Array[]): void {
    assert(this.verdict.kind === 'starttls' && this.stage === 'tls', 'tlsStarted without an acknowledged STARTTLS');
    this.verdict = negotiating;
    this.sendFirstOption(out);
  }

  /** The first option of the negotiation proper (inside TLS when TLS was asked for). */
  private sendFirstOption(out: Uint8Array[]): void {
    if (this.config.requestStructuredReplies) this.sendOption(Option.structuredReply, new Uint8Array(0), out);
    else this.sendGo(out);
  }

  /** An option reply header: returns the length of the reply's data. */
  protected receiveFrameHeader(header: Uint8Array): number | undefined {
    if (readU64BEBig(header, 0) !== optionReplyMagic) return this.fail('EIO', 'bad option reply magic');
    const option = readU32BE(header, 8);
    if (option !== this.currentOption) return this.fail('EIO', `reply to option ${option}, but option ${this.currentOption} was sent`);
    this.repliesRead += 1;
    if (this.repliesRead > optionRepliesMax) return this.fail('EIO', `more than ${optionRepliesMax} option replies`);
    const lengthBytes = readU32BE(header, 16);
    if (lengthBytes > optionReplyLengthMaxBytes) {
      return this.fail('EIO', `option reply of ${lengthBytes} bytes exceeds ${optionReplyLengthMaxBytes}`);
    }
    this.pendingType = readU32BE(header, 12);
    return lengthBytes;
  }

  protected receiveFrame(data: Uint8Array, out: Uint8Array[]): void {
    this.receiveReply(this.pendingType, data, out);
  }

  private receiveReply(type: number, data: Uint8Array, out: Uint8Array[]): void {
    if (this.currentOption === Option.startTls) return this.startTlsReply(type, data);
    if (this.currentOption === Option.structuredReply) return this.structuredReplyReply(type, data, out);
    assert(this.currentOption === Option.go, 'replies are only awaited for STARTTLS, STRUCTURED_REPLY and GO');
    return this.goReply(type, data, out);
  }

  private startTlsReply(type: number, data: Uint8Array): void {
    if (type === OptionReply.ack) {
      if (data.length !== 0) return this.fail('EIO', 'ACK to STARTTLS carries data');
      // The server must say nothing more in plaintext: TLS starts right after the ACK.
      if (this.input.length > 0) return this.fail('EIO', 'the server sent bytes behind its STARTTLS acknowledgement');
      this.stage = 'tls';
      this.verdict = { kind: 'starttls' };
      return;
    }
    if (!isErrorReply(type)) return this.fail('EIO', `unexpected reply type 0x${type.toString(16)} to STARTTLS`);
    const message = quote(data);
    if (type === OptionReply.errUnsup || type === OptionReply.errPolicy) {
      return this.fail('ENOTSUP', `the server does not offer TLS (it refused STARTTLS), and an nbds:// URI requires it${message}`);
    }
    return this.fail('EIO', `the server refused STARTTLS with reply type 0x${type.toString(16)}${message}`);
  }

  private structuredReplyReply(type: number, data: Uint8Array, out: Uint8Array[]): void {
    if (type === OptionReply.ack) {
      if (data.length !== 0) return this.fail('EIO', 'ACK to STRUCTURED_REPLY carries data');
      this.structuredReplies = true;
    } else if (!isErrorReply(type)) {
      return this.fail('EIO', `unexpected reply type 0x${type.toString(16)} to STRUCTURED_REPLY`);
    }
    // Any refusal just means simple replies; negotiation goes on.
    this.sendGo(out);
  }

  private goReply(type: number, data: Uint8Array, out: Uint8Array[]): void {
    if (type === OptionReply.info) return this.infoReply(data);
    if (type === OptionReply.ack) {
      if (this.exportSizeBytes === undefined) return this.fail('EIO', 'GO was acknowledged without NBD_INFO_EXPORT');
      return this.finish('go');
    }
    if (type === OptionReply.errUnsup) {
      // A server from before OPT_GO: the legacy EXPORT_NAME has no error reply but works.
      this.exportSizeBytes = undefined;
      this.blockSize = undefined;
      this.currentOption = Option.exportName;
      out.push(option(Option.exportName, this.exportNameBytes));
      this.stage = 'exportNameReply';
      return;
    }
    const message = quote(data);
    switch (type) {
      case OptionReply.errUnknown:
        return this.fail('EINVAL', `the server has no export named "${this.config.exportName}"${message}`);
      case OptionReply.errTlsReqd:
        return this.fail('ENOTSUP', `the server requires TLS: connect with nbds:// or nbds+unix:// and its credentials${message}`);
      case OptionReply.errPolicy:
        return this.fail('EPERM', `the server refused the export by policy${message}`);
      case OptionReply.errShutdown:
        return this.fail('ENODEV', `the server is shutting down${message}`);
      default:
        return this.fail('EIO', `the server refused GO with reply type 0x${type.toString(16)}${message}`);
    }
  }

  private infoReply(data: Uint8Array): void {
    if (data.length < 2) return this.fail('EIO', 'NBD_REP_INFO shorter than its type field');
    const infoType = readU16BE(data, 0);
    if (infoType === Info.export) {
      if (data.length !== infoExportBytes) return this.fail('EIO', `NBD_INFO_EXPORT of ${data.length} bytes, not ${infoExportBytes}`);
      this.exportSizeBytes = readU64BE(data, 2);
      this.exportFlags = readU16BE(data, 10);
    } else if (infoType === Info.blockSize) {
      if (data.length !== infoBlockSizeBytes) {
        return this.fail('EIO', `NBD_INFO_BLOCK_SIZE of ${data.length} bytes, not ${infoBlockSizeBytes}`);
      }
      const constraints = { minimumBytes: readU32BE(data, 2), preferredBytes: readU32BE(data, 6), maximumBytes: readU32BE(data, 10) };
      const problem = blockSizeProblem(constraints);
      if (problem !== undefined) return this.fail('EIO', `invalid block size constraints: ${problem}`);
      this.blockSize = constraints;
    }
    // NAME, DESCRIPTION and types from later protocol versions are not needed: ignored.
  }

  private finish(negotiatedWith: ExportInfo['negotiatedWith']): void {
    const sizeBytes = this.exportSizeBytes;
    assert(sizeBytes !== undefined, 'finish without an export size');
    if (!Number.isSafeInteger(sizeBytes)) return this.fail('EINVAL', 'the export is larger than 2^53 bytes');
    this.stage = 'done';
    this.verdict = {
      kind: 'ready',
      info: {
        sizeBytes,
        transmissionFlags: this.exportFlags,
        structuredReplies: this.structuredReplies,
        blockSize: this.blockSize,
        negotiatedWith,
      },
    };
  }

  private sendGo(out: Uint8Array[]): void {
    this.sendOption(Option.go, goData(this.exportNameBytes, [Info.blockSize]), out);
  }

  private sendOption(code: number, data: Uint8Array, out: Uint8Array[]): void {
    this.currentOption = code;
    this.stage = 'replies';
    out.push(option(code, data));
  }

  /** Ends negotiation with a failure; undefined so that receiveFrameHeader can return it. */
  private fail(code: PcacheErrorCode, reason: string): undefined {
    this.verdict = { kind: 'failed', code, reason };
    this.stage = 'done';
    this.input.clear();
    return undefined;
  }
}

// --- Encoders (pure; exported for tests and for the connection; option() is in handshake.ts) ---

export function clientFlags(flags: number): Uint8Array {
  const bytes = new Uint8Array(clientFlagsBytes);
  writeU32BE(bytes, 0, flags);
  return bytes;
}

/** INFO/GO data: u32 name length, name, u16 request count, count x u16 info types. */
export function goData(exportName: Uint8Array, infoTypes: readonly number[]): Uint8Array {
  assert(exportName.length <= stringMaxBytes, 'export name longer than the protocol allows');
  const bytes = new Uint8Array(4 + exportName.length + 2 + 2 * infoTypes.length);
  writeU32BE(bytes, 0, exportName.length);
  bytes.set(exportName, 4);
  writeU16BE(bytes, 4 + exportName.length, infoTypes.length);
  infoTypes.forEach((type, i) => { writeU16BE(bytes, 4 + exportName.length + 2 + 2 * i, type); });
  return bytes;
}

/** Checks NBD_INFO_BLOCK_SIZE against proto.md "Block size constraints"; a message when broken. */
export function blockSizeProblem(constraints: BlockSizeConstraints): string | undefined {
  const { minimumBytes, preferredBytes, maximumBytes } = constraints;
  if (!isPowerOfTwo(minimumBytes) || minimumBytes > blockSizeMinimumMaxBytes) {
    return `minimum ${minimumBytes} is not a power of two up to ${blockSizeMinimumMaxBytes}`;
  }
  if (!isPowerOfTwo(preferredBytes) || preferredBytes < minimumBytes) {
    return `preferred ${preferredBytes} is not a power of two at least the minimum ${minimumBytes}`;
  }
  if (maximumBytes !== 0xffff_ffff && (maximumBytes < minimumBytes || maximumBytes % minimumBytes !== 0)) {
    return `maximum ${maximumBytes} is not a multiple of the minimum ${minimumBytes}`;
  }
  return undefined;
}

function isPowerOfTwo(value: number): boolean {
  return value > 0 && (value & (value - 1)) === 0;
}

function isErrorReply(type: number): boolean {
  return type >= 0x8000_0000;
}

/** A server's error text, made printable and short, ready to append to our own message. */
function quote(data: Uint8Array): string {
  if (data.length === 0) return '';
  // eslint-disable-next-line no-control-regex
  const text = textDecoder.decode(data).replace(/[\u0000-\u001f\u007f]/g, '?').slice(0, quotedMessageMaxChars);
  return `: "${text}"`;
}
