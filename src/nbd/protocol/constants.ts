// NBD protocol constants: magics, handshake flags, options, option replies, info types,
// commands, command flags, transmission flags, reply chunk types and error numbers.
//
// Every value comes from the NBD protocol specification (NetworkBlockDevice/nbd doc/proto.md,
// "fixed newstyle negotiation" and "Values"); the section a constant belongs to is named above
// its group. All integers travel big-endian. Message sizes are named with their unit so that
// codec code never spells a bare 16 or 28. This file holds values only: no logic, no imports.

// --- Magics (proto.md "Handshake", "Transmission") ---

/** "NBDMAGIC", the first 8 bytes the server sends. */
export const nbdMagic = 0x4e42444d41474943n;
/** "IHAVEOPT": sent by the server after NBDMAGIC, and by the client before every option. */
export const optionMagic = 0x49484156454f5054n;
/** Prefix of every fixed-newstyle option reply. */
export const optionReplyMagic = 0x0003e889045565a9n;
/** Prefix of every compact (non-extended) transmission request. */
export const requestMagic = 0x25609513;
/** Prefix of a simple reply. */
export const simpleReplyMagic = 0x67446698;
/** Prefix of a structured reply chunk. */
export const structuredReplyMagic = 0x668e33ef;

// --- Message sizes ---

/** Server greeting: NBDMAGIC (8) + IHAVEOPT (8) + handshake flags (2). */
export const greetingBytes = 18;
/** Client flags after the greeting: u32. */
export const clientFlagsBytes = 4;
/** Option header: IHAVEOPT (8) + option (4) + data length (4). */
export const optionHeaderBytes = 16;
/** Option reply header: magic (8) + option (4) + reply type (4) + data length (4). */
export const optionReplyHeaderBytes = 20;
/** NBD_OPT_EXPORT_NAME success reply without padding: size (8) + transmission flags (2). */
export const exportNameReplyBytes = 10;
/** Zero padding after the EXPORT_NAME reply unless NO_ZEROES was agreed. */
export const exportNamePaddingBytes = 124;
/** Compact request header: magic 4, flags 2, type 2, cookie 8, offset 8, length 4. */
export const requestHeaderBytes = 28;
/** Simple reply: magic 4, error 4, cookie 8. */
export const simpleReplyBytes = 16;
/** Structured reply chunk header: magic 4, flags 2, type 2, cookie 8, length 4. */
export const structuredReplyHeaderBytes = 20;
/** OFFSET_DATA payload prefix: the u64 offset before the data. */
export const offsetDataPrefixBytes = 8;
/** BLOCK_STATUS payload prefix: the u32 metadata context id. */
export const blockStatusPrefixBytes = 4;
/** One BLOCK_STATUS descriptor: u32 length + u32 status flags. */
export const blockDescriptorBytes = 8;
/** ERROR chunk payload prefix: u32 error + u16 message length. */
export const errorChunkPrefixBytes = 6;
/** Strings (names, descriptions, messages) "MUST be no longer than 4096 bytes" (proto.md "Conventions"). */
export const stringMaxBytes = 4096;

// --- Handshake flags, u16 sent by the server (proto.md "Handshake flags") ---

export const HandshakeFlag = {
  fixedNewstyle: 1 << 0,
  noZeroes: 1 << 1,
} as const;

// --- Client flags, u32 (proto.md "Client flags") ---

export const ClientFlag = {
  fixedNewstyle: 1 << 0,
  noZeroes: 1 << 1,
} as const;

// --- Option types (proto.md "Option types") ---

export const Option = {
  exportName: 1,
  abort: 2,
  list: 3,
  peekExport: 4,
  startTls: 5,
  info: 6,
  go: 7,
  structuredReply: 8,
  listMetaContext: 9,
  setMetaContext: 10,
  /** Experimental (extension-ext-header branch); refused with ERR_UNSUP here. */
  extendedHeaders: 11,
} as const;

// --- Option reply types (proto.md "Option reply types"); errors have bit 31 set ---

const replyErrorBit = 0x8000_0000;
export const OptionReply = {
  ack: 1,
  server: 2,
  info: 3,
  metaContext: 4,
  errUnsup: replyErrorBit + 1,
  errPolicy: replyErrorBit + 2,
  errInvalid: replyErrorBit + 3,
  errPlatform: replyErrorBit + 4,
  errTlsReqd: replyErrorBit + 5,
  errUnknown: replyErrorBit + 6,
  errShutdown: replyErrorBit + 7,
  errBlockSizeReqd: replyErrorBit + 8,
  errTooBig: replyErrorBit + 9,
} as const;

// --- Info types for NBD_REP_INFO (proto.md "NBD_REP_INFO") ---

export const Info = {
  /** u64 size + u16 transmission flags; the reply's data length is 12 with the type. */
  export: 0,
  name: 1,
  description: 2,
  /** u32 minimum, u32 preferred, u32 maximum; the data length is 14 with the type. */
  blockSize: 3,
} as const;

export const infoExportBytes = 12;
export const infoBlockSizeBytes = 14;

// --- Transmission flags, u16 (proto.md "Transmission flags") ---

export const TransmissionFlag = {
  hasFlags: 1 << 0,
  readOnly: 1 << 1,
  sendFlush: 1 << 2,
  sendFua: 1 << 3,
  rotational: 1 << 4,
  sendTrim: 1 << 5,
  sendWriteZeroes: 1 << 6,
  /** Only when structured replies were negotiated. */
  sendDf: 1 << 7,
  canMultiConn: 1 << 8,
  sendResize: 1 << 9,
  sendCache: 1 << 10,
  /** Only together with sendWriteZeroes. */
  sendFastZero: 1 << 11,
} as const;

// --- Commands (proto.md "Request types") ---

export const Command = {
  read: 0,
  write: 1,
  disc: 2,
  flush: 3,
  trim: 4,
  cache: 5,
  writeZeroes: 6,
  blockStatus: 7,
} as const;

export type CommandType = (typeof Command)[keyof typeof Command];

// --- Command flags, u16 (proto.md "Command flags") ---

export const CommandFlag = {
  /** Valid on every command once SEND_FUA is advertised; the server may ignore it on non-writes. */
  fua: 1 << 0,
  /** WRITE_ZEROES only. */
  noHole: 1 << 1,
  /** READ only, and only with structured replies. */
  df: 1 << 2,
  /** BLOCK_STATUS only. */
  reqOne: 1 << 3,
  /** WRITE_ZEROES only. */
  fastZero: 1 << 4,
} as const;

// --- Structured reply flags and chunk types (proto.md "Structured reply types") ---

export const ReplyFlag = {
  done: 1 << 0,
} as const;

export const ReplyType = {
  none: 0,
  offsetData: 1,
  offsetHole: 2,
  blockStatus: 5,
  error: 0x8001,
  errorOffset: 0x8002,
} as const;

// --- base:allocation status flags (proto.md "base:allocation metadata context") ---

export const baseAllocationContextName = 'base:allocation';
export const baseNamespacePrefix = 'base:';

export const StateFlag = {
  hole: 1 << 0,
  zero: 1 << 1,
} as const;

// --- Error numbers for replies (proto.md "Error values") ---

export const NbdErrno = {
  ok: 0,
  eperm: 1,
  eio: 5,
  enomem: 12,
  einval: 22,
  enospc: 28,
  eoverflow: 75,
  enotsup: 95,
  eshutdown: 108,
} as const;

// --- Block size constraints served (proto.md "Block size constraints") ---

/** Smallest addressable unit: every offset and length is a multiple of it. */
export const blockSizeMinimumBytes = 512;
/** Requests of this size and alignment avoid read-modify-write in the cache. */
export const blockSizePreferredBytes = 4096;
/** Largest READ/WRITE/CACHE length accepted: 2^25, the spec's "maximum interoperability" size. */
export const maxPayloadBytes = 32 * 1024 * 1024;
