// The pure NBD codec: handshake transcripts and request streams fed whole, split at every byte
// offset and byte by byte must give identical results, and those results must be the ones the
// protocol prescribes. Also: boundary validation, reply layouts, the error-number mapping.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ByteQueue } from '../../../src/nbd/protocol/bytes.js';
import { Handshake, type HandshakeConfig } from '../../../src/nbd/protocol/handshake_server.js';
import { maxPayloadBytes } from '../../../src/nbd/protocol/constants.js';
import { nbdErrnoOf } from '../../../src/nbd/protocol/errno.js';
import {
  blockStatusChunk, blockStatusDescriptorsMax, errorChunk, NbdRequest, noneChunk, Problems,
  RequestDecoder, simpleReply, type TransmissionContext, validateRequest, writeReadReplyPrefix,
} from '../../../src/nbd/protocol/transmission_server.js';
import type { PcacheErrorCode } from '../../../src/lib/errors.js';
import { PcacheError } from '../../../src/lib/errors.js';
import { MiB } from '../../../src/lib/units.js';
import { assertChunkingInvariant } from '../../helpers/bytes.js';
import {
  clientFlags, CMD, ERR, exportInfoOf, FLAG, INFO, infoData, metaContextData, OPT, option, parseOptionReplies, REP,
  request, TFLAG,
} from '../../helpers/nbd_wire.js';
import { oneExport } from '../../helpers/nbd_exports.js';

const sizeBytes = MiB;
const config: HandshakeConfig = {
  exports: oneExport('pcache', sizeBytes, { description: 'codec test export' }),
  offerNoZeroes: true,
  offerStructuredReplies: true,
  optionLengthMaxBytes: 64 * 1024,
  optionsMax: 16,
};

interface HandshakeRun {
  replies: string;
  verdict: string;
  leftover: string;
}

function runHandshake(chunks: Uint8Array[], handshakeConfig: HandshakeConfig = config): HandshakeRun {
  const handshake = new Handshake(handshakeConfig);
  // The greeting leads the server's output, as on a real connection.
  const out: Uint8Array[] = [handshake.greeting()];
  let verdict = handshake.status;
  for (const chunk of chunks) verdict = handshake.push(chunk, out);
  const leftover = handshake.input.take(handshake.input.length);
  return { replies: Buffer.concat(out).toString('hex'), verdict: JSON.stringify(verdict), leftover: Buffer.from(leftover).toString('hex') };
}

function verdictOf(run: HandshakeRun): { kind: string; reason?: string; negotiated?: { transmissionFlags: number; structuredReplies: boolean; baseAllocationContextId?: number; sizeBytes: number } } {
  return JSON.parse(run.verdict) as ReturnType<typeof verdictOf>;
}

const readRequest = request({ type: CMD.read, cookie: 0x0102030405060708n, offset: 4096, length: 512 });
const writeRequest = request({ type: CMD.write, flags: FLAG.fua, cookie: 9n, offset: 0 }, Buffer.alloc(1024, 0xab));

describe('handshake codec, any chunking', () => {
  it('EXPORT_NAME with NO_ZEROES: size and flags, no padding, then transmission', () => {
    const run = assertChunkingInvariant(Buffer.concat([clientFlags(3), option(OPT.exportName, Buffer.from('pcache'))]), (c) => runHandshake(c));
    const replies = Buffer.from(run.replies, 'hex');
    assert.equal(replies.length, 18 + 10);
    assert.equal(replies.readBigUInt64BE(18), BigInt(sizeBytes));
    const flags = replies.readUInt16BE(26);
    assert.equal(flags & TFLAG.sendDf, 0, 'DF without structured replies');
    assert.ok((flags & TFLAG.canMultiConn) !== 0);
    assert.equal(verdictOf(run).kind, 'transmission');
  });

  it('EXPORT_NAME without NO_ZEROES pads with 124 zero bytes', () => {
    const run = assertChunkingInvariant(Buffer.concat([clientFlags(1), option(OPT.exportName)]), (c) => runHandshake(c));
    const replies = Buffer.from(run.replies, 'hex');
    assert.equal(replies.length, 18 + 10 + 124);
    assert.ok(replies.subarray(28).every((byte) => byte === 0));
  });

  it('INFO then GO, with requests pipelined behind GO left for the transmission phase', () => {
    const transcript = Buffer.concat([
      clientFlags(3),
      option(OPT.info, infoData('pcache', [INFO.name, INFO.description, INFO.blockSize])),
      option(OPT.go, infoData('', [])),
      readRequest,
      writeRequest,
    ]);
    const run = assertChunkingInvariant(transcript, (c) => runHandshake(c));
    const replies = parseOptionReplies(Buffer.from(run.replies, 'hex').subarray(18));
    const info = replies.slice(0, 5);
    assert.deepEqual(info.map((r) => r.type), [REP.info, REP.info, REP.info, REP.info, REP.ack]);
    assert.ok(info.every((r) => r.option === OPT.info));
    const described = exportInfoOf(info);
    assert.equal(described.sizeBytes, BigInt(sizeBytes));
    assert.equal(described.name, 'pcache');
    assert.equal(described.description, 'codec test export');
    assert.deepEqual(described.blockSize, { minimum: 512, preferred: 4096, maximum: 32 * 1024 * 1024 });
    const go = replies.slice(5);
    assert.deepEqual(go.map((r) => r.type), [REP.info, REP.info, REP.ack], 'GO: export, block size, ack');
    assert.equal(verdictOf(run).kind, 'transmission');
    assert.equal(run.leftover, Buffer.concat([readRequest, writeRequest]).toString('hex'));
  });

  it('LIST, STRUCTURED_REPLY, LIST/SET_META_CONTEXT, then GO with base:allocation selected', () => {
    const transcript = Buffer.concat([
      clientFlags(3),
      option(OPT.list),
      option(OPT.structuredReply),
      option(OPT.listMetaContext, metaContextData('pcache', [])),
      option(OPT.setMetaContext, metaContextData('pcache', ['base:allocation', 'x-other:thing'])),
      option(OPT.go, infoData('pcache')),
    ]);
    const run = assertChunkingInvariant(transcript, (c) => runHandshake(c));
    const replies = parseOptionReplies(Buffer.from(run.replies, 'hex').subarray(18));
    assert.deepEqual(replies.map((r) => [r.option, r.type]), [
      [OPT.list, REP.server], [OPT.list, REP.ack],
      [OPT.structuredReply, REP.ack],
      [OPT.listMetaContext, REP.metaContext], [OPT.listMetaContext, REP.ack],
      [OPT.setMetaContext, REP.metaContext], [OPT.setMetaContext, REP.ack],
      [OPT.go, REP.info], [OPT.go, REP.info], [OPT.go, REP.ack],
    ]);
    const server = replies[0]?.data ?? Buffer.alloc(0);
    assert.equal(server.readUInt32BE(0), 6);
    assert.equal(server.subarray(4, 10).toString(), 'pcache');
    assert.equal(server.subarray(10).toString(), 'codec test export');
    assert.equal(replies[3]?.data.subarray(4).toString(), 'base:allocation');
    const setContextId = replies[5]?.data.readUInt32BE(0);
    const verdict = verdictOf(run);
    assert.equal(verdict.kind, 'transmission');
    const negotiated = verdict.negotiated;
    assert.ok(negotiated !== undefined);
    assert.equal(negotiated.structuredReplies, true);
    assert.equal(negotiated.baseAllocationContextId, setContextId);
    assert.ok((negotiated.transmissionFlags & TFLAG.sendDf) !== 0, 'DF with structured replies');
  });

  it('unknown options, STARTTLS and EXTENDED_HEADERS get ERR_UNSUP with their data consumed; ABORT acks and closes', () => {
    const transcript = Buffer.concat([
      clientFlags(3),
      option(99, Buffer.alloc(100, 0x55)),
      option(OPT.startTls),
      option(OPT.extendedHeaders),
      option(OPT.abort),
      Buffer.from('ignored after abort'),
    ]);
    const run = assertChunkingInvariant(transcript, (c) => runHandshake(c));
    const replies = parseOptionReplies(Buffer.from(run.replies, 'hex').subarray(18));
    assert.deepEqual(replies.map((r) => [r.option, r.type]), [
      [99, REP.errUnsup], [OPT.startTls, REP.errUnsup], [OPT.extendedHeaders, REP.errUnsup], [OPT.abort, REP.ack],
    ]);
    assert.equal(verdictOf(run).kind, 'closed');
  });

  it('malformed INFO/GO and meta-context data get ERR_INVALID; unknown names ERR_UNKNOWN; EXPORT_NAME of an unknown name closes', () => {
    const transcript = Buffer.concat([
      clientFlags(3),
      option(OPT.info, infoData('pcache', [], { nameLength: 1000 })),
      option(OPT.go, infoData('pcache', [INFO.name], { count: 3 })),
      option(OPT.info, Buffer.alloc(3)),
      option(OPT.go, infoData('nope')),
      option(OPT.setMetaContext, metaContextData('pcache', ['base:allocation'])),
      option(OPT.structuredReply),
      option(OPT.structuredReply),
      option(OPT.listMetaContext, Buffer.concat([metaContextData('pcache', ['base:']), Buffer.from([1])])),
      option(OPT.list, Buffer.from([0])),
      option(OPT.exportName, Buffer.from('nope')),
    ]);
    const run = assertChunkingInvariant(transcript, (c) => runHandshake(c));
    const replies = parseOptionReplies(Buffer.from(run.replies, 'hex').subarray(18));
    assert.deepEqual(replies.map((r) => r.type), [
      REP.errInvalid, REP.errInvalid, REP.errInvalid, REP.errUnknown,
      REP.errInvalid, // SET_META_CONTEXT before structured replies
      REP.ack, REP.errInvalid, // STRUCTURED_REPLY twice
      REP.errInvalid, // trailing byte after the last query
      REP.errInvalid, // LIST with data
    ]);
    assert.deepEqual(verdictOf(run), { kind: 'closed', reason: 'unknown export name', violation: false });
  });

  for (const [name, bytes] of [
    ['a bad option magic', Buffer.concat([clientFlags(3), Buffer.alloc(16, 0x41)])],
    ['unknown client flags', clientFlags(0x80000003)],
    ['an option longer than the cap', Buffer.concat([clientFlags(3), option(99, Buffer.alloc(0), 0xffffffff)])],
  ] as const) {
    it(`closes on ${name} without replying`, () => {
      const run = assertChunkingInvariant(bytes, (c) => runHandshake(c));
      assert.equal(verdictOf(run).kind, 'closed');
      assert.equal(run.replies.length, 36, 'nothing but the greeting');
    });
  }

  it('closes NO_ZEROES from a client when NO_ZEROES was not advertised', () => {
    const run = runHandshake([clientFlags(3)], { ...config, offerNoZeroes: false });
    assert.equal(verdictOf(run).kind, 'closed');
    const greeting = Buffer.from(run.replies, 'hex');
    assert.equal(greeting.readUInt16BE(16), 1, 'only FIXED_NEWSTYLE advertised');
  });

  it('closes after optionsMax options', () => {
    const lists = Array.from({ length: config.optionsMax + 1 }, () => option(OPT.list));
    const run = assertChunkingInvariant(Buffer.concat([clientFlags(3), ...lists]), (c) => runHandshake(c));
    const replies = parseOptionReplies(Buffer.from(run.replies, 'hex').subarray(18));
    assert.equal(replies.filter((r) => r.type === REP.ack).length, config.optionsMax);
    assert.equal(verdictOf(run).kind, 'closed');
  });

  it('advertises READ_ONLY and no write commands for a read-only export', () => {
    const run = runHandshake([Buffer.concat([clientFlags(3), option(OPT.go, infoData(''))])], { ...config, exports: oneExport('pcache', sizeBytes, { readOnly: true }) });
    const info = exportInfoOf(parseOptionReplies(Buffer.from(run.replies, 'hex').subarray(18)));
    assert.ok((info.flags & TFLAG.readOnly) !== 0);
    assert.equal(info.flags & (TFLAG.sendTrim | TFLAG.sendWriteZeroes | TFLAG.sendFastZero), 0);
  });

  it('refuses structured replies when they are switched off', () => {
    const run = runHandshake([Buffer.concat([clientFlags(3), option(OPT.structuredReply)])], { ...config, offerStructuredReplies: false });
    assert.equal(parseOptionReplies(Buffer.from(run.replies, 'hex').subarray(18))[0]?.type, REP.errUnsup);
  });
});

const writableContext: TransmissionContext = {
  sizeBytes,
  readOnly: false,
  structuredReplies: true,
  baseAllocationContextId: 1,
  shuttingDown: false,
};

interface Decoded {
  type: number;
  flags: number;
  cookie: string;
  offset: number;
  length: number;
  payload: string | null;
  errno: number;
}

function runDecoder(chunks: Uint8Array[], context: TransmissionContext = writableContext): Decoded[] {
  const queue = new ByteQueue();
  const decoder = new RequestDecoder(queue, { ...context });
  const decoded: Decoded[] = [];
  for (const chunk of chunks) {
    queue.push(chunk);
    for (let request = decoder.next(); request !== undefined; request = decoder.next()) {
      decoded.push({
        type: request.type,
        flags: request.flags,
        cookie: `${request.cookieHigh.toString(16)}:${request.cookieLow.toString(16)}`,
        offset: request.offsetBytes,
        length: request.lengthBytes,
        payload: request.payload === undefined ? null : Buffer.from(request.payload).toString('hex'),
        errno: request.problem?.errno ?? 0,
      });
    }
  }
  return decoded;
}

describe('request decoder, any chunking', () => {
  it('decodes every command, with and without payload, and skips refused payloads', () => {
    const payload = Buffer.from(Array.from({ length: 1024 }, (_, i) => i & 0xff));
    const stream = Buffer.concat([
      request({ type: CMD.read, cookie: 0xfedcba9876543210n, offset: 512, length: 4096 }),
      request({ type: CMD.write, flags: FLAG.fua, cookie: 2n, offset: 8192 }, payload),
      request({ type: CMD.flush, cookie: 3n }),
      request({ type: CMD.trim, cookie: 4n, offset: 0, length: 65536 }),
      request({ type: CMD.writeZeroes, flags: FLAG.noHole, cookie: 5n, offset: 1024, length: 512 }),
      request({ type: CMD.blockStatus, flags: FLAG.reqOne, cookie: 6n, offset: 0, length: sizeBytes }),
      request({ type: CMD.write, cookie: 7n, offset: sizeBytes - 512 }, Buffer.alloc(1024, 0x77)), // past the end
      request({ type: CMD.write, cookie: 8n, offset: 0 }, Buffer.alloc(100, 0x88)), // misaligned
      request({ type: CMD.write, cookie: 9n, offset: 0 }, Buffer.alloc(0)),
      request({ type: CMD.read, cookie: 10n, offset: 0xffff_ffff_ffff_fe00n, length: 1024 }), // offset >= 2^53
      request({ type: 42, cookie: 11n }),
      request({ type: CMD.disc, cookie: 12n }),
    ]);
    const decoded = assertChunkingInvariant(stream, (c) => runDecoder(c));
    assert.deepEqual(decoded.map((d) => [d.type, d.cookie, d.errno]), [
      [CMD.read, 'fedcba98:76543210', 0],
      [CMD.write, '0:2', 0],
      [CMD.flush, '0:3', 0],
      [CMD.trim, '0:4', 0],
      [CMD.writeZeroes, '0:5', 0],
      [CMD.blockStatus, '0:6', 0],
      [CMD.write, '0:7', ERR.enospc],
      [CMD.write, '0:8', ERR.einval],
      [CMD.write, '0:9', 0],
      [CMD.read, '0:a', ERR.einval],
      [42, '0:b', ERR.einval],
      [CMD.disc, '0:c', 0],
    ]);
    const [read, write, , , , , pastEnd, misaligned, empty, beyond] = decoded;
    assert.deepEqual([read?.offset, read?.length], [512, 4096]);
    assert.deepEqual([write?.payload, write?.flags], [payload.toString('hex'), FLAG.fua]);
    assert.equal(pastEnd?.payload, null, 'a refused WRITE payload is skipped, not buffered');
    assert.equal(misaligned?.payload, null);
    assert.equal(empty?.payload, '');
    assert.equal(beyond?.offset, Number.POSITIVE_INFINITY, 'offsets beyond 2^53 become +Infinity');
  });

  it('throws on a bad request magic, after decoding everything before it, at any split', () => {
    const stream = Buffer.concat([readRequest, request({ type: CMD.read, magic: 0x12345678 }), readRequest]);
    for (let cut = 0; cut <= stream.length; cut += 1) {
      const queue = new ByteQueue();
      const decoder = new RequestDecoder(queue, { ...writableContext });
      const seen: number[] = [];
      assert.throws(() => {
        for (const chunk of [stream.subarray(0, cut), stream.subarray(cut)]) {
          queue.push(chunk);
          for (let r = decoder.next(); r !== undefined; r = decoder.next()) seen.push(r.type);
        }
      }, (error: unknown) => error instanceof PcacheError && error.code === 'EINVAL');
      assert.deepEqual(seen, [CMD.read]);
    }
  });

  it('skips an oversized WRITE payload without buffering it', () => {
    const length = maxPayloadBytes + 512;
    const header = request({ type: CMD.write, cookie: 1n, offset: 0, length });
    const queue = new ByteQueue();
    const decoder = new RequestDecoder(queue, { ...writableContext, sizeBytes: 1024 * 1024 * 1024 });
    queue.push(header);
    assert.equal(decoder.next(), undefined);
    const piece = Buffer.alloc(1024 * 1024);
    let sent = 0;
    let result: NbdRequest | undefined;
    while (sent < length) {
      const part = piece.subarray(0, Math.min(piece.length, length - sent));
      queue.push(part);
      sent += part.length;
      result = decoder.next();
      assert.equal(decoder.partialPayloadBytes, 0, 'nothing buffered for a refused payload');
      if (sent < length) assert.equal(result, undefined);
    }
    assert.equal(result?.problem, Problems.tooLarge);
    assert.equal(result.payload, undefined);
    queue.push(readRequest);
    assert.equal(decoder.next()?.type, CMD.read, 'framing kept after the skipped payload');
  });
});

function header(fields: { type: number; flags?: number; offset?: number; length?: number }): NbdRequest {
  return new NbdRequest(fields.type, fields.flags ?? 0, 0, 1, fields.offset ?? 0, fields.length ?? 0);
}

describe('boundary validation', () => {
  const cases: [string, Parameters<typeof header>[0], Partial<TransmissionContext>, (typeof Problems)[keyof typeof Problems] | undefined][] = [
    ['valid READ', { type: CMD.read, offset: 512, length: 512 }, {}, undefined],
    ['READ ending exactly at the end', { type: CMD.read, offset: sizeBytes - 512, length: 512 }, {}, undefined],
    ['READ past the end', { type: CMD.read, offset: sizeBytes - 512, length: 1024 }, {}, Problems.pastEnd],
    ['READ at +Infinity', { type: CMD.read, offset: Number.POSITIVE_INFINITY, length: 512 }, {}, Problems.pastEnd],
    ['READ misaligned offset', { type: CMD.read, offset: 1, length: 512 }, {}, Problems.misaligned],
    ['READ misaligned length', { type: CMD.read, offset: 0, length: 100 }, {}, Problems.misaligned],
    ['READ above the maximum payload', { type: CMD.read, offset: 0, length: 0xffffffff }, {}, Problems.tooLarge],
    ['READ with FUA (accepted, per the spec)', { type: CMD.read, flags: FLAG.fua, length: 512 }, {}, undefined],
    ['READ with DF and structured replies', { type: CMD.read, flags: FLAG.df, length: 512 }, {}, undefined],
    ['READ with DF without structured replies', { type: CMD.read, flags: FLAG.df, length: 512 }, { structuredReplies: false }, Problems.badFlags],
    ['READ with REQ_ONE', { type: CMD.read, flags: FLAG.reqOne, length: 512 }, {}, Problems.badFlags],
    ['READ with an unknown flag', { type: CMD.read, flags: 0x8000, length: 512 }, {}, Problems.badFlags],
    ['WRITE past the end', { type: CMD.write, offset: sizeBytes, length: 512 }, {}, Problems.writePastEnd],
    ['WRITE on a read-only export', { type: CMD.write, length: 512 }, { readOnly: true }, Problems.readOnly],
    ['WRITE with NO_HOLE', { type: CMD.write, flags: FLAG.noHole, length: 512 }, {}, Problems.badFlags],
    ['WRITE_ZEROES past the end', { type: CMD.writeZeroes, offset: sizeBytes, length: 512 }, {}, Problems.writePastEnd],
    ['WRITE_ZEROES with NO_HOLE and FAST_ZERO', { type: CMD.writeZeroes, flags: FLAG.noHole | FLAG.fastZero, length: 512 }, {}, undefined],
    ['TRIM past the end', { type: CMD.trim, offset: 0, length: sizeBytes + 512 }, {}, Problems.pastEnd],
    ['TRIM on a read-only export', { type: CMD.trim, length: 512 }, { readOnly: true }, Problems.readOnly],
    ['TRIM with FAST_ZERO', { type: CMD.trim, flags: FLAG.fastZero, length: 512 }, {}, Problems.badFlags],
    ['FLUSH with an offset', { type: CMD.flush, offset: 512 }, {}, Problems.flushRange],
    ['FLUSH with a length', { type: CMD.flush, length: 512 }, {}, Problems.flushRange],
    ['FLUSH', { type: CMD.flush }, {}, undefined],
    ['CACHE above the maximum payload', { type: CMD.cache, length: maxPayloadBytes + 512 }, { sizeBytes: 2 * maxPayloadBytes }, Problems.tooLarge],
    ['BLOCK_STATUS without a context', { type: CMD.blockStatus, length: 512 }, { baseAllocationContextId: undefined }, Problems.noMetaContext],
    ['BLOCK_STATUS of zero bytes', { type: CMD.blockStatus, length: 0 }, {}, Problems.emptyStatus],
    ['BLOCK_STATUS past the end', { type: CMD.blockStatus, offset: 512, length: sizeBytes }, {}, Problems.pastEnd],
    ['zero-length READ', { type: CMD.read, length: 0 }, {}, undefined],
    ['unknown command', { type: 9 }, {}, Problems.unknownCommand],
    ['anything while shutting down', { type: CMD.read, length: 512 }, { shuttingDown: true }, Problems.shuttingDown],
    ['DISC while shutting down', { type: CMD.disc }, { shuttingDown: true }, undefined],
  ];
  for (const [name, fields, context, expected] of cases) {
    it(name, () => {
      assert.equal(validateRequest(header(fields), { ...writableContext, ...context }), expected);
    });
  }
});

describe('reply encoders', () => {
  const cookieRequest = new NbdRequest(CMD.read, 0, 0x01020304, 0x05060708, 4096, 512);

  it('simple reply: magic, error, cookie echoed byte for byte', () => {
    assert.equal(Buffer.from(simpleReply(ERR.enospc, cookieRequest)).toString('hex'), '67446698' + '0000001c' + '0102030405060708');
  });

  it('NONE chunk carries DONE and no payload', () => {
    assert.equal(Buffer.from(noneChunk(cookieRequest)).toString('hex'), '668e33ef' + '0001' + '0000' + '0102030405060708' + '00000000');
  });

  it('READ prefix: one OFFSET_DATA chunk flagged DONE with the request offset', () => {
    const buffer = new Uint8Array(28 + 512);
    writeReadReplyPrefix(buffer, cookieRequest, true);
    const bytes = Buffer.from(buffer);
    assert.equal(bytes.readUInt32BE(0), 0x668e33ef);
    assert.equal(bytes.readUInt16BE(4), 1);
    assert.equal(bytes.readUInt16BE(6), 1);
    assert.equal(bytes.readUInt32BE(16), 8 + 512);
    assert.equal(bytes.readBigUInt64BE(20), 4096n);
  });

  it('ERROR chunk: error, message length, printable message', () => {
    const bytes = Buffer.from(errorChunk(cookieRequest, ERR.eio, 'disk \u00e9 failed'));
    assert.equal(bytes.readUInt16BE(6), 0x8001);
    assert.equal(bytes.readUInt32BE(16), 6 + 13);
    assert.equal(bytes.readUInt32BE(20), ERR.eio);
    assert.equal(bytes.readUInt16BE(24), 13);
    assert.equal(bytes.subarray(26).toString('latin1'), 'disk ? failed');
  });

  it('BLOCK_STATUS merges equal neighbours, sets HOLE/ZERO, honours REQ_ONE', () => {
    const status = new NbdRequest(CMD.blockStatus, 0, 0, 1, 0, 8192);
    const extents = [
      { lengthBytes: 1024, zero: false, hole: false },
      { lengthBytes: 1024, zero: false, hole: false },
      { lengthBytes: 2048, zero: true, hole: true },
      { lengthBytes: 512, zero: true, hole: false },
    ];
    const bytes = Buffer.from(blockStatusChunk(status, 7, extents));
    assert.equal(bytes.readUInt16BE(6), 5);
    assert.equal(bytes.readUInt32BE(16), 4 + 3 * 8);
    assert.equal(bytes.readUInt32BE(20), 7);
    const descriptors = [0, 1, 2].map((i) => [bytes.readUInt32BE(24 + 8 * i), bytes.readUInt32BE(28 + 8 * i)]);
    assert.deepEqual(descriptors, [[2048, 0], [2048, 3], [512, 2]]);
    const one = new NbdRequest(CMD.blockStatus, FLAG.reqOne, 0, 1, 0, 8192);
    const oneBytes = Buffer.from(blockStatusChunk(one, 7, extents.slice(2)));
    assert.equal(oneBytes.readUInt32BE(16), 4 + 8, 'exactly one descriptor with REQ_ONE');
  });

  it(`BLOCK_STATUS sends at most ${blockStatusDescriptorsMax} descriptors`, () => {
    const count = blockStatusDescriptorsMax + 10;
    const status = new NbdRequest(CMD.blockStatus, 0, 0, 1, 0, count * 512);
    const extents = Array.from({ length: count }, (_, i) => ({ lengthBytes: 512, zero: i % 2 === 0, hole: false }));
    const bytes = Buffer.from(blockStatusChunk(status, 1, extents));
    assert.equal(bytes.readUInt32BE(16), 4 + blockStatusDescriptorsMax * 8);
  });
});

describe('ByteQueue', () => {
  it('returns a view for contiguous bytes and a copy across chunks', () => {
    const queue = new ByteQueue();
    const first = Buffer.from([1, 2, 3, 4]);
    queue.push(first);
    queue.push(Buffer.from([5, 6]));
    const view = queue.take(2);
    assert.equal(view.buffer, first.buffer, 'no copy when contiguous');
    assert.deepEqual([...queue.take(3)], [3, 4, 5]);
    assert.equal(queue.skip(10), 1);
    assert.equal(queue.length, 0);
  });
});

describe('error-number mapping', () => {
  const expected: Record<PcacheErrorCode, number> = {
    EIO: 5, ENOSPC: 28, EINVAL: 22, EPERM: 1, ENOTSUP: 95, ESHUTDOWN: 108,
    ENODEV: 5, ETIMEDOUT: 5, CORRUPT: 5, FOREIGN: 5,
  };
  for (const [code, errno] of Object.entries(expected)) {
    it(`${code} -> ${errno}`, () => {
      assert.equal(nbdErrnoOf(code as PcacheErrorCode), errno);
    });
  }
});

describe('codec under arbitrary input (fast-check)', () => {
  const transcript = Buffer.concat([
    clientFlags(3),
    option(OPT.structuredReply),
    option(OPT.setMetaContext, metaContextData('pcache', ['base:allocation'])),
    option(OPT.info, infoData('pcache', [INFO.name, INFO.blockSize])),
    option(OPT.go, infoData('')),
    readRequest,
    writeRequest,
  ]);

  it('the handshake never throws, whatever the bytes, and only ever answers with well-formed replies', () => {
    fc.assert(fc.property(
      fc.uint8Array({ maxLength: 600 }),
      fc.array(fc.tuple(fc.nat({ max: transcript.length - 1 }), fc.integer({ min: 0, max: 255 })), { maxLength: 8 }),
      (noise, flips) => {
        const mutated = Buffer.from(transcript);
        for (const [at, value] of flips) mutated[at] = value;
        for (const input of [Buffer.from(noise), mutated, Buffer.concat([clientFlags(3), noise])]) {
          const handshake = new Handshake(config);
          const out: Uint8Array[] = [];
          const verdict = handshake.push(input, out);
          const bytes = Buffer.concat(out);
          // Option replies, possibly followed by the 10- or 134-byte EXPORT_NAME reply.
          if (verdict.kind === 'transmission' && bytes.length > 0 && bytes.readBigUInt64BE(0) !== 0x0003e889045565a9n) continue;
          let at = 0;
          while (bytes.length - at >= 20 && bytes.readBigUInt64BE(at) === 0x0003e889045565a9n) at += 20 + bytes.readUInt32BE(at + 16);
          assert.ok(bytes.length - at === 0 || bytes.length - at === 10 || bytes.length - at === 134, 'replies parse cleanly');
        }
      },
    ), { numRuns: 500 });
  });

  it('the request decoder only lets valid requests through and fails only with a PcacheError', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 2000 }), fc.boolean(), (noise, withValidPrefix) => {
      const queue = new ByteQueue();
      const context = { ...writableContext, structuredReplies: withValidPrefix };
      const decoder = new RequestDecoder(queue, context);
      // Headers with the right magic, so that the fields behind it are what varies.
      const bytes = Buffer.from(noise);
      for (let at = 0; at + 4 <= bytes.length && withValidPrefix; at += 28) bytes.writeUInt32BE(0x25609513, at);
      queue.push(bytes);
      try {
        for (let request = decoder.next(); request !== undefined; request = decoder.next()) {
          if (request.problem !== undefined || request.type === CMD.disc) continue;
          assert.ok(request.offsetBytes % 512 === 0 && request.lengthBytes % 512 === 0, 'aligned');
          assert.ok(request.offsetBytes + request.lengthBytes <= context.sizeBytes, 'in range');
          if (request.type === CMD.write) assert.equal(request.payload?.length, request.lengthBytes);
        }
      } catch (error) {
        assert.ok(error instanceof PcacheError, `unexpected ${String(error)}`);
      }
    }), { numRuns: 500 });
  });
});
