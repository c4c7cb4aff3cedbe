// NBD messages for the tests, both directions: what a client sends (options, requests) with
// parsers of the server's option replies, for the server tests; and what a server sends
// (greeting, option replies, simple replies, structured chunks), for the client tests.
//
// Written straight from the protocol layouts with Buffer's own big-endian methods, and
// deliberately independent of src/nbd, so a codec bug cannot hide behind a matching bug in
// the test's encoder. Numbers here are spec values, spelled out once.

export const nbdMagic = 0x4e42444d41474943n;
export const ihaveopt = 0x49484156454f5054n;
export const optionReplyMagic = 0x0003e889045565a9n;
export const requestMagic = 0x25609513;
export const simpleMagic = 0x67446698;
export const structuredMagic = 0x668e33ef;

export const OPT = {
  exportName: 1, abort: 2, list: 3, startTls: 5, info: 6, go: 7, structuredReply: 8,
  listMetaContext: 9, setMetaContext: 10, extendedHeaders: 11,
} as const;
export const REP = {
  ack: 1, server: 2, info: 3, metaContext: 4,
  errUnsup: 0x8000_0001, errPolicy: 0x8000_0002, errInvalid: 0x8000_0003, errTlsReqd: 0x8000_0005, errUnknown: 0x8000_0006,
  errShutdown: 0x8000_0007, errBlockSizeReqd: 0x8000_0008, errTooBig: 0x8000_0009,
} as const;
export const INFO = { export: 0, name: 1, description: 2, blockSize: 3 } as const;
export const CMD = { read: 0, write: 1, disc: 2, flush: 3, trim: 4, cache: 5, writeZeroes: 6, blockStatus: 7 } as const;
export const FLAG = { fua: 1, noHole: 2, df: 4, reqOne: 8, fastZero: 16 } as const;
export const TFLAG = {
  hasFlags: 1, readOnly: 2, sendFlush: 4, sendFua: 8, rotational: 16, sendTrim: 32, sendWriteZeroes: 64,
  sendDf: 128, canMultiConn: 256, sendResize: 512, sendCache: 1024, sendFastZero: 2048,
} as const;
export const ERR = { ok: 0, eperm: 1, eio: 5, einval: 22, enospc: 28, enotsup: 95, eshutdown: 108 } as const;
export const CHUNK = { none: 0, offsetData: 1, offsetHole: 2, blockStatus: 5, error: 0x8001, errorOffset: 0x8002 } as const;

export function clientFlags(flags: number): Buffer {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32BE(flags, 0);
  return bytes;
}

/** One option: IHAVEOPT, option, length, data. `declaredLength` overrides the length field. */
export function option(code: number, data: Uint8Array = Buffer.alloc(0), declaredLength?: number): Buffer {
  const header = Buffer.alloc(16);
  header.writeBigUInt64BE(ihaveopt, 0);
  header.writeUInt32BE(code, 8);
  header.writeUInt32BE(declaredLength ?? data.length, 12);
  return Buffer.concat([header, data]);
}

/** INFO/GO data: u32 name length, name, u16 count, count x u16. */
export function infoData(name: string | Buffer, infos: number[] = [], overrides: { nameLength?: number; count?: number } = {}): Buffer {
  const nameBytes = typeof name === 'string' ? Buffer.from(name) : name;
  const bytes = Buffer.alloc(4 + nameBytes.length + 2 + 2 * infos.length);
  bytes.writeUInt32BE(overrides.nameLength ?? nameBytes.length, 0);
  nameBytes.copy(bytes, 4);
  bytes.writeUInt16BE(overrides.count ?? infos.length, 4 + nameBytes.length);
  infos.forEach((info, i) => bytes.writeUInt16BE(info, 4 + nameBytes.length + 2 + 2 * i));
  return bytes;
}

/** LIST/SET_META_CONTEXT data: u32 name length, name, u32 count, (u32 length, query)*. */
export function metaContextData(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const head = Buffer.alloc(4);
  head.writeUInt32BE(Buffer.byteLength(name), 0);
  parts.push(head, Buffer.from(name));
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  parts.push(count);
  for (const query of queries) {
    const length = Buffer.alloc(4);
    length.writeUInt32BE(Buffer.byteLength(query), 0);
    parts.push(length, Buffer.from(query));
  }
  return Buffer.concat(parts);
}

export interface RequestFields {
  type: number;
  flags?: number;
  cookie?: bigint;
  offset?: bigint | number;
  length?: number;
  magic?: number;
}

/** A 28-byte request header, followed by `payload` when given. */
export function request(fields: RequestFields, payload?: Uint8Array): Buffer {
  const header = Buffer.alloc(28);
  header.writeUInt32BE(fields.magic ?? requestMagic, 0);
  header.writeUInt16BE(fields.flags ?? 0, 4);
  header.writeUInt16BE(fields.type, 6);
  header.writeBigUInt64BE(fields.cookie ?? 0n, 8);
  header.writeBigUInt64BE(BigInt(fields.offset ?? 0), 16);
  header.writeUInt32BE(fields.length ?? payload?.length ?? 0, 24);
  return payload === undefined ? header : Buffer.concat([header, payload]);
}

export interface OptionReplyMessage {
  option: number;
  type: number;
  data: Buffer;
}

/** Parses a run of option replies; throws on a bad magic or a truncated message. */
export function parseOptionReplies(bytes: Buffer): OptionReplyMessage[] {
  const replies: OptionReplyMessage[] = [];
  let at = 0;
  while (at < bytes.length) {
    if (bytes.length - at < 20) throw new Error(`truncated option reply at ${at}`);
    if (bytes.readBigUInt64BE(at) !== optionReplyMagic) throw new Error(`bad option reply magic at ${at}`);
    const length = bytes.readUInt32BE(at + 16);
    if (bytes.length - at - 20 < length) throw new Error(`truncated option reply data at ${at}`);
    replies.push({ option: bytes.readUInt32BE(at + 8), type: bytes.readUInt32BE(at + 12), data: bytes.subarray(at + 20, at + 20 + length) });
    at += 20 + length;
  }
  return replies;
}

export interface ExportInfo {
  sizeBytes: bigint;
  flags: number;
  name?: string;
  description?: string;
  blockSize?: { minimum: number; preferred: number; maximum: number };
}

/** Collects the NBD_REP_INFO replies of one INFO/GO into one record. */
export function exportInfoOf(replies: OptionReplyMessage[]): ExportInfo {
  const info: ExportInfo = { sizeBytes: -1n, flags: -1 };
  for (const reply of replies) {
    if (reply.type !== REP.info) continue;
    const type = reply.data.readUInt16BE(0);
    if (type === INFO.export) {
      info.sizeBytes = reply.data.readBigUInt64BE(2);
      info.flags = reply.data.readUInt16BE(10);
    } else if (type === INFO.name) {
      info.name = reply.data.subarray(2).toString();
    } else if (type === INFO.description) {
      info.description = reply.data.subarray(2).toString();
    } else if (type === INFO.blockSize) {
      info.blockSize = { minimum: reply.data.readUInt32BE(2), preferred: reply.data.readUInt32BE(6), maximum: reply.data.readUInt32BE(10) };
    }
  }
  return info;
}

// --- What a server sends ---

/** The 18-byte greeting: NBDMAGIC, `second` (IHAVEOPT unless a test breaks it), handshake flags. */
export function serverGreeting(flags = 3, second: bigint = ihaveopt): Buffer {
  const bytes = Buffer.alloc(18);
  bytes.writeBigUInt64BE(nbdMagic, 0);
  bytes.writeBigUInt64BE(second, 8);
  bytes.writeUInt16BE(flags, 16);
  return bytes;
}

/** One option reply: magic, option, type, length, data. `declaredLength` overrides the length field. */
export function optionReply(optionCode: number, type: number, data: Buffer = Buffer.alloc(0), declaredLength?: number): Buffer {
  const header = Buffer.alloc(20);
  header.writeBigUInt64BE(optionReplyMagic, 0);
  header.writeUInt32BE(optionCode, 8);
  header.writeUInt32BE(type, 12);
  header.writeUInt32BE(declaredLength ?? data.length, 16);
  return Buffer.concat([header, data]);
}

/** NBD_INFO_EXPORT data: size and transmission flags. */
export function infoExport(sizeBytes: bigint, flags: number): Buffer {
  const bytes = Buffer.alloc(12);
  bytes.writeUInt16BE(INFO.export, 0);
  bytes.writeBigUInt64BE(sizeBytes, 2);
  bytes.writeUInt16BE(flags, 10);
  return bytes;
}

/** NBD_INFO_BLOCK_SIZE data. */
export function infoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const bytes = Buffer.alloc(14);
  bytes.writeUInt16BE(INFO.blockSize, 0);
  bytes.writeUInt32BE(minimum, 2);
  bytes.writeUInt32BE(preferred, 6);
  bytes.writeUInt32BE(maximum, 10);
  return bytes;
}

/** The replies to a GO for an export of `sizeBytes` with `flags` and optional block sizes. */
export function goReplies(sizeBytes: number, flags: number, blockSize?: [number, number, number]): Buffer {
  const parts = [optionReply(OPT.go, REP.info, infoExport(BigInt(sizeBytes), flags))];
  if (blockSize !== undefined) parts.push(optionReply(OPT.go, REP.info, infoBlockSize(...blockSize)));
  parts.push(optionReply(OPT.go, REP.ack));
  return Buffer.concat(parts);
}

/** A simple reply: magic, error, cookie, then `data` (a READ's payload). */
export function simpleReply(errno: number, cookie: bigint, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(16);
  header.writeUInt32BE(simpleMagic, 0);
  header.writeUInt32BE(errno, 4);
  header.writeBigUInt64BE(cookie, 8);
  return Buffer.concat([header, data]);
}

/** One structured reply chunk. `declaredLength` overrides the length field. */
export function chunkReply(flags: number, type: number, cookie: bigint, payload: Buffer = Buffer.alloc(0), declaredLength?: number): Buffer {
  const header = Buffer.alloc(20);
  header.writeUInt32BE(structuredMagic, 0);
  header.writeUInt16BE(flags, 4);
  header.writeUInt16BE(type, 6);
  header.writeBigUInt64BE(cookie, 8);
  header.writeUInt32BE(declaredLength ?? payload.length, 16);
  return Buffer.concat([header, payload]);
}

/** An OFFSET_DATA chunk's payload: the offset, then the data. */
export function offsetDataPayload(offset: number, data: Buffer): Buffer {
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64BE(BigInt(offset), 0);
  return Buffer.concat([prefix, data]);
}
