// The NBD client and NbdRemoteDevice against pcache's own NbdServer (serving a MemoryDevice
// through DeviceExport, or a ControlledExport whose calls can be held and failed), and against
// scripted servers that misbehave in one exact way each.
//
// Covered: round trips of every command; requests split to the server's maximum payload;
// many requests in flight, and the bounds on requests and bytes in flight; FUA; one FLUSH per
// sync with CAN_MULTI_CONN; simple replies when structured replies are refused; the EXPORT_NAME
// fallback; read-only exports; server errors mapped to PcacheError codes (with and without
// structured replies); ESHUTDOWN; malformed replies, overlapping or incomplete READ chunks,
// silent servers and servers that never greet — all failing requests with ENODEV, never
// hanging and never crashing the process; open() refusals; identities.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { DeviceExport } from '../../../src/device/device_export.js';
import { MemoryDevice } from '../../../src/device/memory_device.js';
import { PcacheError, type PcacheErrorCode } from '../../../src/lib/errors.js';
import { MiB } from '../../../src/lib/units.js';
import type { NbdClient } from '../../../src/nbd/client/client.js';
import { NbdRemoteDevice } from '../../../src/nbd/client/remote_device.js';
import { NbdServer, type NbdServerOptions } from '../../../src/nbd/server/server.js';
import { patternBytes } from '../../helpers/bytes.js';
import { isCode } from '../../helpers/errors.js';
import { connectClient, openRemoteDevice } from '../../helpers/nbd_client.js';
import { ControlledExport, startServer, type TestServer } from '../../helpers/nbd_server.js';
import { chunkReply, CMD, offsetDataPayload, OPT, optionReply, REP, simpleReply, TFLAG } from '../../helpers/nbd_wire.js';
import { uriFor } from '../../helpers/tools.js';
import { sleep, waitUntil } from '../../helpers/wait.js';
import { type FakeRequest, standardOptions, startFakeServer, TRANSMISSION } from './fake_server.js';

async function memoryServer(t: TestContext, sizeBytes = 16 * MiB, options: Partial<NbdServerOptions> = {}): Promise<{ srv: TestServer; device: MemoryDevice }> {
  const device = new MemoryDevice(patternBytes(sizeBytes, 5));
  const srv = await startServer({ ...options, export: new DeviceExport(device) });
  t.after(() => srv.stop());
  return { srv, device };
}

async function controlledServer(t: TestContext, sizeBytes = 8 * MiB, options: Partial<NbdServerOptions> = {}): Promise<{ srv: TestServer; exp: ControlledExport }> {
  const exp = new ControlledExport(sizeBytes);
  exp.device.bytes.set(patternBytes(sizeBytes, 6));
  const srv = await startServer({ ...options, export: exp });
  t.after(() => srv.stop());
  return { srv, exp };
}

describe('NbdRemoteDevice against pcache\'s server', () => {
  it('opens four connections and round-trips read, write, FUA write, discard and sync', async (t) => {
    const { srv, device: memory } = await memoryServer(t);
    const device = await openRemoteDevice(t, uriFor(srv.path, 'pcache'));
    assert.equal(device.sizeBytes, 16 * MiB);
    assert.equal(device.blocking, undefined);
    assert.equal(device.identity, `nbd:${srv.path}/pcache`);
    assert.equal(srv.server.stats().connectionsOpen, 4);
    const state = device.state();
    assert.deepEqual([state.connectionsWanted, state.connectionsConnected, state.multiConn, state.structuredReplies, state.readOnly],
      [4, 4, true, true, false]);

    const readBack = Buffer.alloc(64 * 1024);
    await device.read(readBack, MiB);
    assert.deepEqual(readBack, Buffer.from(memory.bytes.subarray(MiB, MiB + 64 * 1024)));
    const data = patternBytes(128 * 1024, 9);
    await device.write(data, 3 * MiB);
    await device.write(data.subarray(0, 4096), 5 * MiB, { fua: true });
    assert.deepEqual(Buffer.from(memory.bytes.subarray(3 * MiB, 3 * MiB + data.length)), data);
    await device.discard(3 * MiB + 4096, 8192);
    const afterDiscard = Buffer.alloc(16384);
    await device.read(afterDiscard, 3 * MiB);
    assert.deepEqual(afterDiscard.subarray(0, 4096), data.subarray(0, 4096));
    assert.ok(afterDiscard.subarray(4096, 12288).every((b) => b === 0), 'the discarded range reads as zeroes');
    assert.deepEqual(afterDiscard.subarray(12288), data.subarray(12288, 16384));
    await device.sync();
    await device.close();
    await waitUntil(() => srv.server.stats().connectionsOpen === 0, 'every connection closed');
    await assert.rejects(() => device.read(Buffer.alloc(512), 0), isCode('ENODEV', /closed/));
  });

  it('works over TCP (nbd://127.0.0.1:PORT/EXPORT)', async (t) => {
    const memory = new MemoryDevice(patternBytes(4 * MiB, 8));
    const server = new NbdServer({ export: new DeviceExport(memory), exportName: 'tcp-export', readOnly: false });
    t.after(() => server.close());
    const address = await server.listen({ port: 0 });
    assert.ok('port' in address);
    const device = await openRemoteDevice(t, `nbd://127.0.0.1:${address.port}/tcp-export`, { connections: 2 });
    assert.equal(device.identity, `nbd:127.0.0.1:${address.port}/tcp-export`);
    await device.write(patternBytes(64 * 1024, 1), MiB);
    await device.sync();
    const back = Buffer.alloc(64 * 1024);
    await device.read(back, MiB);
    assert.deepEqual(back, patternBytes(64 * 1024, 1));
    assert.equal(server.stats().connectionsOpen, 2);
  });

  it('splits requests larger than the server\'s 32 MiB maximum payload, and reassembles them', async (t) => {
    const { srv, exp } = await controlledServer(t, 80 * MiB);
    exp.mode = 'sync';
    const device = await openRemoteDevice(t, uriFor(srv.path), { connections: 1 });
    const data = patternBytes(72 * MiB, 12);
    await device.write(data, 4 * MiB);
    const writes = exp.calls.filter((c) => c.method === 'write');
    assert.deepEqual(writes.map((c) => [c.offsetBytes / MiB, c.lengthBytes / MiB]), [[4, 32], [36, 32], [68, 8]]);
    const back = Buffer.alloc(72 * MiB);
    await device.read(back, 4 * MiB);
    assert.deepEqual(exp.calls.filter((c) => c.method === 'read').map((c) => c.lengthBytes / MiB), [32, 32, 8]);
    assert.ok(back.equals(data), 'the split read reassembles the data');
  });

  it('keeps many requests in flight on one connection, answered out of order', async (t) => {
    const { srv, exp } = await controlledServer(t);
    const client = await connectClient(t, uriFor(srv.path));
    exp.hold();
    const buffers = Array.from({ length: 40 }, () => Buffer.alloc(4096));
    const reads = buffers.map((buffer, i) => client.read(buffer, i * 8192));
    await waitUntil(() => exp.parkedCount === 40, 'all 40 reads reached the export at once');
    // Release them newest first: the replies come back in the reverse order of the requests.
    for (let i = 39; i >= 0; i -= 1) exp.releaseAt(i);
    await Promise.all(reads);
    exp.release();
    buffers.forEach((buffer, i) => { assert.deepEqual(buffer, Buffer.from(exp.device.bytes.subarray(i * 8192, i * 8192 + 4096)), `read ${i}`); });
    assert.equal(client.peakInFlightRequests, 40);
  });

  it('bounds requests in flight per connection and queues the rest in order', async (t) => {
    const { srv, exp } = await controlledServer(t);
    const client = await connectClient(t, uriFor(srv.path), { limits: { inFlightRequestsMax: 4 } });
    exp.hold();
    const reads = Array.from({ length: 20 }, (_, i) => client.read(Buffer.alloc(4096), i * 4096));
    await waitUntil(() => exp.parkedCount === 4, 'four reads in flight');
    await sleep(50);
    assert.equal(exp.parkedCount, 4, 'no fifth request was sent');
    assert.equal(client.load, 20);
    exp.release();
    await Promise.all(reads);
    assert.equal(exp.maxInFlight, 4);
    assert.deepEqual(exp.calls.map((c) => c.offsetBytes / 4096), Array.from({ length: 20 }, (_, i) => i), 'sent in submission order');
  });

  it('bounds bytes in flight per connection, yet always admits one request larger than the bound', async (t) => {
    const { srv, exp } = await controlledServer(t);
    const client = await connectClient(t, uriFor(srv.path), { limits: { inFlightBytesMax: MiB } });
    exp.hold();
    const reads = Array.from({ length: 8 }, (_, i) => client.read(Buffer.alloc(512 * 1024), i * 512 * 1024));
    await waitUntil(() => exp.parkedCount === 2, 'two 512 KiB reads in flight');
    await sleep(50);
    assert.equal(exp.parkedCount, 2, '1 MiB in flight at most');
    exp.release();
    await Promise.all(reads);
    assert.equal(exp.maxInFlightBytes, MiB);
    await client.read(Buffer.alloc(4 * MiB), 0);
    assert.equal(exp.calls.at(-1)?.lengthBytes, 4 * MiB, 'a single 4 MiB read went out whole');
  });

  it('fails requests beyond the queue bound with EIO, without disturbing the others', async (t) => {
    const { srv, exp } = await controlledServer(t);
    const client = await connectClient(t, uriFor(srv.path), { limits: { inFlightRequestsMax: 2, queuedRequestsMax: 3 } });
    exp.hold();
    const results = Array.from({ length: 6 }, (_, i) => client.read(Buffer.alloc(512), i * 512).then(() => 'ok', (e: unknown) => (e as PcacheError).code));
    await waitUntil(() => exp.parkedCount === 2, 'two in flight');
    exp.release();
    assert.deepEqual(await Promise.all(results), ['ok', 'ok', 'ok', 'ok', 'ok', 'EIO']);
  });

  it('sends FUA on the wire, and one FLUSH per sync because the server advertises multi-conn', async (t) => {
    const { srv, exp } = await controlledServer(t);
    exp.mode = 'sync';
    const device = await openRemoteDevice(t, uriFor(srv.path), { connections: 3 });
    await Promise.all(Array.from({ length: 9 }, (_, i) => device.write(patternBytes(4096, i), i * 4096)));
    await device.write(patternBytes(4096, 99), 64 * 4096, { fua: true });
    await device.sync();
    assert.equal(exp.calls.filter((c) => c.method === 'write(fua)').length, 1);
    assert.equal(exp.calls.filter((c) => c.method === 'flush').length, 1, 'one flush covers every connection');
  });

  it('uses simple replies when the server refuses structured replies', async (t) => {
    const { srv, device: memory } = await memoryServer(t, 16 * MiB, { offerStructuredReplies: false, offerNoZeroes: false });
    const device = await openRemoteDevice(t, uriFor(srv.path), { connections: 2 });
    assert.equal(device.state().structuredReplies, false);
    const back = Buffer.alloc(3 * MiB);
    await device.read(back, 2 * MiB);
    assert.ok(back.equals(Buffer.from(memory.bytes.subarray(2 * MiB, 5 * MiB))));
    await device.write(patternBytes(8192, 1), 0);
    await device.sync();
    assert.ok(Buffer.from(memory.bytes.subarray(0, 8192)).equals(patternBytes(8192, 1)));
  });

  it('refuses writes and discards on a read-only export, or when opened read-only, with EPERM', async (t) => {
    const { srv } = await memoryServer(t, 4 * MiB, { readOnly: true });
    const device = await openRemoteDevice(t, uriFor(srv.path), { connections: 1 });
    assert.equal(device.readOnly, true);
    await assert.rejects(() => device.write(Buffer.alloc(512), 0), isCode('EPERM'));
    await assert.rejects(() => device.discard(0, 512), isCode('EPERM'));
    await device.read(Buffer.alloc(512), 0);
    const { srv: writable, device: memory } = await memoryServer(t, 4 * MiB);
    const readOnly = await openRemoteDevice(t, uriFor(writable.path), { connections: 1, readOnly: true });
    await assert.rejects(() => readOnly.write(Buffer.alloc(512), 0), isCode('EPERM'));
    assert.ok(Buffer.from(memory.bytes.subarray(0, 512)).equals(patternBytes(4 * MiB, 5).subarray(0, 512)), 'nothing was written');
  });

  for (const structured of [true, false]) {
    it(`maps server errors back to PcacheError codes (${structured ? 'structured' : 'simple'} replies)`, async (t) => {
      const { srv, exp } = await controlledServer(t, 8 * MiB, { offerStructuredReplies: structured });
      const client = await connectClient(t, uriFor(srv.path));
      const codes: PcacheErrorCode[] = ['EIO', 'ENOSPC', 'EPERM', 'EINVAL', 'ENOTSUP'];
      for (const code of codes) {
        exp.fault = (method) => (method === 'read' || method === 'write' ? new PcacheError(code, `injected ${code}`) : undefined);
        const detail = structured ? new RegExp(`with ${code}: injected ${code}`) : new RegExp(`with ${code}$`);
        await assert.rejects(() => client.read(Buffer.alloc(4096), 0), isCode(code, detail));
        await assert.rejects(() => client.write(Buffer.alloc(4096), 0), isCode(code, detail));
      }
      exp.fault = undefined;
      // The connection survives error replies.
      await client.read(Buffer.alloc(4096), 0);
      assert.ok(client.isOpen);
    });
  }

  it('treats ESHUTDOWN as the server going away: ENODEV, requests in flight finish, then a clean disconnect', async (t) => {
    const { srv, exp } = await controlledServer(t);
    const client = await connectClient(t, uriFor(srv.path));
    exp.hold();
    const inFlight = Buffer.alloc(4096);
    const held = client.read(inFlight, 8192);
    await waitUntil(() => exp.parkedCount === 1, 'a read in flight');
    const closing = srv.server.close();
    await assert.rejects(() => client.read(Buffer.alloc(512), 0), isCode('ENODEV', /ESHUTDOWN/));
    await assert.rejects(() => client.read(Buffer.alloc(512), 0), isCode('ENODEV', /closing/), 'no new requests once the server said ESHUTDOWN');
    exp.release();
    await held;
    assert.deepEqual(inFlight, Buffer.from(exp.device.bytes.subarray(8192, 8192 + 4096)), 'the request in flight completed');
    const reason = await client.closed;
    assert.equal(reason.code, 'ENODEV');
    await closing;
  });

  it('open() refuses a bad URI, a missing server, an unknown export, and a server with 4 KiB blocks', async (t) => {
    await assert.rejects(() => NbdRemoteDevice.open('nbds://host/x?tls-psk-file=/nonexistent/keys.psk'), isCode('EINVAL', /TLS PSK file/));
    await assert.rejects(() => NbdRemoteDevice.open('nbd+unix:///?socket=/nonexistent/pcache.sock'), isCode('ENODEV', /cannot open .*ENOENT/));
    await assert.rejects(() => NbdRemoteDevice.open('nbd://127.0.0.1:1/'), isCode('ENODEV', /ECONNREFUSED/));
    const { srv } = await memoryServer(t);
    await assert.rejects(() => NbdRemoteDevice.open(uriFor(srv.path, 'other')), isCode('EINVAL', /no export named "other"/));
    await assert.rejects(() => NbdRemoteDevice.open(uriFor(srv.path), { connections: 17 }), isCode('EINVAL', /connections must be/));
    const fake = await startFakeServer(t, {
      onOption: standardOptions({ sizeBytes: MiB, flags: TFLAG.hasFlags, structured: true, blockSize: [4096, 4096, MiB] }),
      onRequest: () => Buffer.alloc(0),
    });
    await assert.rejects(() => NbdRemoteDevice.open(fake.uri), isCode('EINVAL', /minimum block size is 4096 bytes/));
  });

  it('keeps identities short and stable: a long export name is hashed', async (t) => {
    const longName = 'x'.repeat(200);
    const { srv } = await memoryServer(t, 4 * MiB, { exportName: longName });
    const first = await openRemoteDevice(t, uriFor(srv.path, longName), { connections: 1 });
    const second = await openRemoteDevice(t, uriFor(srv.path, longName), { connections: 1 });
    assert.match(first.identity, /^nbd:sha256:[0-9a-f]{64}$/);
    assert.equal(first.identity, second.identity);
  });
});

describe('NbdClient against scripted servers', () => {
  const flags = TFLAG.hasFlags | TFLAG.sendFlush | TFLAG.sendFua | TFLAG.sendTrim | TFLAG.sendWriteZeroes;

  it('falls back to EXPORT_NAME when GO is unsupported, and serves simple replies', async (t) => {
    const data = patternBytes(4096, 3);
    const fake = await startFakeServer(t, {
      onOption(code, optionData) {
        if (code === OPT.exportName) {
          assert.equal(optionData.toString(), 'legacy');
          const reply = Buffer.alloc(10);
          reply.writeBigUInt64BE(BigInt(MiB), 0);
          reply.writeUInt16BE(flags, 8);
          return { reply, next: TRANSMISSION };
        }
        return { reply: optionReply(code, REP.errUnsup) };
      },
      onRequest: (request) => simpleReply(0, request.cookie, request.type === CMD.read ? data.subarray(0, request.length) : Buffer.alloc(0)),
    });
    const client = await connectClient(t, fake.uri.replace(':///', ':///legacy'));
    assert.deepEqual([client.info.negotiatedWith, client.info.structuredReplies, client.sizeBytes], ['export-name', false, MiB]);
    const back = Buffer.alloc(4096);
    await client.read(back, 0);
    assert.deepEqual(back, data);
    await client.flush();
    assert.deepEqual(fake.requests.map((r) => r.type), [CMD.read, CMD.flush]);
  });

  it('emulates FUA with a FLUSH when the server does not offer FUA, and refuses what it does not offer', async (t) => {
    const fake = await startFakeServer(t, {
      onOption: standardOptions({ sizeBytes: 4 * MiB, flags: TFLAG.hasFlags | TFLAG.sendFlush, structured: false }),
      onRequest: (request) => simpleReply(0, request.cookie),
    });
    const client = await connectClient(t, fake.uri);
    await client.write(Buffer.alloc(512), 0, { fua: true });
    assert.deepEqual(fake.requests.map((r) => [r.type, r.flags]), [[CMD.write, 0], [CMD.flush, 0]]);
    await assert.rejects(() => client.trim(0, 512), isCode('ENOTSUP', /TRIM/));
    await assert.rejects(() => client.writeZeroes(0, 512), isCode('ENOTSUP', /WRITE_ZEROES/));
    const device = await openRemoteDevice(t, fake.uri, { connections: 1 });
    await device.discard(0, 3 * 512 * 1024);
    const zeroWrites = fake.requests.slice(2).filter((r) => r.type === CMD.write);
    assert.deepEqual(zeroWrites.map((r) => [r.offset, r.length]), [[0, MiB], [MiB, 512 * 1024]], 'discard writes zeroes without WRITE_ZEROES');
    assert.ok(zeroWrites.every((r) => r.payload?.every((b) => b === 0) === true));
  });

  async function brokenServer(t: TestContext, reply: (request: FakeRequest) => Buffer, structured = true): Promise<NbdClient> {
    const fake = await startFakeServer(t, {
      onOption: standardOptions({ sizeBytes: MiB, flags, structured }),
      onRequest: (request) => (request.offset === 0 ? reply(request) : Buffer.alloc(0)),
    });
    return connectClient(t, fake.uri);
  }

  const malformed: [string, (request: FakeRequest) => Buffer, RegExp][] = [
    ['a bad reply magic', () => Buffer.alloc(32, 0x41), /bad reply magic/],
    ['a reply for a cookie never sent', (r) => simpleReply(0, r.cookie + 1000n), /unknown cookie/],
    ['overlapping READ chunks', (r) => Buffer.concat([
      chunkReply(0, 1, r.cookie, offsetDataPayload(0, Buffer.alloc(1024))),
      chunkReply(1, 1, r.cookie, offsetDataPayload(512, Buffer.alloc(1024))),
    ]), /overlapping READ chunks/],
    ['a READ reply that covers half the range', (r) => chunkReply(1, 1, r.cookie, offsetDataPayload(0, Buffer.alloc(1024))), /covered 1024 of 2048 bytes/],
  ];
  for (const [name, reply, message] of malformed) {
    it(`closes the connection on ${name}, failing every request in flight and after with ENODEV`, async (t) => {
      const client = await brokenServer(t, reply);
      const bystander = client.read(Buffer.alloc(512), 4096);
      const victim = client.read(Buffer.alloc(2048), 0);
      await assert.rejects(() => victim, isCode('ENODEV', message));
      await assert.rejects(() => bystander, isCode('ENODEV', message));
      await assert.rejects(() => client.read(Buffer.alloc(512), 0), isCode('ENODEV', message));
      assert.equal(client.isOpen, false);
    });
  }

  it('declares a server dead when a request gets no reply within requestTimeoutMs', async (t) => {
    const fake = await startFakeServer(t, { onOption: standardOptions({ sizeBytes: MiB, flags, structured: true }), onRequest: () => Buffer.alloc(0) });
    const client = await connectClient(t, fake.uri, { limits: { requestTimeoutMs: 300 } });
    const started = Date.now();
    await assert.rejects(() => client.read(Buffer.alloc(512), 0), isCode('ENODEV', /no reply for \d+ ms/));
    assert.ok(Date.now() - started < 5000, 'failed within a few timeout periods, not never');
  });

  it('gives up on a server that never greets after connectTimeoutMs', async (t) => {
    const fake = await startFakeServer(t, { greeting: undefined, onOption: standardOptions({ sizeBytes: MiB, flags, structured: true }), onRequest: () => Buffer.alloc(0) });
    await assert.rejects(() => connectClient(t, fake.uri, { limits: { connectTimeoutMs: 200 } }), isCode('ENODEV', /no NBD session after 200 ms/));
  });

  it('reports a server that hangs up during the handshake', async (t) => {
    const fake = await startFakeServer(t, {
      onOption: (code) => {
        for (const socket of fake.sockets) socket.destroy();
        return { reply: optionReply(code, REP.ack) };
      },
      onRequest: () => Buffer.alloc(0),
    });
    await assert.rejects(() => connectClient(t, fake.uri), isCode('ENODEV', /closed the connection during the handshake/));
  });

  it('checks ranges and alignment before anything is sent', async (t) => {
    const fake = await startFakeServer(t, {
      onOption: standardOptions({ sizeBytes: MiB, flags, structured: true, blockSize: [512, 4096, MiB] }),
      onRequest: (request) => simpleReply(0, request.cookie),
    });
    const client = await connectClient(t, fake.uri);
    await assert.rejects(() => client.read(Buffer.alloc(512), MiB), isCode('EINVAL', /ends past the export's end/));
    await assert.rejects(() => client.write(Buffer.alloc(100), 0), isCode('EINVAL', /not aligned to the server's 512-byte blocks/));
    await assert.rejects(() => client.trim(-512, 512), isCode('EINVAL', /bad range/));
    assert.equal(fake.requests.length, 0);
    await client.read(Buffer.alloc(0), 0);
    assert.equal(fake.requests.length, 0, 'a zero-length read sends nothing');
  });
});
