// The server side of the fixed-newstyle handshake as a pure state machine: bytes in, reply
// bytes and a verdict out. A HandshakeMachine (handshake.ts, shared with the client side).
//
// No sockets and no clocks live here (the server owns the handshake time limit), so the same
// transcript fed in any chunking produces the same replies and the same verdict. The machine
// walks: client flags (4 bytes) -> option header (16) -> option data (length) -> option header
// ... until the client enters transmission (GO, EXPORT_NAME), aborts, or breaks a rule. Options
// are framed messages, read by HandshakeMachine.stepFrame; their replies come from optionReply.
//
// Exports: the machine serves whatever its ExportDirectory holds when an option asks, so a
// server may add and remove exports while clients negotiate. LIST shows every export; INFO, GO,
// EXPORT_NAME and the meta-context options name one (the empty name is the directory's default
// export, if it has one). A name the directory does not know is NBD_REP_ERR_UNKNOWN with a
// message, and haggling continues; EXPORT_NAME has no error reply, so an unknown name closes
// (proto.md). Names are compared as the UTF-8 strings the directory holds; bytes that are not
// UTF-8 name no export. The verdict "transmission" carries the export chosen, as the directory
// returned it, so the owner never looks it up again. A base:allocation selected by
// SET_META_CONTEXT for one export is dropped when GO or EXPORT_NAME picks another, since the
// spec allows BLOCK_STATUS only when the last SET named the export finally chosen.
//
// Invariants:
// - An option's data is buffered only after its length passed the cap (optionLengthMaxBytes),
//   so a length field from the wire never sizes an allocation beyond the cap.
// - Every length inside option data (names, info counts, query lengths) is checked against the
//   bytes actually present before it is used; a mismatch is NBD_REP_ERR_INVALID and haggling
//   continues, because the option's framing (its outer length) is intact.
// - Options we do not serve (EXTENDED_HEADERS, anything unknown, and STARTTLS when TLS is
//   off) are answered with NBD_REP_ERR_UNSUP after their data was consumed, so the next option
//   parses cleanly.
// - Once the verdict is "transmission" the machine stops reading: bytes after GO stay in
//   `input` for the transmission decoder. After "closed" it never produces output again.
//
// TLS (proto.md "TLS support"): the machine decides, its owner moves the bytes. With TLS 'off'
// the server is in NOTLS mode. With 'on' a client may send STARTTLS and is otherwise served in
// plaintext (SELECTIVETLS with no TLS-only export, nbdkit's --tls=on). With 'require'
// (FORCEDTLS, nbdkit's --tls=require) every option but STARTTLS and ABORT is answered
// NBD_REP_ERR_TLS_REQD until TLS is up, INFO and GO included, and EXPORT_NAME, which has no
// error reply, closes the connection: no export data and no export facts leave in plaintext.
// A STARTTLS that is accepted is answered ACK and the verdict becomes "starttls": the owner
// sends the ACK, starts TLS on the transport and calls tlsStarted(), and option haggling
// starts again inside TLS. Every negotiated state (structured replies, the meta context) is
// discarded then (CVE-2021-3716: a man in the middle must not be able to inject a plaintext
// option whose effect outlives the upgrade), and plaintext bytes that arrived behind the
// STARTTLS are never read as options: they close the connection instead (the injection of
// CVE-2011-0411, in NBD's terms). ERR_TLS_REQD is never sent once TLS is up, nor in 'on' mode.

import { assert } from '../../lib/assert.js';
import { writeU64BE } from '../../lib/units.js';
import { readU16BE, readU32BE, readU64BEBig, writeU16BE, writeU32BE, writeU64BEBig } from './bytes.js';
import {
  baseAllocationContextName,
  baseNamespacePrefix,
  blockSizeMinimumBytes,
  blockSizePreferredBytes,
  ClientFlag,
  clientFlagsBytes,
  exportNamePaddingBytes,
  exportNameReplyBytes,
  greetingBytes,
  HandshakeFlag,
  Info,
  infoBlockSizeBytes,
  infoExportBytes,
  maxPayloadBytes,
  nbdMagic,
  Option,
  optionHeaderBytes,
  optionMagic,
  OptionReply,
  stringMaxBytes,
  TransmissionFlag,
} from './constants.js';
import { exportNameBytes, HandshakeMachine, optionReply, type TransmissionTerms } from './handshake.js';
import { descriptionBytes, type ExportDirectory, findExport, type OfferedExport, serverReplyData, unknownExportMessage } from './handshake_exports.js';

/** The id under which base:allocation is selected (any u32 works; 0 is avoided for clarity). */
export const baseAllocationContextId = 1;
/** Most queries accepted in one LIST/SET_META_CONTEXT; more gets NBD_REP_ERR_TOO_BIG. */
export const metaContextQueriesMax = 64;

/** TLS on a connection: never, at the client's choice, or before anything else (see above). */
export type TlsMode = 'off' | 'on' | 'require';

export interface HandshakeConfig<E extends OfferedExport = OfferedExport> {
  readonly exports: ExportDirectory<E>;
  /** Advertise NBD_FLAG_NO_ZEROES (clients may then skip the 124 padding bytes). */
  readonly offerNoZeroes: boolean;
  /** Accept NBD_OPT_STRUCTURED_REPLY; when false it is refused as unsupported. */
  readonly offerStructuredReplies: boolean;
  /** Largest option data accepted; a longer option is a hard disconnect. */
  readonly optionLengthMaxBytes: number;
  /** Most options accepted on one connection; one more is a hard disconnect. */
  readonly optionsMax: number;
  /** Whether STARTTLS is accepted, and whether it is required before anything else (default 'off'). */
  readonly tls?: TlsMode;
}

/** What the client and server agreed on, handed to the transmission phase. */
export interface Negotiated<E extends OfferedExport = OfferedExport> extends TransmissionTerms {
  /** The export the client chose, as the directory returned it. */
  readonly export: E;
  /** The context id for BLOCK_STATUS when the client selected base:allocation, else undefined. */
  readonly baseAllocationContextId: number | undefined;
}

export type HandshakeVerdict<E extends OfferedExport = OfferedExport> =
  | { readonly kind: 'negotiating' }
  | { readonly kind: 'transmission'; readonly negotiated: Negotiated<E> }
  /** STARTTLS was acknowledged (the ACK is in the output): start TLS, then call tlsStarted(). */
  | { readonly kind: 'starttls' }
  /** `violation`: the client broke a rule (as opposed to aborting or naming an unknown export). */
  | { readonly kind: 'closed'; readonly reason: string; readonly violation: boolean };

type Stage = 'clientFlags' | 'options';

const negotiating = { kind: 'negotiating' } as const;
const textEncoder = new TextEncoder();

export class Handshake<E extends OfferedExport = OfferedExport> extends HandshakeMachine<HandshakeVerdict<E>> {
  private readonly config: HandshakeConfig<E>;
  /** The export the last successful SET_META_CONTEXT named (its directory name). */
  private metaContextExport: string | undefined;
  private stage: Stage = 'clientFlags';
  private clientNoZeroes = false;
  private structuredReplies = false;
  private baseAllocationSelected = false;
  private optionCount = 0;
  private pendingOption = 0;
  private readonly tlsMode: TlsMode;
  private tlsUp = false;

  constructor(config: HandshakeConfig<E>) {
    // After GO the bytes belong to the transmission phase; after a close they are dropped.
    super(negotiating, 'closed');
    assert(config.optionLengthMaxBytes >= stringMaxBytes + 6, 'option cap must fit a maximal INFO/GO');
    assert(config.optionsMax >= 1, 'at least one option must be allowed');
    this.config = config;
    this.tlsMode = config.tls ?? 'off';
  }

  /** TLS has been started on this connection (tlsStarted was called). */
  get tlsActive(): boolean {
    return this.tlsUp;
  }

  /**
   * Plaintext bytes after an acknowledged STARTTLS are never options: the client had to wait
   * for the ACK and then start TLS, so whatever came is injected or broken, and closes.
   */
  override push(chunk: Uint8Array, out: Uint8Array[]): HandshakeVerdict<E> {
    if (this.verdict.kind === 'starttls') {
      this.close('plaintext bytes after STARTTLS was acknowledged');
      return this.verdict;
    }
    return super.push(chunk, out);
  }

  /**
   * The owner has started TLS after a "starttls" verdict: option haggling begins again, inside
   * TLS, with nothing kept of what was negotiated before (proto.md NBD_OPT_STARTTLS).
   */
  tlsStarted(): void {
    assert(this.verdict.kind === 'starttls', 'tlsStarted without an acknowledged STARTTLS');
    assert(this.input.length === 0, 'plaintext bytes queued across the TLS upgrade');
    this.tlsUp = true;
    this.structuredReplies = false;
    this.baseAllocationSelected = false;
    this.metaContextExport = undefined;
    this.verdict = negotiating;
  }

  /** The 18 bytes the server sends as soon as a client connects. */
  greeting(): Uint8Array {
    const bytes = new Uint8Array(greetingBytes);
    writeU64BEBig(bytes, 0, nbdMagic);
    writeU64BEBig(bytes, 8, optionMagic);
    writeU16BE(bytes, 16, this.handshakeFlags());
    return bytes;
  }

  protected step(out: Uint8Array[]): boolean {
    if (this.verdict.kind !== 'negotiating') return false;
    switch (this.stage) {
      case 'clientFlags': {
        if (this.input.length < clientFlagsBytes) return false;
        this.receiveClientFlags(readU32BE(this.input.take(clientFlagsBytes), 0));
        return true;
      }
      case 'options':
        return this.stepFrame(optionHeaderBytes, out);
    }
  }

  private receiveClientFlags(flags: number): void {
    const known = ClientFlag.fixedNewstyle | ClientFlag.noZeroes;
    // proto.md: "the server MUST drop the TCP connection if the client sets an unknown flag,
    // or a flag that does not match something advertised by the server".
    if ((flags & ~known) !== 0) return this.close(`unknown client flags 0x${flags.toString(16)}`);
    const noZeroes = (flags & ClientFlag.noZeroes) !== 0;
    if (noZeroes && !this.config.offerNoZeroes) return this.close('client set NO_ZEROES, which was not advertised');
    this.clientNoZeroes = noZeroes;
    this.stage = 'options';
  }

  /** An option header: returns the length of the option's data. */
  protected receiveFrameHeader(header: Uint8Array): number | undefined {
    if (readU64BEBig(header, 0) !== optionMagic) return this.close('bad option magic');
    this.optionCount += 1;
    if (this.optionCount > this.config.optionsMax) return this.close(`more than ${this.config.optionsMax} options`);
    const lengthBytes = readU32BE(header, 12);
    // CVE-2017-15119: never read (or allocate) an unbounded option.
    if (lengthBytes > this.config.optionLengthMaxBytes) {
      return this.close(`option length ${lengthBytes} exceeds ${this.config.optionLengthMaxBytes}`);
    }
    this.pendingOption = readU32BE(header, 8);
    return lengthBytes;
  }

  protected receiveFrame(data: Uint8Array, out: Uint8Array[]): void {
    this.receiveOption(this.pendingOption, data, out);
  }

  private receiveOption(option: number, data: Uint8Array, out: Uint8Array[]): void {
    if (this.tlsMode === 'require' && !this.tlsUp && option !== Option.startTls && option !== Option.abort) {
      // FORCEDTLS: EXPORT_NAME cannot be refused with an error reply, so it ends the session.
      if (option === Option.exportName) return this.close('EXPORT_NAME without TLS, which this server requires', false);
      return this.refuse(out, option, OptionReply.errTlsReqd, 'TLS is required: send NBD_OPT_STARTTLS first');
    }
    switch (option) {
      case Option.exportName:
        return this.exportName(data, out);
      case Option.abort:
        // Reply ACK, then close; the client may well have gone already (proto.md NBD_OPT_ABORT).
        out.push(optionReply(option, OptionReply.ack));
        return this.close('client aborted', false);
      case Option.list:
        return this.list(data, out);
      case Option.info:
      case Option.go:
        return this.infoOrGo(option, data, out);
      case Option.structuredReply:
        return this.structuredReply(data, out);
      case Option.listMetaContext:
      case Option.setMetaContext:
        return this.metaContext(option, data, out);
      case Option.startTls:
        return this.startTls(data, out);
      default:
        // EXTENDED_HEADERS and every unknown option.
        return this.refuse(out, option, OptionReply.errUnsup, 'option not supported');
    }
  }

  private startTls(data: Uint8Array, out: Uint8Array[]): void {
    const option = Option.startTls;
    // NOTLS: the option is not supported at all, whatever its data.
    if (this.tlsMode === 'off') return this.refuse(out, option, OptionReply.errUnsup, 'TLS is not enabled on this server');
    if (data.length !== 0) return this.refuse(out, option, OptionReply.errInvalid, 'STARTTLS takes no data');
    if (this.tlsUp) return this.refuse(out, option, OptionReply.errInvalid, 'TLS is already active');
    // The client must wait for the ACK before it starts TLS: anything behind the option was
    // sent in plaintext and must not be read as TLS, nor as options.
    if (this.input.length > 0) return this.close('bytes sent behind STARTTLS before its reply');
    out.push(optionReply(option, OptionReply.ack));
    this.verdict = { kind: 'starttls' };
  }

  private exportName(name: Uint8Array, out: Uint8Array[]): void {
    // This option has no error reply: the only refusal is to close (proto.md).
    if (name.length > stringMaxBytes) return this.close('export name too long');
    const chosen = this.lookup(name);
    if (chosen === undefined) return this.close('unknown export name', false);
    const padding = this.clientNoZeroes ? 0 : exportNamePaddingBytes;
    const reply = new Uint8Array(exportNameReplyBytes + padding);
    const negotiated = this.negotiated(chosen, true);
    writeU64BE(reply, 0, negotiated.sizeBytes);
    writeU16BE(reply, 8, negotiated.transmissionFlags);
    out.push(reply);
    this.verdict = { kind: 'transmission', negotiated };
  }

  private list(data: Uint8Array, out: Uint8Array[]): void {
    if (data.length !== 0) return this.refuse(out, Option.list, OptionReply.errInvalid, 'LIST takes no data');
    // One SERVER reply per export: the name, then the description as the human-readable rest.
    for (const offered of this.config.exports.list()) out.push(optionReply(Option.list, OptionReply.server, serverReplyData(offered)));
    out.push(optionReply(Option.list, OptionReply.ack));
  }

  /**
   * INFO and GO data: u32 name length, name, u16 request count, count x u16 info types.
   */
  private infoOrGo(option: number, data: Uint8Array, out: Uint8Array[]): void {
    const fixedBytes = 4 + 2;
    if (data.length < fixedBytes) return this.refuse(out, option, OptionReply.errInvalid, 'option data too short');
    const nameLength = readU32BE(data, 0);
    if (nameLength > data.length - fixedBytes) {
      return this.refuse(out, option, OptionReply.errInvalid, 'name length exceeds option length');
    }
    if (nameLength > stringMaxBytes) return this.refuse(out, option, OptionReply.errInvalid, 'export name too long');
    const name = data.subarray(4, 4 + nameLength);
    const requestCount = readU16BE(data, 4 + nameLength);
    if (data.length !== fixedBytes + nameLength + 2 * requestCount) {
      return this.refuse(out, option, OptionReply.errInvalid, 'information request count does not match the option length');
    }
    const requested = new Set<number>();
    for (let i = 0; i < requestCount; i += 1) requested.add(readU16BE(data, fixedBytes + nameLength + 2 * i));
    const chosen = this.lookup(name);
    if (chosen === undefined) return this.refuse(out, option, OptionReply.errUnknown, unknownExportMessage(name));

    const negotiated = this.negotiated(chosen, option === Option.go);
    const exportInfo = new Uint8Array(infoExportBytes);
    writeU16BE(exportInfo, 0, Info.export);
    writeU64BE(exportInfo, 2, negotiated.sizeBytes);
    writeU16BE(exportInfo, 10, negotiated.transmissionFlags);
    out.push(optionReply(option, OptionReply.info, exportInfo));
    if (requested.has(Info.name)) out.push(optionReply(option, OptionReply.info, infoString(Info.name, exportNameBytes(chosen.name))));
    if (requested.has(Info.description) && chosen.description !== undefined) {
      out.push(optionReply(option, OptionReply.info, infoString(Info.description, descriptionBytes(chosen))));
    }
    // Always sent: our minimum (512) differs from the protocol default (1), and the spec says
    // a server with non-default constraints MUST advertise them.
    const blockSize = new Uint8Array(infoBlockSizeBytes);
    writeU16BE(blockSize, 0, Info.blockSize);
    writeU32BE(blockSize, 2, blockSizeMinimumBytes);
    writeU32BE(blockSize, 6, blockSizePreferredBytes);
    writeU32BE(blockSize, 10, maxPayloadBytes);
    out.push(optionReply(option, OptionReply.info, blockSize));
    out.push(optionReply(option, OptionReply.ack));
    if (option === Option.go) this.verdict = { kind: 'transmission', negotiated };
  }

  private structuredReply(data: Uint8Array, out: Uint8Array[]): void {
    const option = Option.structuredReply;
    if (data.length !== 0) return this.refuse(out, option, OptionReply.errInvalid, 'STRUCTURED_REPLY takes no data');
    if (!this.config.offerStructuredReplies) return this.refuse(out, option, OptionReply.errUnsup, 'structured replies are disabled');
    // Repeating a state-changing option is refused, deterministically (docs/nbd.md, hostile inputs, row 10).
    if (this.structuredReplies) return this.refuse(out, option, OptionReply.errInvalid, 'structured replies already negotiated');
    this.structuredReplies = true;
    out.push(optionReply(option, OptionReply.ack));
  }

  /**
   * LIST_META_CONTEXT and SET_META_CONTEXT data: u32 name length, name, u32 query count, then
   * count x (u32 query length, query). Only base:allocation exists here.
   */
  private metaContext(option: number, data: Uint8Array, out: Uint8Array[]): void {
    const isSet = option === Option.setMetaContext;
    // SET replaces the previous selection even when it fails (proto.md).
    if (isSet) this.baseAllocationSelected = false;
    if (!this.structuredReplies) {
      return this.refuse(out, option, OptionReply.errInvalid, 'negotiate structured replies first');
    }
    const parsed = parseMetaContextData(data);
    if (typeof parsed === 'string') {
      const type = parsed === tooManyQueries ? OptionReply.errTooBig : OptionReply.errInvalid;
      return this.refuse(out, option, type, parsed);
    }
    const chosen = this.lookup(parsed.name);
    if (chosen === undefined) return this.refuse(out, option, OptionReply.errUnknown, unknownExportMessage(parsed.name));

    // SET with no query selects nothing, and "base:" alone is ignored during SET; LIST with no
    // query lists everything, and "base:" is a wildcard for the base namespace (proto.md).
    const matched = isSet
      ? parsed.queries.some((query) => query === baseAllocationContextName)
      : parsed.queries.length === 0 ||
        parsed.queries.some((query) => query === baseAllocationContextName || query === baseNamespacePrefix);
    if (matched) {
      const nameBytes = textEncoder.encode(baseAllocationContextName);
      const payload = new Uint8Array(4 + nameBytes.length);
      // LIST replies carry id 0 ("reserved"); SET replies carry the id BLOCK_STATUS will use.
      writeU32BE(payload, 0, isSet ? baseAllocationContextId : 0);
      payload.set(nameBytes, 4);
      out.push(optionReply(option, OptionReply.metaContext, payload));
    }
    if (isSet) {
      this.baseAllocationSelected = matched;
      this.metaContextExport = chosen.name;
    }
    out.push(optionReply(option, OptionReply.ack));
  }

  /**
   * The terms for `chosen`. `final` (GO, EXPORT_NAME): the export is the one transmission will
   * serve, so a meta context selected for another export does not carry over (proto.md).
   */
  private negotiated(chosen: E, final: boolean): Negotiated<E> {
    let flags = TransmissionFlag.hasFlags | TransmissionFlag.sendFlush | TransmissionFlag.sendFua |
      TransmissionFlag.sendCache | TransmissionFlag.canMultiConn;
    if (chosen.readOnly) {
      flags |= TransmissionFlag.readOnly;
    } else {
      flags |= TransmissionFlag.sendTrim | TransmissionFlag.sendWriteZeroes | TransmissionFlag.sendFastZero;
    }
    // DF "MUST" stay clear unless structured replies were negotiated.
    if (this.structuredReplies) flags |= TransmissionFlag.sendDf;
    const sizeBytes = chosen.sizeBytes;
    assert(Number.isSafeInteger(sizeBytes) && sizeBytes >= 0 && sizeBytes % blockSizeMinimumBytes === 0, `export ${chosen.name} has size ${sizeBytes}`);
    const contextSelected = this.baseAllocationSelected && (!final || this.metaContextExport === chosen.name);
    return {
      export: chosen,
      sizeBytes,
      transmissionFlags: flags,
      structuredReplies: this.structuredReplies,
      baseAllocationContextId: contextSelected ? baseAllocationContextId : undefined,
    };
  }

  /** The export a client named, or undefined when the directory has none by that name. */
  private lookup(name: Uint8Array): E | undefined {
    return findExport(this.config.exports, name);
  }

  private handshakeFlags(): number {
    return HandshakeFlag.fixedNewstyle | (this.config.offerNoZeroes ? HandshakeFlag.noZeroes : 0);
  }

  /** Answers an option with an error reply; haggling continues. */
  private refuse(out: Uint8Array[], option: number, type: number, message: string): void {
    out.push(optionError(option, type, message));
  }

  /** Ends negotiation with a close; undefined so that receiveFrameHeader can return it. */
  private close(reason: string, violation = true): undefined {
    this.verdict = { kind: 'closed', reason, violation };
    this.input.clear();
    return undefined;
  }
}

const tooManyQueries = `more than ${metaContextQueriesMax} queries`;

/** Parses meta-context option data; returns a problem description when it is malformed. */
function parseMetaContextData(data: Uint8Array): { name: Uint8Array; queries: string[] } | string {
  if (data.length < 8) return 'option data too short';
  const nameLength = readU32BE(data, 0);
  if (nameLength > data.length - 8) return 'name length exceeds option length';
  if (nameLength > stringMaxBytes) return 'export name too long';
  const name = data.subarray(4, 4 + nameLength);
  const queryCount = readU32BE(data, 4 + nameLength);
  let position = 8 + nameLength;
  // Each query needs at least its 4-byte length, so a count beyond that is malformed.
  if (queryCount > (data.length - position) / 4) return 'query count exceeds option length';
  if (queryCount > metaContextQueriesMax) return tooManyQueries;
  const queries: string[] = [];
  const decoder = new TextDecoder('utf-8', { fatal: false });
  for (let i = 0; i < queryCount; i += 1) {
    if (data.length - position < 4) return 'query length missing';
    const queryLength = readU32BE(data, position);
    position += 4;
    if (queryLength > data.length - position) return 'query length exceeds option length';
    if (queryLength > stringMaxBytes) return 'query too long';
    queries.push(decoder.decode(data.subarray(position, position + queryLength)));
    position += queryLength;
  }
  if (position !== data.length) return 'trailing bytes after the last query';
  return { name, queries };
}

function infoString(type: number, text: Uint8Array): Uint8Array {
  const payload = new Uint8Array(2 + text.length);
  writeU16BE(payload, 0, type);
  payload.set(text, 2);
  return payload;
}

/** An error reply carrying a message for humans (the spec allows one on every error type). */
function optionError(option: number, type: number, message: string): Uint8Array {
  return optionReply(option, type, textEncoder.encode(message));
}
