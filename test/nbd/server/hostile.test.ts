// docs/nbd.md, "Hostile inputs": the 33 hostile inputs an NBD server must survive, one test per row,
// over raw sockets. Each test checks the exact outcome the row prescribes and then that the
// server still serves a brand-new client correctly.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { PcacheError } from '../../../src/lib/errors.js';
import { NbdServer, type NbdServerOptions } from '../../../src/nbd/server/server.js';
import { MiB } from '../../../src/lib/units.js';
import { patternBytes } from '../../helpers/bytes.js';
import { connectAndGo, type Chunk, RawClient, replyError, type SimpleReply } from '../../helpers/nbd_raw_client.js';
import { assertServerServes, ControlledExport, startServer, type TestServer } from '../../helpers/nbd_server.js';
import {
  CHUNK, clientFlags, CMD, ERR, exportInfoOf, FLAG, INFO, infoData, metaContextData, OPT, option, REP, request, TFLAG,
} from '../../helpers/nbd_wire.js';
import { sleep, waitUntil } from '../../helpers/wait.js';

const deviceBytes = 8 * MiB;

interface Setup {
  exp: ControlledExport;
  srv: TestServer;
  path: string;
}

/** Waits until the export has taken in no new request for 20 polls in a row (a client that reads nothing). */
async function untilTakingInStops(s: Setup): Promise<void> {
  let stable = 0;
  let last = -1;
  await waitUntil(() => {
    stable = s.exp.calls.length === last ? stable + 1 : 0;
    last = s.exp.calls.length;
    return stable >= 20;
  }, 'the server stops taking requests in');
}

async function setup(t: TestContext, options: Partial<NbdServerOptions> & { sizeBytes?: number; mode?: 'sync' | 'async' } = {}): Promise<Setup> {
  const exp = new ControlledExport(options.sizeBytes ?? deviceBytes);
  exp.device.bytes.set(patternBytes(exp.sizeBytes, 1));
  exp.mode = options.mode ?? 'sync';
  const srv = await startServer({ ...options, export: exp });
  t.after(() => srv.stop());
  return { exp, srv, path: srv.path };
}

/** Ends a test: the server must still serve a fresh client, and every connection must clean up. */
async function stillServes(s: Setup): Promise<void> {
  await assertServerServes(s.path, s.exp.device);
  await waitUntil(() => s.srv.server.stats().connectionsOpen === 0, 'every connection is cleaned up');
}

function deviceSlice(s: Setup, offset: number, length: number): Buffer {
  return Buffer.from(s.exp.device.bytes.subarray(offset, offset + length));
}

async function expectClosedAfterGreeting(client: RawClient): Promise<void> {
  const rest = await client.readUntilClosed();
  assert.equal(rest.length, 0, 'no reply before the disconnect');
}

describe('hostile inputs (docs/nbd.md), handshake rows', () => {
  it('row 1: a connection closing at every byte offset of the handshake, and mid-reply, harms nothing', async (t) => {
    const s = await setup(t);
    const transcript = Buffer.concat([
      clientFlags(3),
      option(OPT.structuredReply),
      option(OPT.setMetaContext, metaContextData('', ['base:allocation'])),
      option(OPT.info, infoData('pcache', [INFO.blockSize])),
      option(OPT.go, infoData('')),
      request({ type: CMD.read, cookie: 1n, offset: 0, length: 4096 }),
      request({ type: CMD.write, cookie: 2n, offset: 4096 }, Buffer.alloc(4096, 0xee)),
    ]);
    const before = deviceSlice(s, 4096, 4096);
    // The same export also on TCP, where a client can send a reset (RST) instead of a FIN.
    const tcp = new NbdServer({ export: s.exp, exportName: 'pcache', readOnly: false });
    const bound = await tcp.listen({ port: 0 });
    t.after(() => tcp.close());
    const port = 'port' in bound ? bound.port : assert.fail('TCP listener without a port');
    for (const target of [s.path, port]) {
      for (let cut = 0; cut < transcript.length; cut += 1) {
        const client = await RawClient.connect(target);
        client.write(transcript.subarray(0, cut));
        if (cut % 2 === 0) client.socket.end();
        else if (typeof target === 'number') client.socket.resetAndDestroy();
        else client.destroy();
        await client.closed;
      }
    }
    assert.deepEqual(deviceSlice(s, 4096, 4096), before, 'no truncated WRITE was applied');

    // Mid-reply: the client vanishes while 32 MiB of READ replies are being written to it.
    for (const target of [s.path, port]) {
      const { client } = await connectAndGo(target);
      for (let i = 0; i < 16; i += 1) client.send({ type: CMD.read, cookie: BigInt(i), offset: 0, length: 2 * MiB });
      await client.readExact(100);
      if (typeof target === 'number') client.socket.resetAndDestroy();
      else client.destroy();
    }
    await waitUntil(() => tcp.stats().connectionsOpen === 0, 'TCP connections cleaned up');
    await stillServes(s);
  });

  it('row 2: an idle client and a one-byte-at-a-time client are cut off by the handshake time limit', async (t) => {
    const s = await setup(t, { limits: { handshakeTimeoutMs: 300 } });
    const negotiated = await connectAndGo(s.path);
    const idle = await RawClient.connect(s.path);
    await idle.greeting();
    const slow = await RawClient.connect(s.path);
    await slow.greeting();
    const drip = Buffer.concat([clientFlags(3), option(OPT.list)]);
    let sent = 0;
    const timer = setInterval(() => {
      if (sent < drip.length) slow.write(drip.subarray(sent, sent + 1));
      sent += 1;
    }, 100);
    t.after(() => { clearInterval(timer); });
    await expectClosedAfterGreeting(idle);
    await slow.readUntilClosed();
    assert.ok(sent < drip.length, 'the slow client was cut off before finishing one option');
    // A client already in transmission has no time limit.
    assert.equal(await negotiated.client.command({ type: CMD.flush }), ERR.ok);
    negotiated.client.disconnect();
    await stillServes(s);
  });

  it('row 3: a bad IHAVEOPT magic is a hard disconnect', async (t) => {
    const s = await setup(t);
    const client = await RawClient.connect(s.path);
    await client.greeting();
    const bad = option(OPT.list);
    bad.write('NOTOPTIN', 0);
    client.write(Buffer.concat([clientFlags(3), bad]));
    await expectClosedAfterGreeting(client);
    assert.equal(s.srv.server.stats().protocolViolationsTotal, 1);
    await stillServes(s);
  });

  it('row 4: unknown client flags, or NO_ZEROES when not advertised, drop the connection', async (t) => {
    const s = await setup(t);
    const unknown = await RawClient.connect(s.path);
    await unknown.greeting();
    unknown.write(clientFlags(0x11));
    await expectClosedAfterGreeting(unknown);

    const plain = await setup(t, { offerNoZeroes: false });
    const client = await RawClient.connect(plain.path);
    assert.equal(await client.greeting(), 1, 'only FIXED_NEWSTYLE advertised');
    client.write(clientFlags(3));
    await expectClosedAfterGreeting(client);
    // Without NO_ZEROES, EXPORT_NAME is answered with the 124 bytes of padding.
    const old = await RawClient.connect(plain.path);
    await old.greeting();
    old.write(Buffer.concat([clientFlags(1), option(OPT.exportName)]));
    const reply = await old.readExact(134);
    assert.equal(reply.readBigUInt64BE(0), BigInt(deviceBytes));
    assert.ok(reply.subarray(10).every((byte) => byte === 0));
    assert.equal(await old.command({ type: CMD.flush }), ERR.ok, 'the server still serves after the refused client');
    old.disconnect();
    await waitUntil(() => plain.srv.server.stats().connectionsOpen === 0, 'connections cleaned up');
    await stillServes(s);
  });

  it('row 5: an unknown option gets ERR_UNSUP after its payload is consumed', async (t) => {
    const s = await setup(t);
    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(clientFlags(3));
    const replies = await client.ask(0x1234, patternBytes(1000, 5));
    assert.deepEqual(replies.map((r) => [r.option, r.type]), [[0x1234, REP.errUnsup]]);
    const go = await client.ask(OPT.go, infoData(''));
    assert.equal(go.at(-1)?.type, REP.ack, 'the next option parses cleanly');
    assert.equal(await client.command({ type: CMD.flush }), ERR.ok);
    client.disconnect();
    await stillServes(s);
  });

  it('row 6: an option length of 0xFFFFFFFF or above the cap disconnects; one at the cap is served', async (t) => {
    const s = await setup(t);
    for (const length of [0xffffffff, 64 * 1024 + 1]) {
      const client = await RawClient.connect(s.path);
      await client.greeting();
      client.write(Buffer.concat([clientFlags(3), option(0x99, Buffer.alloc(0), length)]));
      await expectClosedAfterGreeting(client);
    }
    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(clientFlags(3));
    assert.equal((await client.ask(0x99, Buffer.alloc(64 * 1024)))[0]?.type, REP.errUnsup);
    client.write(option(OPT.abort));
    await client.optionReply();
    await stillServes(s);
  });

  it('row 7: over-long export names and name lengths beyond the option are refused, never allocated', async (t) => {
    const s = await setup(t);
    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(clientFlags(3));
    assert.equal((await client.ask(OPT.info, infoData('x'.repeat(5000))))[0]?.type, REP.errInvalid, 'name above 4096 bytes');
    assert.equal((await client.ask(OPT.go, infoData('pcache', [], { nameLength: 0xfffffff0 })))[0]?.type, REP.errInvalid, 'name length beyond the option');
    assert.equal((await client.ask(OPT.info, infoData('y'.repeat(4096))))[0]?.type, REP.errUnknown, 'a 4096-byte name is legal, just unknown');
    client.write(option(OPT.abort));
    await client.optionReply();

    const exportName = await RawClient.connect(s.path);
    await exportName.greeting();
    exportName.write(Buffer.concat([clientFlags(3), option(OPT.exportName, Buffer.alloc(4097, 0x61))]));
    await expectClosedAfterGreeting(exportName);
    await stillServes(s);
  });

  it('row 8: INFO/GO whose info-request count does not match the payload get ERR_INVALID', async (t) => {
    const s = await setup(t);
    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(clientFlags(3));
    assert.equal((await client.ask(OPT.info, infoData('', [INFO.name], { count: 5 })))[0]?.type, REP.errInvalid);
    assert.equal((await client.ask(OPT.go, Buffer.concat([infoData('', []), Buffer.from([0, 3])])))[0]?.type, REP.errInvalid);
    assert.equal((await client.ask(OPT.go, infoData(''))).at(-1)?.type, REP.ack);
    client.disconnect();
    await stillServes(s);
  });

  it('row 9: an unknown export closes EXPORT_NAME and gets ERR_UNKNOWN from INFO/GO', async (t) => {
    const s = await setup(t);
    const legacy = await RawClient.connect(s.path);
    await legacy.greeting();
    legacy.write(Buffer.concat([clientFlags(3), option(OPT.exportName, Buffer.from('nope'))]));
    await expectClosedAfterGreeting(legacy);

    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(clientFlags(3));
    assert.deepEqual((await client.ask(OPT.info, infoData('nope'))).map((r) => r.type), [REP.errUnknown]);
    assert.deepEqual((await client.ask(OPT.go, infoData('nope'))).map((r) => r.type), [REP.errUnknown]);
    const info = exportInfoOf(await client.ask(OPT.go, infoData('pcache', [INFO.name])));
    assert.equal(info.name, 'pcache');
    assert.equal(await client.command({ type: CMD.flush }), ERR.ok);
    client.disconnect();
    await stillServes(s);
  });

  it('row 10: a repeated STRUCTURED_REPLY gets ERR_INVALID, deterministically, and the first stands', async (t) => {
    const s = await setup(t);
    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(clientFlags(3));
    assert.equal((await client.ask(OPT.structuredReply))[0]?.type, REP.ack);
    assert.equal((await client.ask(OPT.structuredReply))[0]?.type, REP.errInvalid);
    const info = exportInfoOf(await client.ask(OPT.go, infoData('')));
    assert.ok((info.flags & TFLAG.sendDf) !== 0, 'structured replies still negotiated');
    client.send({ type: CMD.read, cookie: 3n, offset: 0, length: 512 });
    const reply = await client.reply();
    assert.equal(reply.kind, 'chunk');
    client.disconnect();
    await stillServes(s);
  });

  it('row 11: an endless option loop is cut off after optionsMax options', async (t) => {
    const s = await setup(t, { limits: { optionsMax: 50 } });
    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(Buffer.concat([clientFlags(3), ...Array.from({ length: 80 }, () => option(OPT.list))]));
    const rest = await client.readUntilClosed();
    // Each LIST is answered by a SERVER reply (20 + 4 + 6 bytes) and an ACK (20 bytes).
    assert.equal(rest.length, 50 * (30 + 20));
    await stillServes(s);
  });

  it('row 12: STARTTLS without TLS support gets ERR_UNSUP and the session continues in plain text', async (t) => {
    const s = await setup(t);
    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(clientFlags(3));
    assert.deepEqual((await client.ask(OPT.startTls)).map((r) => [r.option, r.type]), [[OPT.startTls, REP.errUnsup]]);
    assert.equal((await client.ask(OPT.go, infoData(''))).at(-1)?.type, REP.ack);
    client.disconnect();
    await stillServes(s);
  });

  it('row 13: ABORT is acknowledged and closed, and a client that leaves without reading the ACK is fine', async (t) => {
    const s = await setup(t);
    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(Buffer.concat([clientFlags(3), option(OPT.abort)]));
    const rest = await client.readUntilClosed();
    assert.equal(rest.length, 20);
    assert.equal(rest.readUInt32BE(12), REP.ack);
    for (let i = 0; i < 10; i += 1) {
      const rude = await RawClient.connect(s.path);
      rude.write(Buffer.concat([clientFlags(3), option(OPT.abort)]));
      rude.destroy();
    }
    await stillServes(s);
    assert.equal(s.srv.server.stats().protocolViolationsTotal, 0, 'aborting is not a violation');
  });

  it('row 14: options pipelined without waiting for replies are processed in order', async (t) => {
    const s = await setup(t);
    const client = await RawClient.connect(s.path);
    client.write(Buffer.concat([
      clientFlags(3),
      option(OPT.list),
      option(OPT.info, infoData('')),
      option(OPT.structuredReply),
      option(OPT.go, infoData('pcache')),
      request({ type: CMD.read, cookie: 77n, offset: 512, length: 512 }),
    ]));
    await client.greeting();
    const types: [number, number][] = [];
    for (let i = 0; i < 9; i += 1) {
      const reply = await client.optionReply();
      types.push([reply.option, reply.type]);
    }
    assert.deepEqual(types, [
      [OPT.list, REP.server], [OPT.list, REP.ack],
      [OPT.info, REP.info], [OPT.info, REP.info], [OPT.info, REP.ack],
      [OPT.structuredReply, REP.ack],
      [OPT.go, REP.info], [OPT.go, REP.info], [OPT.go, REP.ack],
    ]);
    const reply = await client.reply() as Chunk;
    assert.equal(reply.type, CHUNK.offsetData);
    assert.equal(reply.cookie, 77n);
    assert.deepEqual(reply.payload.subarray(8), deviceSlice(s, 512, 512));
    client.disconnect();
    await stillServes(s);
  });

  it('row 15: nothing reaches the export before GO succeeds', async (t) => {
    const s = await setup(t);
    const client = await RawClient.connect(s.path);
    await client.greeting();
    client.write(clientFlags(3));
    await client.ask(OPT.list);
    await client.ask(OPT.info, infoData(''));
    await client.ask(OPT.structuredReply);
    await client.ask(OPT.setMetaContext, metaContextData('', ['base:allocation']));
    await client.ask(OPT.go, infoData('nope'));
    assert.equal(s.exp.calls.length, 0, 'the handshake touched the export');
    await client.ask(OPT.go, infoData(''));
    assert.equal(s.exp.calls.length, 0);
    client.disconnect();
    await stillServes(s);
  });
});

describe('hostile inputs (docs/nbd.md), transmission rows', () => {
  it('row 16: a wrong request magic disconnects that client alone', async (t) => {
    const s = await setup(t);
    const bystander = await connectAndGo(s.path);
    const { client } = await connectAndGo(s.path);
    client.send({ type: CMD.read, length: 512, magic: 0xdeadbeef });
    assert.equal((await client.readUntilClosed()).length, 0);
    assert.equal(s.srv.server.stats().protocolViolationsTotal, 1);
    bystander.client.send({ type: CMD.read, cookie: 5n, offset: 1024, length: 512 });
    const reply = await bystander.client.simpleReply(512);
    assert.equal(reply.error, 0);
    assert.deepEqual(reply.data, deviceSlice(s, 1024, 512));
    bystander.client.disconnect();
    await stillServes(s);
  });

  it('row 17: an unknown command type gets EINVAL and the connection goes on', async (t) => {
    const s = await setup(t);
    const { client } = await connectAndGo(s.path);
    assert.equal(await client.command({ type: 9, cookie: 1n }), ERR.einval);
    assert.equal(await client.command({ type: 0xffff, cookie: 2n, offset: 512, length: 512 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.flush }), ERR.ok);
    client.disconnect();
    const structured = await connectAndGo(s.path, { structured: true });
    structured.client.send({ type: 8, cookie: 3n });
    const chunk = await structured.client.reply() as Chunk;
    assert.equal(chunk.type, CHUNK.error);
    assert.equal(chunk.cookie, 3n);
    assert.equal(chunk.payload.readUInt32BE(0), ERR.einval);
    assert.match(chunk.payload.subarray(6).toString(), /unknown command/);
    structured.client.disconnect();
    await stillServes(s);
  });

  it('row 18: unknown flags and flags that do not apply get EINVAL (FUA is accepted everywhere, as the spec requires)', async (t) => {
    const s = await setup(t);
    const { client } = await connectAndGo(s.path);
    assert.equal(await client.command({ type: CMD.read, flags: 0x100, length: 512 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.read, flags: FLAG.df, length: 512 }), ERR.einval, 'DF without structured replies');
    assert.equal(await client.command({ type: CMD.read, flags: FLAG.reqOne, length: 512 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.trim, flags: FLAG.fastZero, length: 512 }), ERR.einval);
    const before = deviceSlice(s, 0, 512);
    assert.equal(await client.command({ type: CMD.write, flags: FLAG.noHole, offset: 0 }, Buffer.alloc(512, 0x11)), ERR.einval);
    assert.deepEqual(deviceSlice(s, 0, 512), before, 'the refused WRITE did not land');
    client.send({ type: CMD.read, flags: FLAG.fua, cookie: 9n, length: 512 });
    const fuaRead = await client.simpleReply(512);
    assert.equal(fuaRead.error, 0, 'FUA on READ: "the server MUST accept all commands with this bit set"');
    assert.deepEqual(fuaRead.data, before, 'the refused WRITE payload was consumed, framing intact');
    client.disconnect();
    const structured = await connectAndGo(s.path, { structured: true });
    structured.client.send({ type: CMD.read, flags: FLAG.df, cookie: 4n, length: 4096 });
    const chunk = await structured.client.reply() as Chunk;
    assert.equal(chunk.type, CHUNK.offsetData, 'DF with structured replies is served in one chunk');
    structured.client.disconnect();
    await stillServes(s);
  });

  it('row 19: ranges past the end or overflowing 2^64 get EINVAL (ENOSPC for writes), payloads consumed', async (t) => {
    const s = await setup(t);
    const { client } = await connectAndGo(s.path);
    const end = deviceBytes;
    const top = 0xffff_ffff_ffff_fe00n;
    assert.equal(await client.command({ type: CMD.read, offset: end - 512, length: 1024 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.read, offset: top, length: 1024 }), ERR.einval, 'offset + length wraps 2^64');
    assert.equal(await client.command({ type: CMD.read, offset: 2n ** 53n, length: 512 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.trim, offset: end, length: 512 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.cache, offset: end - 512, length: 4096 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.write, offset: end - 512 }, Buffer.alloc(1024, 0x22)), ERR.enospc);
    assert.equal(await client.command({ type: CMD.write, offset: top }, Buffer.alloc(1024, 0x22)), ERR.enospc);
    assert.equal(await client.command({ type: CMD.writeZeroes, offset: end, length: 512 }), ERR.enospc);
    assert.deepEqual(s.exp.calls, [], 'nothing out of range reached the export');
    assert.equal(await client.command({ type: CMD.flush }), ERR.ok, 'framing intact after skipped payloads');
    client.disconnect();
    await stillServes(s);
  });

  it('row 20: a WRITE above the maximum payload is consumed and refused with EINVAL', async (t) => {
    const s = await setup(t, { sizeBytes: 40 * MiB });
    const { client } = await connectAndGo(s.path);
    const tooBig = 32 * MiB + 512;
    assert.equal(await client.command({ type: CMD.write, cookie: 1n, offset: 0 }, Buffer.alloc(tooBig, 0x33)), ERR.einval);
    assert.deepEqual(s.exp.calls, []);
    const exactlyMax = patternBytes(32 * MiB, 20);
    assert.equal(await client.command({ type: CMD.write, cookie: 2n, offset: 0 }, exactlyMax), ERR.ok);
    assert.ok(deviceSlice(s, 0, 32 * MiB).equals(exactlyMax), 'a maximal WRITE lands intact');
    client.disconnect();
    await stillServes(s);
  });

  it('row 21: a huge READ gets EINVAL without allocating or calling the export', async (t) => {
    const s = await setup(t, { sizeBytes: 40 * MiB });
    const plain = await connectAndGo(s.path);
    assert.equal(await plain.client.command({ type: CMD.read, offset: 0, length: 0xffffffff }), ERR.einval);
    assert.equal(await plain.client.command({ type: CMD.read, offset: 0, length: 32 * MiB + 512 }), ERR.einval);
    plain.client.disconnect();
    const structured = await connectAndGo(s.path, { structured: true });
    structured.client.send({ type: CMD.read, cookie: 6n, offset: 0, length: 0xfffffe00 });
    const chunk = await structured.client.reply() as Chunk;
    assert.equal(chunk.type, CHUNK.error, 'a structured READ error is an ERROR chunk, never a simple reply');
    assert.equal(chunk.payload.readUInt32BE(0), ERR.einval);
    assert.deepEqual(s.exp.calls, []);
    structured.client.send({ type: CMD.read, cookie: 7n, offset: 0, length: 32 * MiB });
    const max = await structured.client.reply() as Chunk;
    assert.ok(max.payload.subarray(8).equals(deviceSlice(s, 0, 32 * MiB)), 'a maximal READ is served');
    structured.client.disconnect();
    await stillServes(s);
  });

  it('row 22: zero-length READ/WRITE/TRIM/WRITE_ZEROES/CACHE succeed without a disconnect', async (t) => {
    const s = await setup(t);
    const { client } = await connectAndGo(s.path);
    for (const type of [CMD.read, CMD.write, CMD.trim, CMD.writeZeroes, CMD.cache]) {
      assert.equal(await client.command({ type, cookie: BigInt(type), offset: 4096, length: 0 }), ERR.ok, `command ${type}`);
    }
    client.disconnect();
    const structured = await connectAndGo(s.path, { structured: true });
    structured.client.send({ type: CMD.read, cookie: 1n, offset: 0, length: 0 });
    const chunk = await structured.client.reply() as Chunk;
    assert.deepEqual([chunk.type, chunk.flags, chunk.payload.length], [CHUNK.none, 1, 0]);
    structured.client.disconnect();
    assert.deepEqual(s.exp.calls, [], 'empty ranges never reach the export');
    await stillServes(s);
  });

  it('row 23: offsets and lengths not aligned to 512 get EINVAL', async (t) => {
    const s = await setup(t);
    const { client } = await connectAndGo(s.path);
    assert.equal(await client.command({ type: CMD.read, offset: 1, length: 512 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.read, offset: 0, length: 513 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.write, offset: 0 }, Buffer.alloc(100, 0x44)), ERR.einval);
    assert.equal(await client.command({ type: CMD.trim, offset: 256, length: 512 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.writeZeroes, offset: 0, length: 1000 }), ERR.einval);
    assert.deepEqual(s.exp.calls, []);
    assert.equal(await client.command({ type: CMD.flush }), ERR.ok);
    client.disconnect();
    await stillServes(s);
  });

  it('row 24: WRITE/TRIM/WRITE_ZEROES on a read-only export get EPERM', async (t) => {
    const s = await setup(t, { readOnly: true });
    const { client, info } = await connectAndGo(s.path);
    assert.ok((info.flags & TFLAG.readOnly) !== 0);
    const before = deviceSlice(s, 0, 4096);
    assert.equal(await client.command({ type: CMD.write, offset: 0 }, Buffer.alloc(4096, 0x55)), ERR.eperm);
    assert.equal(await client.command({ type: CMD.trim, offset: 0, length: 4096 }), ERR.eperm);
    assert.equal(await client.command({ type: CMD.writeZeroes, offset: 0, length: 4096 }), ERR.eperm);
    assert.deepEqual(deviceSlice(s, 0, 4096), before);
    assert.deepEqual(s.exp.calls, []);
    client.disconnect();
    await stillServes(s);
  });

  it('row 25: FLUSH with a nonzero offset or length gets EINVAL', async (t) => {
    const s = await setup(t);
    const { client } = await connectAndGo(s.path);
    assert.equal(await client.command({ type: CMD.flush, offset: 512 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.flush, length: 512 }), ERR.einval);
    assert.equal(await client.command({ type: CMD.flush }), ERR.ok);
    assert.deepEqual(s.exp.calls.map((c) => c.method), ['flush']);
    client.disconnect();
    await stillServes(s);
  });

  it('row 26: BLOCK_STATUS without a negotiated meta context gets EINVAL', async (t) => {
    const s = await setup(t);
    const plain = await connectAndGo(s.path);
    assert.equal(await plain.client.command({ type: CMD.blockStatus, offset: 0, length: 4096 }), ERR.einval);
    plain.client.disconnect();
    const structured = await connectAndGo(s.path, { structured: true });
    structured.client.send({ type: CMD.blockStatus, cookie: 2n, offset: 0, length: 4096 });
    assert.equal(replyError(await structured.client.reply()), ERR.einval);
    structured.client.disconnect();
    const withContext = await connectAndGo(s.path, { structured: true, metaContext: true });
    withContext.client.send({ type: CMD.blockStatus, cookie: 3n, offset: 0, length: 4096 });
    const chunk = await withContext.client.reply() as Chunk;
    assert.equal(chunk.type, CHUNK.blockStatus);
    assert.deepEqual([chunk.payload.readUInt32BE(4), chunk.payload.readUInt32BE(8)], [4096, 0]);
    withContext.client.disconnect();
    await stillServes(s);
  });

  it('row 27: duplicate cookies in flight each get their own reply', async (t) => {
    const s = await setup(t, { mode: 'async' });
    const { client } = await connectAndGo(s.path);
    s.exp.hold();
    client.send({ type: CMD.read, cookie: 42n, offset: 0, length: 4096 });
    client.send({ type: CMD.read, cookie: 42n, offset: 8192, length: 4096 });
    client.send({ type: CMD.write, cookie: 42n, offset: 65536 }, Buffer.alloc(4096, 0x66));
    await waitUntil(() => s.exp.parkedCount === 3, 'three requests in flight');
    s.exp.release();
    const replies: SimpleReply[] = [];
    for (let i = 0; i < 3; i += 1) {
      const header = await client.simpleReply();
      const data = replies.filter((r) => r.data.length > 0).length < 2 ? await client.readExact(4096) : Buffer.alloc(0);
      replies.push({ ...header, data });
    }
    assert.ok(replies.every((r) => r.cookie === 42n && r.error === 0));
    const payloads = replies.map((r) => r.data.toString('hex')).sort();
    const expected = [deviceSlice(s, 0, 4096), deviceSlice(s, 8192, 4096), Buffer.alloc(0)].map((b) => b.toString('hex')).sort();
    assert.deepEqual(payloads, expected);
    assert.ok(deviceSlice(s, 65536, 4096).equals(Buffer.alloc(4096, 0x66)));
    client.disconnect();
    await stillServes(s);
  });

  it('row 28: a truncated header or WRITE payload followed by EOF is dropped, never applied', async (t) => {
    const s = await setup(t);
    const before = deviceSlice(s, 0, 4096);
    const header = await connectAndGo(s.path);
    header.client.write(request({ type: CMD.write, cookie: 1n, offset: 0, length: 4096 }).subarray(0, 10));
    header.client.socket.end();
    assert.equal((await header.client.readUntilClosed()).length, 0);
    const payload = await connectAndGo(s.path);
    payload.client.write(request({ type: CMD.write, cookie: 2n, offset: 0 }, Buffer.alloc(4096, 0x77)).subarray(0, 28 + 1000));
    payload.client.socket.end();
    assert.equal((await payload.client.readUntilClosed()).length, 0, 'no acknowledgement for a partial WRITE');
    const huge = await connectAndGo(s.path);
    huge.client.write(request({ type: CMD.write, cookie: 3n, offset: 0, length: 0xffffffff }));
    huge.client.socket.end();
    await huge.client.readUntilClosed();
    assert.deepEqual(s.exp.calls, []);
    assert.deepEqual(deviceSlice(s, 0, 4096), before);
    await stillServes(s);
  });

  it('row 29: thousands of pipelined requests are all served, with reading paused at the in-flight limits', async (t) => {
    const s = await setup(t, { mode: 'async', limits: { inFlightRequestsMax: 32, inFlightBytesMax: 32 * MiB } });
    const { client } = await connectAndGo(s.path);
    s.exp.hold();
    const count = 5000;
    client.write(Buffer.concat(Array.from({ length: count }, (_, i) => request({ type: CMD.read, cookie: BigInt(i), offset: (i % 2048) * 4096, length: 4096 }))));
    await waitUntil(() => s.exp.parkedCount === 32, '32 requests parked');
    await sleep(50);
    assert.equal(s.exp.calls.length, 32, 'no request beyond the limit was taken in while the export is busy');
    s.exp.release();
    const seen = new Set<bigint>();
    for (let i = 0; i < count; i += 1) {
      const reply = await client.simpleReply(4096);
      assert.equal(reply.error, 0);
      seen.add(reply.cookie);
    }
    assert.equal(seen.size, count);
    assert.ok(s.exp.maxInFlight <= 32, `at most 32 in flight, saw ${s.exp.maxInFlight}`);
    assert.ok(s.srv.server.stats().readPausesTotal > 0);

    // Byte limit: 1 MiB WRITEs stop being admitted once 32 MiB are held.
    s.exp.hold();
    const writes = 64;
    client.write(Buffer.concat(Array.from({ length: writes }, (_, i) => request({ type: CMD.write, cookie: BigInt(i), offset: (i % 8) * MiB }, Buffer.alloc(MiB, i)))));
    await waitUntil(() => s.exp.parkedCount === 32, 'the byte limit reached');
    await sleep(50);
    assert.equal(s.exp.parkedCount, 32);
    s.exp.release();
    for (let i = 0; i < writes; i += 1) assert.equal((await client.simpleReply()).error, 0);
    assert.ok(s.exp.maxInFlightBytes <= 32 * MiB, `in-flight bytes ${s.exp.maxInFlightBytes}`);
    client.disconnect();
    await stillServes(s);
  });

  it('row 29 (pinned chunks): small WRITEs among large refused ones hold only their own bytes', async (t) => {
    // Every socket read lands in one reused buffer, and a WRITE payload is copied out of it
    // into a buffer of its own: a small write can never keep a refused write's 60 KiB alive,
    // so 1000 of them cost 500 KiB of the in-flight budget, not the ~60 MiB of the chunks.
    const s = await setup(t, { mode: 'async', limits: { inFlightRequestsMax: 1000, inFlightBytesMax: 32 * MiB } });
    const { client } = await connectAndGo(s.path);
    s.exp.hold();
    const pairs = 1000;
    const refusedBytes = 60 * 1024;
    const stream = Buffer.concat(Array.from({ length: pairs }, (_, i) => Buffer.concat([
      request({ type: CMD.write, cookie: BigInt(2 * i), offset: 512 * (i % 64) }, Buffer.alloc(512, i)),
      request({ type: CMD.write, cookie: BigInt(2 * i + 1), offset: s.exp.sizeBytes }, Buffer.alloc(refusedBytes)),
    ])));
    client.write(stream);
    await waitUntil(() => s.exp.parkedCount === pairs, 'every small write is admitted');
    assert.equal(s.exp.largestWriteBacking, 512, 'each payload is a buffer of its own length');
    s.exp.release();
    const errors = new Map<bigint, number>();
    for (let i = 0; i < 2 * pairs; i += 1) {
      const reply = await client.simpleReply();
      errors.set(reply.cookie, reply.error);
    }
    for (let i = 0; i < pairs; i += 1) {
      assert.equal(errors.get(BigInt(2 * i)), 0, `small write ${i}`);
      assert.equal(errors.get(BigInt(2 * i + 1)), ERR.enospc, `refused write ${i}`);
    }
    for (let slot = 0; slot < 64; slot += 1) {
      let last = slot;
      while (last + 64 < pairs) last += 64;
      assert.ok(s.exp.device.bytes.subarray(512 * slot, 512 * slot + 512).every((byte) => byte === (last & 0xff)), `slot ${slot} holds write ${last}`);
    }
    client.disconnect();
    await stillServes(s);
  });

  it('row 29 (replies): a client that never reads its replies stops being read', async (t) => {
    const s = await setup(t, { limits: { replyBacklogBytesMax: 4 * MiB } });
    const { client } = await connectAndGo(s.path);
    const count = 200;
    client.write(Buffer.concat(Array.from({ length: count }, (_, i) => request({ type: CMD.read, cookie: BigInt(i), offset: 0, length: MiB }))));
    client.socket.pause();
    await untilTakingInStops(s);
    assert.ok(s.exp.calls.length < 32, `only a bounded backlog was produced: ${s.exp.calls.length} of ${count} reads`);
    client.socket.resume();
    for (let i = 0; i < count; i += 1) assert.equal((await client.simpleReply(MiB)).error, 0);
    client.disconnect();
    await stillServes(s);
  });

  it('row 29 (large reads): a large READ waits while a reply is unsent; small ones fill the whole backlog', async (t) => {
    // Default limits (16 MiB of replies). A client that reads nothing: 1 MiB READs stop being
    // taken in once about 1 MiB of replies waits (the data would only go cold), 128 KiB READs
    // only at the 16 MiB backlog. Once the client reads, every reply comes, in order.
    const s = await setup(t);
    const { client } = await connectAndGo(s.path);
    client.socket.pause();
    const takenInWhileStalled = async (count: number, length: number): Promise<number> => {
      const before = s.exp.calls.length;
      client.write(Buffer.concat(Array.from({ length: count }, (_, i) => request({ type: CMD.read, cookie: BigInt(i), offset: (i % 8) * MiB, length }))));
      await untilTakingInStops(s);
      return s.exp.calls.length - before;
    };
    const large = await takenInWhileStalled(64, MiB);
    assert.ok(large >= 1 && large <= 4, `1 MiB reads taken in while nothing was read: ${large} (the 16 MiB backlog alone allows 16)`);
    client.socket.resume();
    for (let i = 0; i < 64; i += 1) {
      const reply = await client.simpleReply(MiB);
      assert.equal(reply.error, 0);
      assert.equal(reply.cookie, BigInt(i), 'replies in order');
    }
    client.socket.pause();
    const small = await takenInWhileStalled(256, 128 * 1024);
    assert.ok(small >= 100, `128 KiB reads taken in while nothing was read: ${small} (not held as large reads)`);
    client.socket.resume();
    for (let i = 0; i < 256; i += 1) assert.equal((await client.simpleReply(128 * 1024)).error, 0);
    client.disconnect();
    await stillServes(s);
  });

  it('row 30: a client vanishing with requests in flight, or mid-reply, affects nobody else', async (t) => {
    const s = await setup(t, { mode: 'async' });
    const bystander = await connectAndGo(s.path);
    const { client } = await connectAndGo(s.path);
    s.exp.hold();
    for (let i = 0; i < 10; i += 1) {
      client.send({ type: CMD.read, cookie: BigInt(i), offset: i * 4096, length: 4096 });
      client.send({ type: CMD.write, cookie: BigInt(100 + i), offset: MiB + i * 4096 }, Buffer.alloc(4096, 0x80 + i));
    }
    await waitUntil(() => s.exp.parkedCount === 20, 'twenty requests in flight');
    client.destroy();
    await client.closed;
    s.exp.release();
    await waitUntil(() => s.srv.server.stats().connectionsOpen === 1, 'the vanished connection is cleaned up');
    for (let i = 0; i < 10; i += 1) {
      assert.ok(deviceSlice(s, MiB + i * 4096, 4096).equals(Buffer.alloc(4096, 0x80 + i)), 'accepted writes completed');
    }
    // Mid-reply: gone while megabytes of READ data are on their way to it.
    const reader = await connectAndGo(s.path);
    for (let i = 0; i < 8; i += 1) reader.client.send({ type: CMD.read, cookie: BigInt(i), offset: 0, length: 2 * MiB });
    await reader.client.readExact(100);
    reader.client.destroy();
    await waitUntil(() => s.srv.server.stats().connectionsOpen === 1, 'the reader is cleaned up');
    bystander.client.send({ type: CMD.read, cookie: 1n, offset: MiB, length: 4096 });
    assert.ok((await bystander.client.simpleReply(4096)).data.equals(Buffer.alloc(4096, 0x80)));
    bystander.client.disconnect();
    await stillServes(s);
  });

  it('row 31: DISC with outstanding requests finishes them, replies, closes, and ignores what follows', async (t) => {
    const s = await setup(t, { mode: 'async' });
    const { client } = await connectAndGo(s.path);
    s.exp.hold();
    client.send({ type: CMD.read, cookie: 1n, offset: 0, length: 4096 });
    client.send({ type: CMD.write, cookie: 2n, offset: 8192 }, Buffer.alloc(4096, 0x99));
    client.disconnect();
    client.send({ type: CMD.write, cookie: 3n, offset: 16384 }, Buffer.alloc(4096, 0xaa));
    const untouched = deviceSlice(s, 16384, 4096);
    await waitUntil(() => s.exp.parkedCount === 2, 'two requests in flight');
    s.exp.release();
    const rest = await client.readUntilClosed();
    assert.equal(rest.length, 16 + 4096 + 16, 'one READ reply with data and one WRITE reply, nothing else');
    assert.ok(deviceSlice(s, 8192, 4096).equals(Buffer.alloc(4096, 0x99)));
    assert.deepEqual(deviceSlice(s, 16384, 4096), untouched, 'the WRITE after DISC was ignored');
    assert.equal(s.exp.calls.length, 2);
    await stillServes(s);
  });

  it('row 32: server shutdown answers new work with ESHUTDOWN, drains in-flight work, then closes', async (t) => {
    const s = await setup(t, { mode: 'async' });
    const handshaking = await RawClient.connect(s.path);
    await handshaking.greeting();
    const { client } = await connectAndGo(s.path);
    const leaver = await connectAndGo(s.path);
    s.exp.hold();
    client.send({ type: CMD.read, cookie: 1n, offset: 4096, length: 4096 });
    leaver.client.send({ type: CMD.read, cookie: 1n, offset: 0, length: 4096 });
    await waitUntil(() => s.exp.parkedCount === 2, 'two requests in flight');
    const closing = s.srv.server.close();
    await handshaking.readUntilClosed();
    // Races a socket closing during shutdown (CVE-2024-7409).
    leaver.client.destroy();
    client.send({ type: CMD.read, cookie: 2n, offset: 0, length: 4096 });
    const refused = await client.simpleReply();
    assert.deepEqual([refused.cookie, refused.error], [2n, ERR.eshutdown]);
    s.exp.release();
    const drained = await client.simpleReply(4096);
    assert.deepEqual([drained.cookie, drained.error], [1n, 0]);
    assert.deepEqual(drained.data, deviceSlice(s, 4096, 4096));
    await client.readUntilClosed();
    await closing;
    await assert.rejects(RawClient.connect(s.path), 'no new connections after close');
  });

  it('row 33: backend errors become the mapped NBD error, never a disconnect and never success', async (t) => {
    const s = await setup(t);
    const { client } = await connectAndGo(s.path);
    s.exp.fault = (method, offset) => {
      if (method === 'read' && offset === 0) return new PcacheError('EIO', 'injected read failure');
      if (method === 'write' && offset === 0) return new PcacheError('ENOSPC', 'injected full device');
      if (method === 'flush') return new PcacheError('CORRUPT', 'injected corruption');
      return undefined;
    };
    // Synchronous throws.
    assert.equal(await client.command({ type: CMD.read, cookie: 1n, offset: 0, length: 4096 }), ERR.eio, 'no data follows an error');
    assert.equal(await client.command({ type: CMD.write, cookie: 2n, offset: 0 }, Buffer.alloc(512)), ERR.enospc);
    assert.equal(await client.command({ type: CMD.flush, cookie: 3n }), ERR.eio);
    // Asynchronous rejections, over structured replies.
    s.exp.mode = 'async';
    const structured = await connectAndGo(s.path, { structured: true });
    structured.client.send({ type: CMD.read, cookie: 4n, offset: 0, length: 4096 });
    const chunk = await structured.client.reply() as Chunk;
    assert.equal(chunk.type, CHUNK.error);
    assert.equal(chunk.flags, 1);
    assert.equal(chunk.payload.readUInt32BE(0), ERR.eio);
    assert.match(chunk.payload.subarray(6).toString(), /injected read failure/);
    structured.client.send({ type: CMD.write, cookie: 5n, offset: 0 }, Buffer.alloc(512));
    assert.equal(replyError(await structured.client.reply()), ERR.enospc);
    structured.client.send({ type: CMD.read, cookie: 6n, offset: 4096, length: 4096 });
    const good = await structured.client.reply() as Chunk;
    assert.deepEqual(good.payload.subarray(8), deviceSlice(s, 4096, 4096), 'the connection still serves');
    structured.client.disconnect();
    assert.equal(await client.command({ type: CMD.read, cookie: 7n, offset: 4096, length: 0 }), ERR.ok);
    client.disconnect();
    s.exp.fault = undefined;
    await stillServes(s);
  });
});
