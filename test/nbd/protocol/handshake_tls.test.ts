// STARTTLS in the pure handshake codecs (proto.md "TLS support"), server and client: the
// FORCEDTLS refusals under 'require', the upgrade verdict and the restart of option haggling
// inside TLS with nothing kept from before (CVE-2021-3716), plaintext bytes behind STARTTLS
// refused (they would be read as if TLS protected them), and the client's refusal to go on
// without TLS. Every server transcript is fed whole, split at every byte and byte by byte.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ClientHandshake } from '../../../src/nbd/protocol/handshake_client.js';
import { Handshake, type HandshakeConfig, type HandshakeVerdict, type TlsMode } from '../../../src/nbd/protocol/handshake_server.js';
import { clientFlags, INFO, infoData, metaContextData, OPT, option, parseOptionReplies, REP } from '../../helpers/nbd_wire.js';
import { oneExport } from '../../helpers/nbd_exports.js';

/** NBD_REP_ERR_TLS_REQD (proto.md "Option reply types"). */
const errTlsReqd = 0x8000_0005;
const optionReplyMagic = 0x0003e889045565a9n;

function config(tls: TlsMode): HandshakeConfig {
  return {
    exports: oneExport('pcache', 1024 * 1024, { description: 'tls codec test' }),
    offerNoZeroes: true, offerStructuredReplies: true, optionLengthMaxBytes: 64 * 1024, optionsMax: 32, tls,
  };
}

interface Run {
  /** The server's output after the greeting, hex. */
  replies: string;
  verdict: HandshakeVerdict;
}

function feed(handshake: Handshake, chunks: Uint8Array[]): Run {
  const out: Uint8Array[] = [];
  let verdict = handshake.status;
  for (const chunk of chunks) verdict = handshake.push(chunk, out);
  return { replies: Buffer.concat(out).toString('hex'), verdict };
}

/** Feeds `bytes` to fresh machines whole, split at every offset and byte by byte; all must agree. */
function everySplit(bytes: Buffer, make: () => Handshake): Run {
  const whole = feed(make(), [bytes]);
  for (let cut = 1; cut < bytes.length; cut += 1) {
    assert.deepEqual(feed(make(), [bytes.subarray(0, cut), bytes.subarray(cut)]), whole, `split at byte ${cut} differs`);
  }
  const singles: Uint8Array[] = [];
  for (let i = 0; i < bytes.length; i += 1) singles.push(bytes.subarray(i, i + 1));
  assert.deepEqual(feed(make(), singles), whole, 'byte-by-byte feed differs');
  return whole;
}

function replyTypes(run: Run): [number, number][] {
  return parseOptionReplies(Buffer.from(run.replies, 'hex')).map((reply) => [reply.option, reply.type]);
}

const go = option(OPT.go, infoData('pcache', [INFO.blockSize]));

describe('server handshake under --tls require (FORCEDTLS)', () => {
  it('answers every option but STARTTLS and ABORT with ERR_TLS_REQD, its data consumed, and says nothing about the export', () => {
    const transcript = Buffer.concat([
      clientFlags(3),
      option(OPT.list),
      option(OPT.info, infoData('pcache', [INFO.blockSize, INFO.name, INFO.description])),
      option(OPT.structuredReply),
      option(OPT.setMetaContext, metaContextData('pcache', ['base:allocation'])),
      option(0x1234, Buffer.alloc(40, 7)),
      go,
    ]);
    const run = everySplit(transcript, () => new Handshake(config('require')));
    assert.deepEqual(replyTypes(run), [
      [OPT.list, errTlsReqd], [OPT.info, errTlsReqd], [OPT.structuredReply, errTlsReqd],
      [OPT.setMetaContext, errTlsReqd], [0x1234, errTlsReqd], [OPT.go, errTlsReqd],
    ]);
    assert.equal(run.verdict.kind, 'negotiating', 'haggling goes on: the client may still send STARTTLS');
    for (const reply of parseOptionReplies(Buffer.from(run.replies, 'hex'))) {
      assert.ok(!reply.data.toString('latin1').includes('tls codec test'), 'no export description in plaintext');
    }
  });

  it('closes on EXPORT_NAME before TLS (it has no error reply), without sending the export size', () => {
    const run = everySplit(Buffer.concat([clientFlags(3), option(OPT.exportName, Buffer.from('pcache'))]), () => new Handshake(config('require')));
    assert.equal(run.replies, '', 'nothing sent');
    assert.deepEqual(run.verdict, { kind: 'closed', reason: 'EXPORT_NAME without TLS, which this server requires', violation: false });
  });

  it('acknowledges ABORT before TLS', () => {
    const run = everySplit(Buffer.concat([clientFlags(3), option(OPT.abort)]), () => new Handshake(config('require')));
    assert.deepEqual(replyTypes(run), [[OPT.abort, REP.ack]]);
    assert.equal(run.verdict.kind, 'closed');
  });

  it('STARTTLS: ACK and the "starttls" verdict; after tlsStarted the same options succeed and ERR_TLS_REQD is never sent again', () => {
    const make = (): Handshake => new Handshake(config('require'));
    const before = everySplit(Buffer.concat([clientFlags(3), option(OPT.list), option(OPT.startTls)]), make);
    assert.deepEqual(replyTypes(before), [[OPT.list, errTlsReqd], [OPT.startTls, REP.ack]]);
    assert.deepEqual(before.verdict, { kind: 'starttls' });

    const inside = Buffer.concat([option(OPT.list), option(OPT.startTls), option(OPT.structuredReply), go]);
    const after = everySplit(inside, () => {
      const handshake = make();
      feed(handshake, [Buffer.concat([clientFlags(3), option(OPT.startTls)])]);
      assert.equal(handshake.tlsActive, false);
      handshake.tlsStarted();
      assert.equal(handshake.tlsActive, true);
      return handshake;
    });
    const types = replyTypes(after);
    assert.ok(!types.some(([, type]) => type === errTlsReqd), 'no ERR_TLS_REQD once TLS is up');
    assert.deepEqual(types.filter(([code]) => code !== OPT.go), [[OPT.list, REP.server], [OPT.list, REP.ack], [OPT.startTls, REP.errInvalid], [OPT.structuredReply, REP.ack]]);
    assert.equal(after.verdict.kind, 'transmission');
  });

  it('refuses STARTTLS with data (ERR_INVALID), and STARTTLS once TLS is up (ERR_INVALID)', () => {
    const run = everySplit(Buffer.concat([clientFlags(3), option(OPT.startTls, Buffer.from('x'))]), () => new Handshake(config('require')));
    assert.deepEqual(replyTypes(run), [[OPT.startTls, REP.errInvalid]]);
    assert.equal(run.verdict.kind, 'negotiating');
  });
});

describe('server handshake under --tls on and off', () => {
  it('on: a plaintext client is served, and is never told ERR_TLS_REQD', () => {
    const run = everySplit(Buffer.concat([clientFlags(3), option(OPT.list), option(OPT.structuredReply), go]), () => new Handshake(config('on')));
    assert.ok(!replyTypes(run).some(([, type]) => type === errTlsReqd));
    assert.equal(run.verdict.kind, 'transmission');
  });

  it('on: STARTTLS after other options is accepted too', () => {
    const run = everySplit(Buffer.concat([clientFlags(3), option(OPT.list), option(OPT.startTls)]), () => new Handshake(config('on')));
    assert.deepEqual(replyTypes(run).at(-1), [OPT.startTls, REP.ack]);
    assert.deepEqual(run.verdict, { kind: 'starttls' });
  });

  it('off (NOTLS): STARTTLS is unsupported, with or without data, and haggling goes on', () => {
    const run = everySplit(Buffer.concat([clientFlags(3), option(OPT.startTls), option(OPT.startTls, Buffer.from('ab')), go]), () => new Handshake(config('off')));
    assert.deepEqual(replyTypes(run).slice(0, 2), [[OPT.startTls, REP.errUnsup], [OPT.startTls, REP.errUnsup]]);
    assert.equal(run.verdict.kind, 'transmission');
  });

  it('discards every negotiated state at the upgrade: structured replies and base:allocation from before do not survive (CVE-2021-3716)', () => {
    const handshake = new Handshake(config('on'));
    const before = feed(handshake, [Buffer.concat([
      clientFlags(3), option(OPT.structuredReply), option(OPT.setMetaContext, metaContextData('pcache', ['base:allocation'])), option(OPT.startTls),
    ])]);
    assert.deepEqual(replyTypes(before).map(([, type]) => type), [REP.ack, REP.metaContext, REP.ack, REP.ack]);
    handshake.tlsStarted();
    const after = feed(handshake, [go]);
    assert.equal(after.verdict.kind, 'transmission');
    assert.equal(after.verdict.negotiated.structuredReplies, false, 'structured replies were negotiated in plaintext only');
    assert.equal(after.verdict.negotiated.baseAllocationContextId, undefined, 'the meta context was selected in plaintext only');
  });

  it('closes when plaintext bytes come behind STARTTLS, in the same read or later, and never reads them as options', () => {
    for (const mode of ['on', 'require'] as const) {
      const behind = new Handshake(config(mode));
      const run = feed(behind, [Buffer.concat([clientFlags(3), option(OPT.startTls), go])]);
      assert.equal(run.replies, '', `${mode}: no ACK for a STARTTLS with bytes behind it`);
      assert.deepEqual(run.verdict, { kind: 'closed', reason: 'bytes sent behind STARTTLS before its reply', violation: true });

      const later = new Handshake(config(mode));
      assert.deepEqual(feed(later, [Buffer.concat([clientFlags(3), option(OPT.startTls)])]).verdict, { kind: 'starttls' });
      const injected = feed(later, [go]);
      assert.equal(injected.replies, '');
      assert.deepEqual(injected.verdict, { kind: 'closed', reason: 'plaintext bytes after STARTTLS was acknowledged', violation: true });
    }
  });
});

// --- The client side ---

function optReply(code: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(20);
  header.writeBigUInt64BE(optionReplyMagic, 0);
  header.writeUInt32BE(code, 8);
  header.writeUInt32BE(type, 12);
  header.writeUInt32BE(data.length, 16);
  return Buffer.concat([header, data]);
}

function greeting(): Buffer {
  const bytes = Buffer.alloc(18);
  bytes.writeBigUInt64BE(0x4e42444d41474943n, 0);
  bytes.writeBigUInt64BE(0x49484156454f5054n, 8);
  bytes.writeUInt16BE(3, 16);
  return bytes;
}

function runClient(chunks: Uint8Array[]): { sent: string; verdict: ReturnType<ClientHandshake['push']>; client: ClientHandshake } {
  const client = new ClientHandshake({ exportName: 'disk', requestStructuredReplies: true, startTls: true });
  const out: Uint8Array[] = [];
  let verdict = client.status;
  for (const chunk of chunks) verdict = client.push(chunk, out);
  return { sent: Buffer.concat(out).toString('hex'), verdict, client };
}

describe('client handshake with TLS', () => {
  it('sends STARTTLS as its first option and nothing else before the ACK; after tlsStarted, STRUCTURED_REPLY', () => {
    const transcript = Buffer.concat([greeting(), optReply(OPT.startTls, REP.ack)]);
    const whole = runClient([transcript]);
    for (let cut = 1; cut < transcript.length; cut += 1) {
      const split = runClient([transcript.subarray(0, cut), transcript.subarray(cut)]);
      assert.deepEqual([split.sent, split.verdict], [whole.sent, whole.verdict], `split at ${cut}`);
    }
    assert.equal(whole.sent, Buffer.concat([clientFlags(3), option(OPT.startTls)]).toString('hex'));
    assert.deepEqual(whole.verdict, { kind: 'starttls' });
    const out: Uint8Array[] = [];
    whole.client.tlsStarted(out);
    assert.equal(Buffer.concat(out).toString('hex'), option(OPT.structuredReply).toString('hex'));
    assert.equal(whole.client.status.kind, 'negotiating');
  });

  it('fails, never falling back to plaintext, when the server refuses STARTTLS or misbehaves around it', () => {
    const cases: [string, Buffer, string, RegExp][] = [
      ['ERR_UNSUP', optReply(OPT.startTls, REP.errUnsup), 'ENOTSUP', /does not offer TLS/],
      ['ERR_POLICY', optReply(OPT.startTls, REP.errPolicy, Buffer.from('no')), 'ENOTSUP', /does not offer TLS.*"no"/],
      ['ERR_INVALID', optReply(OPT.startTls, REP.errInvalid), 'EIO', /refused STARTTLS/],
      ['an ACK with data', optReply(OPT.startTls, REP.ack, Buffer.from('x')), 'EIO', /ACK to STARTTLS carries data/],
      ['bytes behind the ACK', Buffer.concat([optReply(OPT.startTls, REP.ack), Buffer.from([1, 2, 3])]), 'EIO', /bytes behind its STARTTLS acknowledgement/],
      ['a reply to another option', optReply(OPT.go, REP.ack), 'EIO', /reply to option 7/],
    ];
    for (const [what, reply, code, message] of cases) {
      const run = runClient([Buffer.concat([greeting(), reply])]);
      assert.equal(run.verdict.kind, 'failed', what);
      assert.equal(run.verdict.code, code, what);
      assert.match(run.verdict.reason, message, what);
    }
  });

  it('talks to the server codec through an upgrade: STARTTLS, then structured replies and GO inside', () => {
    const server = new Handshake(config('require'));
    const client = new ClientHandshake({ exportName: 'pcache', requestStructuredReplies: true, startTls: true });
    let toClient: Uint8Array[] = [server.greeting()];
    let toServer: Uint8Array[] = [];
    for (let round = 0; round < 10; round += 1) {
      for (const bytes of toClient) client.push(bytes, toServer);
      toClient = [];
      if (client.status.kind === 'starttls' && server.status.kind === 'starttls') {
        server.tlsStarted();
        client.tlsStarted(toServer);
      }
      for (const bytes of toServer) server.push(bytes, toClient);
      toServer = [];
      if (client.status.kind === 'ready') break;
    }
    assert.equal(server.tlsActive, true);
    assert.equal(client.status.kind, 'ready');
    assert.equal(client.status.info.structuredReplies, true, 'structured replies negotiated inside TLS');
    assert.equal(server.status.kind, 'transmission');
  });
});
