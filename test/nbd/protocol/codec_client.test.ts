// The client-side codec: the client handshake, the request encoder and the reply decoder.
// Every server transcript and reply stream is fed whole, split in two at every byte offset and
// one byte at a time, and must give identical results — the results the protocol prescribes.
// The client handshake is also run against pcache's own server handshake in memory. Fixtures
// come from builders written with Buffer's big-endian methods, independent of src/nbd (most in
// test/helpers/nbd_wire.ts, shared with the client's other tests).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { PcacheError, type PcacheErrorCode } from '../../../src/lib/errors.js';
import { ByteQueue } from '../../../src/nbd/protocol/bytes.js';
import { ClientHandshake, type ClientHandshakeConfig, type ClientHandshakeVerdict } from '../../../src/nbd/protocol/handshake_client.js';
import { nbdErrnoName, pcacheCodeOfNbdErrno } from '../../../src/nbd/protocol/errno.js';
import {
  chunkPayloadMaxBytes, ReplyDecoder, type ReplyEvent, type ReplyTarget, requestHeader,
} from '../../../src/nbd/protocol/transmission_client.js';
import { Handshake, type HandshakeConfig } from '../../../src/nbd/protocol/handshake_server.js';
import { RequestDecoder } from '../../../src/nbd/protocol/transmission_server.js';
import { MiB } from '../../../src/lib/units.js';
import { assertChunkingInvariant } from '../../helpers/bytes.js';
import {
  CHUNK, chunkReply, clientFlags, CMD, FLAG, INFO, infoBlockSize, infoData, infoExport, offsetDataPayload, OPT, option, optionReply, REP, request,
  serverGreeting, simpleMagic, simpleReply, structuredMagic, TFLAG,
} from '../../helpers/nbd_wire.js';
import { oneExport } from '../../helpers/nbd_exports.js';

/** NBD_REPLY_FLAG_DONE. */
const DONE = 1;

// --- Builders for what a server sends ---

function exportNameReply(sizeBytes: bigint, flags: number, padded: boolean): Buffer {
  const bytes = Buffer.alloc(10 + (padded ? 124 : 0));
  bytes.writeBigUInt64BE(sizeBytes, 0);
  bytes.writeUInt16BE(flags, 8);
  return bytes;
}

function offsetHole(offset: number | bigint, size: number): Buffer {
  const bytes = Buffer.alloc(12);
  bytes.writeBigUInt64BE(BigInt(offset), 0);
  bytes.writeUInt32BE(size, 8);
  return bytes;
}

function errorPayload(errno: number, message: string, offset?: number, declaredMessageLength?: number): Buffer {
  const text = Buffer.from(message);
  const bytes = Buffer.alloc(6 + text.length + (offset === undefined ? 0 : 8));
  bytes.writeUInt32BE(errno, 0);
  bytes.writeUInt16BE(declaredMessageLength ?? text.length, 4);
  text.copy(bytes, 6);
  if (offset !== undefined) bytes.writeBigUInt64BE(BigInt(offset), 6 + text.length);
  return bytes;
}

function bytesOf(length: number, seed: number): Buffer {
  const bytes = Buffer.alloc(length);
  for (let i = 0; i < length; i += 1) bytes[i] = (i * 31 + seed * 7) & 0xff;
  return bytes;
}

// --- The client handshake ---

const clientConfig: ClientHandshakeConfig = { exportName: 'disk', requestStructuredReplies: true };

interface ClientRun {
  sent: string;
  verdict: ClientHandshakeVerdict;
  leftover: string;
}

function runClient(chunks: Uint8Array[], config: ClientHandshakeConfig = clientConfig): ClientRun {
  const handshake = new ClientHandshake(config);
  const out: Uint8Array[] = [];
  let verdict = handshake.status;
  for (const piece of chunks) verdict = handshake.push(piece, out);
  const leftover = Buffer.from(handshake.input.take(handshake.input.length)).toString('hex');
  return { sent: Buffer.concat(out).toString('hex'), verdict, leftover };
}

function failure(run: ClientRun): { code: PcacheErrorCode; reason: string } {
  assert.equal(run.verdict.kind, 'failed', `expected a failure, got ${JSON.stringify(run.verdict)}`);
  return run.verdict;
}

const goRequest = option(OPT.go, infoData('disk', [INFO.blockSize]));
const writableFlags = TFLAG.hasFlags | TFLAG.sendFlush | TFLAG.sendFua | TFLAG.sendTrim | TFLAG.sendWriteZeroes | TFLAG.canMultiConn;

describe('client handshake, any chunking', () => {
  it('GO with structured replies: flags, STRUCTURED_REPLY, GO asking for BLOCK_SIZE; INFOs collected; unknown INFO ignored', () => {
    const transcript = Buffer.concat([
      serverGreeting(3),
      optionReply(OPT.structuredReply, REP.ack),
      optionReply(OPT.go, REP.info, Buffer.from([0, INFO.name, 0x64, 0x69, 0x73, 0x6b])),
      optionReply(OPT.go, REP.info, infoExport(64n * BigInt(MiB), writableFlags)),
      optionReply(OPT.go, REP.info, Buffer.from([0x12, 0x34, 1, 2, 3])),
      optionReply(OPT.go, REP.info, infoBlockSize(512, 4096, 8 * MiB)),
      optionReply(OPT.go, REP.ack),
    ]);
    const run = assertChunkingInvariant(transcript, (c) => runClient(c));
    assert.equal(run.sent, Buffer.concat([clientFlags(3), option(OPT.structuredReply), goRequest]).toString('hex'));
    assert.deepEqual(run.verdict, {
      kind: 'ready',
      info: {
        sizeBytes: 64 * MiB, transmissionFlags: writableFlags, structuredReplies: true,
        blockSize: { minimumBytes: 512, preferredBytes: 4096, maximumBytes: 8 * MiB }, negotiatedWith: 'go',
      },
    });
  });

  it('structured replies refused: simple replies, GO still sent; bytes after the ACK stay for transmission', () => {
    const transcript = Buffer.concat([
      serverGreeting(3),
      optionReply(OPT.structuredReply, REP.errUnsup, Buffer.from('no thanks')),
      optionReply(OPT.go, REP.info, infoExport(1024n, TFLAG.hasFlags | TFLAG.readOnly)),
      optionReply(OPT.go, REP.ack),
      Buffer.from('after'),
    ]);
    const run = assertChunkingInvariant(transcript, (c) => runClient(c));
    assert.equal(run.verdict.kind, 'ready');
    assert.equal(run.verdict.info.structuredReplies, false);
    assert.equal(run.verdict.info.blockSize, undefined);
    assert.equal(run.leftover, Buffer.from('after').toString('hex'));
  });

  it('not asking for structured replies sends GO straight after the flags', () => {
    const transcript = Buffer.concat([serverGreeting(3), optionReply(OPT.go, REP.info, infoExport(4096n, 1)), optionReply(OPT.go, REP.ack)]);
    const run = assertChunkingInvariant(transcript, (c) => runClient(c, { exportName: 'disk', requestStructuredReplies: false }));
    assert.equal(run.sent, Buffer.concat([clientFlags(3), goRequest]).toString('hex'));
    assert.equal(run.verdict.kind, 'ready');
  });

  it('GO unsupported: falls back to EXPORT_NAME and skips the 124 padding bytes when NO_ZEROES is not offered', () => {
    const transcript = Buffer.concat([
      serverGreeting(1),
      optionReply(OPT.structuredReply, REP.errUnsup),
      optionReply(OPT.go, REP.errUnsup),
      exportNameReply(10n * BigInt(MiB), TFLAG.hasFlags | TFLAG.sendFlush, true),
      Buffer.from([0xab]),
    ]);
    const run = assertChunkingInvariant(transcript, (c) => runClient(c));
    assert.equal(run.sent, Buffer.concat([clientFlags(1), option(OPT.structuredReply), goRequest, option(OPT.exportName, Buffer.from('disk'))]).toString('hex'));
    assert.deepEqual(run.verdict, {
      kind: 'ready',
      info: { sizeBytes: 10 * MiB, transmissionFlags: TFLAG.hasFlags | TFLAG.sendFlush, structuredReplies: false, blockSize: undefined, negotiatedWith: 'export-name' },
    });
    assert.equal(run.leftover, 'ab', 'only the padding was skipped');
  });

  it('EXPORT_NAME fallback with NO_ZEROES: no padding, structured replies kept', () => {
    const transcript = Buffer.concat([
      serverGreeting(3), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.errUnsup), exportNameReply(4096n, 1, false), Buffer.from([1, 2]),
    ]);
    const run = assertChunkingInvariant(transcript, (c) => runClient(c));
    assert.equal(run.verdict.kind, 'ready');
    assert.equal(run.verdict.info.structuredReplies, true);
    assert.equal(run.verdict.info.negotiatedWith, 'export-name');
    assert.equal(run.leftover, '0102');
  });

  const failures: [string, Buffer, PcacheErrorCode, RegExp][] = [
    ['not an NBD server', Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'), 'EIO', /did not greet with NBDMAGIC/],
    ['an oldstyle server', serverGreeting(0, 0x00420281861253n), 'ENOTSUP', /oldstyle/],
    ['a greeting without IHAVEOPT', serverGreeting(1, 0x1234n), 'EIO', /lacks IHAVEOPT/],
    ['a server without fixed newstyle', serverGreeting(0), 'ENOTSUP', /fixed newstyle/],
    ['a bad option reply magic', Buffer.concat([serverGreeting(1), Buffer.alloc(20)]), 'EIO', /bad option reply magic/],
    ['a reply to an option not sent', Buffer.concat([serverGreeting(1), optionReply(OPT.list, REP.ack)]), 'EIO', /reply to option 3, but option 8 was sent/],
    ['an option reply of 4 GiB (never allocated)', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack, Buffer.alloc(0), 0xffff_ffff)]), 'EIO', /exceeds 65536/],
    ['an ACK to STRUCTURED_REPLY with data', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack, Buffer.from([1]))]), 'EIO', /carries data/],
    ['a non-error, non-ACK reply to STRUCTURED_REPLY', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.info)]), 'EIO', /unexpected reply type 0x3/],
    ['GO acknowledged without INFO_EXPORT', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.ack)]), 'EIO', /without NBD_INFO_EXPORT/],
    ['a short INFO_EXPORT', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.info, infoExport(1n, 1).subarray(0, 11))]), 'EIO', /NBD_INFO_EXPORT of 11 bytes/],
    ['an INFO without its type', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.info, Buffer.from([0]))]), 'EIO', /shorter than its type/],
    ['a minimum block size that is not a power of two', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.info, infoBlockSize(768, 4096, MiB))]), 'EIO', /minimum 768/],
    ['a preferred block size below the minimum', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.info, infoBlockSize(4096, 512, MiB))]), 'EIO', /preferred 512/],
    ['a maximum that is not a multiple of the minimum', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.info, infoBlockSize(4096, 4096, 4096 + 512))]), 'EIO', /maximum 4608/],
    ['an export of 2^53 bytes', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.info, infoExport(1n << 53n, 1)), optionReply(OPT.go, REP.ack)]), 'EINVAL', /larger than 2\^53/],
    ['an unknown export', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.errUnknown, Buffer.from('nope\n'))]), 'EINVAL', /no export named "disk": "nope\?"/],
    ['a server requiring TLS', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.errTlsReqd)]), 'ENOTSUP', /requires TLS/],
    ['a refusal by policy', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.errPolicy)]), 'EPERM', /by policy/],
    ['a server shutting down', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.errShutdown)]), 'ENODEV', /shutting down/],
    ['BLOCK_SIZE required although it was asked for', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), optionReply(OPT.go, REP.errBlockSizeReqd)]), 'EIO', /reply type 0x80000008/],
    ['endless INFO replies', Buffer.concat([serverGreeting(1), optionReply(OPT.structuredReply, REP.ack), ...Array.from({ length: 64 }, () => optionReply(OPT.go, REP.info, infoExport(1n, 1)))]), 'EIO', /more than 64 option replies/],
  ];
  for (const [name, transcript, code, reason] of failures) {
    it(`fails on ${name}, and reads nothing more`, () => {
      const run = assertChunkingInvariant(Buffer.concat([transcript, Buffer.alloc(40, 0x55)]), (c) => runClient(c));
      const { code: actualCode, reason: actualReason } = failure(run);
      assert.equal(actualCode, code);
      assert.match(actualReason, reason);
      assert.equal(run.leftover, '', 'input is dropped after a failure');
    });
  }
});

describe('client handshake against pcache\'s server handshake', () => {
  const serverConfig: HandshakeConfig = {
    exports: oneExport('disk', 8 * MiB),
    offerNoZeroes: true, offerStructuredReplies: true, optionLengthMaxBytes: 64 * 1024, optionsMax: 16,
  };

  /** Runs both machines against each other until neither has anything to say. */
  function negotiate(server: HandshakeConfig, client: ClientHandshakeConfig): { client: ClientHandshakeVerdict; server: string } {
    const serverSide = new Handshake(server);
    const clientSide = new ClientHandshake(client);
    let toClient: Uint8Array[] = [serverSide.greeting()];
    for (let round = 0; round < 20 && toClient.length > 0; round += 1) {
      const toServer: Uint8Array[] = [];
      for (const bytes of toClient) clientSide.push(bytes, toServer);
      toClient = [];
      for (const bytes of toServer) serverSide.push(bytes, toClient);
    }
    return { client: clientSide.status, server: serverSide.status.kind };
  }

  it('agrees on structured replies, size, flags and block sizes', () => {
    const result = negotiate(serverConfig, clientConfig);
    assert.equal(result.server, 'transmission');
    assert.equal(result.client.kind, 'ready');
    const info = result.client.info;
    assert.equal(info.sizeBytes, 8 * MiB);
    assert.equal(info.structuredReplies, true);
    assert.ok((info.transmissionFlags & TFLAG.canMultiConn) !== 0);
    assert.ok((info.transmissionFlags & TFLAG.sendDf) !== 0, 'DF only with structured replies');
    assert.deepEqual(info.blockSize, { minimumBytes: 512, preferredBytes: 4096, maximumBytes: 32 * MiB });
  });

  it('copes with a server that refuses structured replies and does not offer NO_ZEROES', () => {
    const result = negotiate({ ...serverConfig, offerStructuredReplies: false, offerNoZeroes: false, exports: oneExport('disk', 8 * MiB, { readOnly: true }) }, clientConfig);
    assert.equal(result.client.kind, 'ready');
    assert.equal(result.client.info.structuredReplies, false);
    assert.ok((result.client.info.transmissionFlags & TFLAG.readOnly) !== 0);
  });

  it('reports an unknown export name as EINVAL', () => {
    const result = negotiate(serverConfig, { exportName: 'other', requestStructuredReplies: true });
    assert.equal(result.client.kind, 'failed');
    assert.equal(result.client.code, 'EINVAL');
    assert.match(result.client.reason, /no export named "other"/);
  });
});

// --- Requests ---

describe('request encoder', () => {
  const cases = [
    { type: CMD.read, flags: 0, cookie: 1, offsetBytes: 0, lengthBytes: 512 },
    { type: CMD.write, flags: FLAG.fua, cookie: 0xffff_ffff, offsetBytes: 2 ** 40, lengthBytes: 32 * MiB },
    { type: CMD.flush, flags: 0, cookie: 77, offsetBytes: 0, lengthBytes: 0 },
    { type: CMD.writeZeroes, flags: FLAG.noHole, cookie: 5, offsetBytes: Number.MAX_SAFE_INTEGER - 511, lengthBytes: 0xffff_fe00 },
    { type: CMD.disc, flags: 0, cookie: 0, offsetBytes: 0, lengthBytes: 0 },
  ];
  for (const fields of cases) {
    it(`encodes command ${fields.type} byte for byte`, () => {
      const expected = request({ type: fields.type, flags: fields.flags, cookie: BigInt(fields.cookie), offset: BigInt(fields.offsetBytes), length: fields.lengthBytes });
      assert.deepEqual(Buffer.from(requestHeader(fields)), expected);
    });
  }

  it('decodes with the server\'s request decoder to the same fields', () => {
    const queue = new ByteQueue();
    const decoder = new RequestDecoder(queue, { sizeBytes: 64 * MiB, readOnly: false, structuredReplies: true, baseAllocationContextId: undefined, shuttingDown: false });
    queue.push(requestHeader({ type: CMD.trim, flags: FLAG.fua, cookie: 0x1234_5678, offsetBytes: 4096, lengthBytes: 8192 }));
    const decoded = decoder.next();
    assert.ok(decoded !== undefined);
    assert.deepEqual([decoded.type, decoded.flags, decoded.cookieHigh, decoded.cookieLow, decoded.offsetBytes, decoded.lengthBytes, decoded.problem],
      [CMD.trim, FLAG.fua, 0, 0x1234_5678, 4096, 8192, undefined]);
  });
});

// --- Replies ---

interface PendingFixture {
  cookie: number;
  command: number;
  offsetBytes: number;
  lengthBytes: number;
}

interface ReplyRun {
  events: ReplyEvent[];
  reads: Record<number, string>;
  error: string | undefined;
  canaries: boolean;
}

const canaryBytes = 16;

/** Decodes `chunks` for the given requests; READ buffers sit between canaries to catch stray writes. */
function runReplies(chunks: Uint8Array[], requests: PendingFixture[], structuredReplies: boolean): ReplyRun {
  const targets = new Map<number, ReplyTarget>();
  const arenas: Buffer[] = [];
  const reads: Record<number, string> = {};
  for (const fixture of requests) {
    let readTarget: Buffer | undefined;
    if (fixture.command === CMD.read) {
      const arena = Buffer.alloc(fixture.lengthBytes + 2 * canaryBytes, 0xcc);
      readTarget = arena.subarray(canaryBytes, canaryBytes + fixture.lengthBytes);
      readTarget.fill(0xee);
      arenas.push(arena);
    }
    targets.set(fixture.cookie, { command: fixture.command, offsetBytes: fixture.offsetBytes, lengthBytes: fixture.lengthBytes, readTarget });
  }
  const queue = new ByteQueue();
  const decoder = new ReplyDecoder(queue, (cookie) => targets.get(cookie), structuredReplies);
  const events: ReplyEvent[] = [];
  let error: string | undefined;
  try {
    for (const piece of chunks) {
      queue.push(piece);
      for (let event = decoder.next(); event !== undefined; event = decoder.next()) events.push(event);
    }
  } catch (caught) {
    if (!(caught instanceof PcacheError)) throw caught;
    error = `${caught.code}: ${caught.message}`;
  }
  for (const [cookie, target] of targets) if (target.readTarget !== undefined) reads[cookie] = Buffer.from(target.readTarget).toString('hex');
  const canaries = arenas.every((arena) => arena.subarray(0, canaryBytes).every((b) => b === 0xcc) && arena.subarray(arena.length - canaryBytes).every((b) => b === 0xcc));
  return { events, reads, error, canaries };
}

const readA: PendingFixture = { cookie: 1, command: CMD.read, offsetBytes: 4096, lengthBytes: 64 };
const writeB: PendingFixture = { cookie: 2, command: CMD.write, offsetBytes: 0, lengthBytes: 512 };
const flushC: PendingFixture = { cookie: 3, command: CMD.flush, offsetBytes: 0, lengthBytes: 0 };
const readD: PendingFixture = { cookie: 0xffff_fff0, command: CMD.read, offsetBytes: 0, lengthBytes: 16 };
const fixtures = [readA, writeB, flushC, readD];

describe('reply decoder, any chunking', () => {
  it('simple replies: READ data lands in its buffer; errors carry no data; replies in any order', () => {
    const dataA = bytesOf(64, 1);
    const stream = Buffer.concat([
      simpleReply(0, 2n), simpleReply(0, 1n, dataA), simpleReply(5, 0xffff_fff0n), simpleReply(28, 3n),
    ]);
    const run = assertChunkingInvariant(stream, (c) => runReplies(c, fixtures, false));
    assert.equal(run.error, undefined);
    assert.deepEqual(run.events, [
      { kind: 'simple', cookie: 2, errno: 0 }, { kind: 'simple', cookie: 1, errno: 0 },
      { kind: 'simple', cookie: 0xffff_fff0, errno: 5 }, { kind: 'simple', cookie: 3, errno: 28 },
    ]);
    assert.equal(run.reads[1], dataA.toString('hex'));
    assert.equal(run.reads[0xffff_fff0], 'ee'.repeat(16), 'a failed READ writes nothing');
    assert.ok(run.canaries);
  });

  it('structured replies: fragments out of order, a hole, interleaved requests, simple replies for non-READs', () => {
    const data = bytesOf(64, 2);
    const stream = Buffer.concat([
      chunkReply(0, CHUNK.offsetData, 1n, offsetDataPayload(4096 + 32, data.subarray(32, 64))),
      simpleReply(0, 2n),
      chunkReply(0, CHUNK.offsetHole, 1n, offsetHole(4096 + 16, 16)),
      chunkReply(DONE, CHUNK.offsetData, 0xffff_fff0n, offsetDataPayload(0, bytesOf(16, 3))),
      chunkReply(DONE, CHUNK.offsetData, 1n, offsetDataPayload(4096, data.subarray(0, 16))),
      chunkReply(DONE, CHUNK.none, 3n),
    ]);
    const run = assertChunkingInvariant(stream, (c) => runReplies(c, fixtures, true));
    assert.equal(run.error, undefined);
    assert.deepEqual(run.events, [
      { kind: 'data', cookie: 1, offsetBytes: 4096 + 32, lengthBytes: 32, done: false },
      { kind: 'simple', cookie: 2, errno: 0 },
      { kind: 'data', cookie: 1, offsetBytes: 4096 + 16, lengthBytes: 16, done: false },
      { kind: 'data', cookie: 0xffff_fff0, offsetBytes: 0, lengthBytes: 16, done: true },
      { kind: 'data', cookie: 1, offsetBytes: 4096, lengthBytes: 16, done: true },
      { kind: 'none', cookie: 3 },
    ]);
    const expected = Buffer.from(data);
    expected.fill(0, 16, 32);
    assert.equal(run.reads[1], expected.toString('hex'));
    assert.equal(run.reads[0xffff_fff0], bytesOf(16, 3).toString('hex'));
    assert.ok(run.canaries);
  });

  it('error chunks: ERROR with a message, ERROR_OFFSET, an unknown error type, a simple error under structured replies', () => {
    const stream = Buffer.concat([
      chunkReply(0, CHUNK.errorOffset, 1n, errorPayload(5, 'bad sector', 4096 + 8)),
      chunkReply(DONE, CHUNK.error, 1n, errorPayload(5, 'read failed')),
      chunkReply(DONE, 0x8123, 2n, Buffer.concat([errorPayload(28, 'full'), Buffer.from('future fields')])),
      simpleReply(22, 3n),
      chunkReply(DONE, CHUNK.error, 0xffff_fff0n, errorPayload(1, '')),
    ]);
    const run = assertChunkingInvariant(stream, (c) => runReplies(c, fixtures, true));
    assert.equal(run.error, undefined);
    assert.deepEqual(run.events, [
      { kind: 'error', cookie: 1, errno: 5, message: 'bad sector', done: false },
      { kind: 'error', cookie: 1, errno: 5, message: 'read failed', done: true },
      { kind: 'error', cookie: 2, errno: 28, message: 'full', done: true },
      { kind: 'simple', cookie: 3, errno: 22 },
      { kind: 'error', cookie: 0xffff_fff0, errno: 1, message: '', done: true },
    ]);
  });

  const violations: [string, Buffer, boolean, RegExp][] = [
    ['a bad reply magic', Buffer.from('garbage!garbage!garbage!'), true, /bad reply magic 0x67617262/],
    ['a reply for an unknown cookie', simpleReply(0, 99n), false, /unknown cookie 0x63\b/],
    ['a cookie with a nonzero high half', simpleReply(0, (1n << 32n) | 1n), false, /unknown cookie 0x100000001/],
    ['a structured chunk without structured replies', chunkReply(DONE, CHUNK.none, 3n), false, /structured replies were not negotiated/],
    ['a simple success reply to READ under structured replies', simpleReply(0, 1n, bytesOf(64, 1)), true, /simple success reply to READ/],
    ['OFFSET_DATA for a WRITE', chunkReply(DONE, CHUNK.offsetData, 2n, offsetDataPayload(0, bytesOf(16, 1))), true, /not a READ/],
    ['OFFSET_DATA without data', chunkReply(DONE, CHUNK.offsetData, 1n, offsetDataPayload(4096, Buffer.alloc(0))), true, /carries no data/],
    ['OFFSET_DATA longer than its READ (never allocated)', chunkReply(DONE, CHUNK.offsetData, 1n, Buffer.alloc(0), 0xffff_ffff), true, /longer than its READ/],
    ['OFFSET_DATA before its READ', chunkReply(DONE, CHUNK.offsetData, 1n, offsetDataPayload(4096 - 8, bytesOf(16, 1))), true, /range 4088\+16 lies outside its READ 4096\+64/],
    ['OFFSET_DATA past its READ', chunkReply(DONE, CHUNK.offsetData, 1n, offsetDataPayload(4096 + 56, bytesOf(16, 1))), true, /range 4152\+16 lies outside/],
    ['OFFSET_DATA at an offset beyond 2^53', chunkReply(DONE, CHUNK.offsetData, 1n, Buffer.concat([Buffer.alloc(8, 0xff), bytesOf(16, 1)])), true, /lies outside/],
    ['OFFSET_HOLE of the wrong length', chunkReply(DONE, CHUNK.offsetHole, 1n, Buffer.alloc(16)), true, /OFFSET_HOLE chunk of 16 bytes, not 12/],
    ['an OFFSET_HOLE of zero bytes', chunkReply(DONE, CHUNK.offsetHole, 1n, offsetHole(4096, 0)), true, /OFFSET_HOLE of zero bytes/],
    ['an OFFSET_HOLE past its READ', chunkReply(DONE, CHUNK.offsetHole, 1n, offsetHole(4096, 65)), true, /range 4096\+65 lies outside/],
    ['OFFSET_HOLE for a FLUSH', chunkReply(DONE, CHUNK.offsetHole, 3n, offsetHole(0, 512)), true, /not a READ/],
    ['NONE without DONE', chunkReply(0, CHUNK.none, 3n), true, /NONE chunk without the DONE flag/],
    ['NONE with a payload', chunkReply(DONE, CHUNK.none, 3n, Buffer.alloc(4)), true, /NONE chunk with 4 payload bytes/],
    ['a BLOCK_STATUS chunk nobody asked for', chunkReply(DONE, CHUNK.blockStatus, 3n, Buffer.alloc(12)), true, /unexpected chunk type 5/],
    ['an unknown non-error chunk type', chunkReply(DONE, 0x0042, 3n, Buffer.alloc(4)), true, /unexpected chunk type 66/],
    ['an error chunk shorter than its prefix', chunkReply(DONE, CHUNK.error, 3n, Buffer.alloc(5)), true, /shorter than its 6-byte prefix/],
    ['an error chunk of 4 GiB (never allocated)', chunkReply(DONE, CHUNK.error, 3n, Buffer.alloc(0), 0xffff_ffff), true, new RegExp(`exceeds ${chunkPayloadMaxBytes}`)],
    ['an error chunk with error 0', chunkReply(DONE, CHUNK.error, 3n, errorPayload(0, 'fine?')), true, /error value 0/],
    ['an error message longer than its chunk', chunkReply(DONE, CHUNK.error, 3n, errorPayload(5, 'abc', undefined, 9)), true, /message longer than its chunk/],
    ['an ERROR with trailing bytes', chunkReply(DONE, CHUNK.error, 3n, Buffer.concat([errorPayload(5, 'abc'), Buffer.alloc(2)])), true, /error chunk of 11 bytes, expected 9/],
    ['an ERROR_OFFSET outside its request', chunkReply(DONE, CHUNK.errorOffset, 1n, errorPayload(5, 'x', 4096 + 64)), true, /ERROR_OFFSET outside its request/],
  ];
  for (const [name, violating, structured, message] of violations) {
    it(`throws EIO on ${name}, after decoding what came before, at any split`, () => {
      const stream = Buffer.concat([simpleReply(0, 2n), violating, simpleReply(0, 3n)]);
      const run = assertChunkingInvariant(stream, (c) => runReplies(c, fixtures, structured));
      assert.deepEqual(run.events, [{ kind: 'simple', cookie: 2, errno: 0 }]);
      assert.ok(run.error !== undefined, 'a violation');
      assert.match(run.error, /^EIO: NBD protocol violation by the server: /);
      assert.match(run.error, message);
      assert.ok(run.canaries, 'nothing written outside READ buffers');
    });
  }
});

describe('reply decoder properties', () => {
  it('any fragmentation of a READ into data and hole chunks, in any order, reassembles the data', () => {
    fc.assert(fc.property(
      fc.uniqueArray(fc.integer({ min: 1, max: 255 }), { maxLength: 12 }),
      fc.array(fc.boolean(), { minLength: 13, maxLength: 13 }),
      fc.infiniteStream(fc.nat()),
      fc.integer({ min: 1, max: 40 }),
      (cuts, holes, order, chunkSize) => {
        const lengthBytes = 256;
        const base = 1 << 20;
        const data = bytesOf(lengthBytes, 9);
        const bounds = [0, ...[...cuts].sort((a, b) => a - b), lengthBytes];
        const expected = Buffer.from(data);
        const chunks: Buffer[] = [];
        for (let i = 0; i + 1 < bounds.length; i += 1) {
          const start = bounds[i] ?? 0;
          const end = bounds[i + 1] ?? 0;
          if (holes[i] === true) {
            expected.fill(0, start, end);
            chunks.push(chunkReply(0, CHUNK.offsetHole, 7n, offsetHole(base + start, end - start)));
          } else {
            chunks.push(chunkReply(0, CHUNK.offsetData, 7n, offsetDataPayload(base + start, data.subarray(start, end))));
          }
        }
        // Shuffle with the stream, then end with NONE.
        const iterator = order[Symbol.iterator]();
        for (let i = chunks.length - 1; i > 0; i -= 1) {
          const j = (iterator.next().value ?? 0) % (i + 1);
          [chunks[i], chunks[j]] = [chunks[j] ?? Buffer.alloc(0), chunks[i] ?? Buffer.alloc(0)];
        }
        const stream = Buffer.concat([...chunks, chunkReply(DONE, CHUNK.none, 7n)]);
        const pieces: Buffer[] = [];
        for (let at = 0; at < stream.length; at += chunkSize) pieces.push(stream.subarray(at, at + chunkSize));
        const run = runReplies(pieces, [{ cookie: 7, command: CMD.read, offsetBytes: base, lengthBytes }], true);
        assert.equal(run.error, undefined);
        assert.equal(run.reads[7], expected.toString('hex'));
        let covered = 0;
        for (const event of run.events) if (event.kind === 'data') covered += event.lengthBytes;
        assert.equal(covered, lengthBytes);
        assert.ok(run.canaries);
      },
    ), { numRuns: 300 });
  });

  it('whatever the bytes, the decoder fails only with a PcacheError and never writes outside READ buffers', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 1500 }), fc.boolean(), fc.boolean(), (noise, structured, withMagic) => {
      const bytes = Buffer.from(noise);
      // Plant magics and known cookies so the decoder gets past the first header.
      if (withMagic && bytes.length >= 20) {
        bytes.writeUInt32BE(structured ? structuredMagic : simpleMagic, 0);
        // Simple reply and chunk header alike keep the cookie at bytes 8..16.
        bytes.writeUInt32BE(0, 8);
        bytes.writeUInt32BE(1 + (bytes[19] ?? 0) % 3, 12);
      }
      const run = runReplies([bytes], fixtures, structured);
      if (run.error !== undefined) assert.match(run.error, /^EIO: /);
      assert.ok(run.canaries);
    }), { numRuns: 1000 });
  });
});

describe('NBD error numbers from a server', () => {
  const table: [number, PcacheErrorCode, string][] = [
    [1, 'EPERM', 'EPERM'], [5, 'EIO', 'EIO'], [12, 'EIO', 'ENOMEM'], [22, 'EINVAL', 'EINVAL'], [28, 'ENOSPC', 'ENOSPC'],
    [75, 'EINVAL', 'EOVERFLOW'], [95, 'ENOTSUP', 'ENOTSUP'], [108, 'ENODEV', 'ESHUTDOWN'], [4242, 'EINVAL', 'error 4242'],
  ];
  for (const [errno, code, name] of table) {
    it(`${errno} -> ${code}`, () => {
      assert.equal(pcacheCodeOfNbdErrno(errno), code);
      assert.equal(nbdErrnoName(errno), name);
    });
  }
});
