// NbdServer behaviour beyond the hostile-input table: listening (stale, live and foreign socket
// files; TCP), concurrent dispatch and out-of-order replies, reply batching, the zero-copy READ
// layout, flags passed through to the Export, block status, shutdown limits, configuration
// checks, and programmer errors crashing the process instead of becoming NBD errors.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PcacheError } from '../../../src/lib/errors.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import { MiB } from '../../../src/lib/units.js';
import { patternBytes } from '../../helpers/bytes.js';
import { tempDir } from '../../helpers/files.js';
import { type Chunk, connectAndGo, RawClient } from '../../helpers/nbd_raw_client.js';
import { ControlledExport, startServer } from '../../helpers/nbd_server.js';
import { CHUNK, CMD, ERR, FLAG, request, TFLAG } from '../../helpers/nbd_wire.js';
import { waitUntil } from '../../helpers/wait.js';


function newExport(sizeBytes = 8 * MiB, mode: 'sync' | 'async' = 'sync'): ControlledExport {
  const exp = new ControlledExport(sizeBytes);
  exp.device.bytes.set(patternBytes(sizeBytes, 3));
  exp.mode = mode;
  return exp;
}

describe('listening', () => {
  it('replaces a Unix socket file left behind by a killed server', async (t) => {
    const dir = tempDir(t, 'pcache-nbd-');
    const socketPath = path.join(dir, 'stale.sock');
    const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(socketPath)}, () => console.log('up'))`]);
    await new Promise<void>((resolve) => { child.stdout.once('data', () => { resolve(); }); });
    child.kill('SIGKILL');
    await new Promise((resolve) => child.once('exit', resolve));
    assert.ok(fs.lstatSync(socketPath).isSocket(), 'the killed server left its socket file');
    const server = new NbdServer({ export: newExport(), exportName: 'x', readOnly: false });
    t.after(() => server.close());
    await server.listen({ path: socketPath });
    const { client } = await connectAndGo(socketPath);
    assert.equal(await client.command({ type: CMD.flush }), ERR.ok);
    client.disconnect();
  });

  it('refuses a socket something is listening on, and leaves it alone', async (t) => {
    const dir = tempDir(t, 'pcache-nbd-');
    const socketPath = path.join(dir, 'live.sock');
    const live = net.createServer((socket) => {
      socket.on('error', () => undefined);
      socket.end('still here');
    });
    await new Promise<void>((resolve) => { live.listen(socketPath, resolve); });
    t.after(() => new Promise<void>((resolve) => { live.close(() => { resolve(); }); }));
    const server = new NbdServer({ export: newExport(), exportName: 'x', readOnly: false });
    await assert.rejects(server.listen({ path: socketPath }), (error: unknown) => error instanceof PcacheError && error.code === 'EINVAL');
    const probe = await RawClient.connect(socketPath);
    assert.equal((await probe.readUntilClosed()).toString(), 'still here', 'the live server was not disturbed');
  });

  it('refuses a path that is not a socket, and leaves the file alone', async (t) => {
    const dir = tempDir(t, 'pcache-nbd-');
    const filePath = path.join(dir, 'precious');
    fs.writeFileSync(filePath, 'data');
    const server = new NbdServer({ export: newExport(), exportName: 'x', readOnly: false });
    await assert.rejects(server.listen({ path: filePath }), /not a socket/);
    assert.equal(fs.readFileSync(filePath, 'utf8'), 'data');
  });

  it('listens on TCP loopback by default and removes its Unix socket file on close', async (t) => {
    const server = new NbdServer({ export: newExport(), exportName: 'x', readOnly: false });
    const address = await server.listen({ port: 0 });
    assert.ok('port' in address && address.host === '127.0.0.1', JSON.stringify(address));
    const { client } = await connectAndGo(address.port);
    assert.equal(await client.command({ type: CMD.flush }), ERR.ok);
    client.disconnect();
    await server.close();
    const dir = tempDir(t, 'pcache-nbd-');
    const unix = new NbdServer({ export: newExport(), exportName: 'x', readOnly: false });
    await unix.listen({ path: path.join(dir, 's.sock') });
    await unix.close();
    await unix.close();
    assert.equal(fs.existsSync(path.join(dir, 's.sock')), false);
  });

  it('refuses configurations the protocol cannot carry', () => {
    assert.throws(() => new NbdServer({ export: new ControlledExport(1000), exportName: 'x', readOnly: false }), /multiple of 512/);
    assert.throws(() => new NbdServer({ export: newExport(), exportName: 'n'.repeat(4097), readOnly: false }), /4096/);
    assert.throws(() => new NbdServer({ export: newExport(), exportName: 'x', readOnly: false, limits: { inFlightBytesMax: MiB } }), /inFlightBytesMax/);
  });
});

describe('transmission', () => {
  it('dispatches requests concurrently and replies in completion order', async (t) => {
    const exp = newExport(8 * MiB, 'async');
    const srv = await startServer({ export: exp });
    t.after(() => srv.stop());
    const { client } = await connectAndGo(srv.path);
    exp.hold();
    client.send({ type: CMD.read, cookie: 1n, offset: 0, length: 4096 });
    client.send({ type: CMD.read, cookie: 2n, offset: 4096, length: 4096 });
    client.send({ type: CMD.flush, cookie: 3n });
    await waitUntil(() => exp.parkedCount === 3, 'all three requests reach the export before any completes');
    exp.releaseAt(2);
    assert.equal((await client.simpleReply()).cookie, 3n);
    exp.releaseAt(1);
    const second = await client.simpleReply(4096);
    assert.equal(second.cookie, 2n);
    assert.deepEqual(second.data, Buffer.from(exp.device.bytes.subarray(4096, 8192)));
    exp.releaseAt(0);
    assert.equal((await client.simpleReply(4096)).cookie, 1n);
    client.disconnect();
  });

  it('writes the replies of one event-loop turn with one socket write', async (t) => {
    const exp = newExport();
    const srv = await startServer({ export: exp });
    t.after(() => srv.stop());
    const { client } = await connectAndGo(srv.path);
    const before = srv.server.stats().replyBatchesTotal;
    const count = 200;
    client.write(Buffer.concat(Array.from({ length: count }, (_, i) => requestBytes(i))));
    for (let i = 0; i < count; i += 1) assert.equal((await client.simpleReply(512)).error, 0);
    const batches = srv.server.stats().replyBatchesTotal - before;
    assert.ok(batches <= 10, `${count} replies took ${batches} socket writes`);
    client.disconnect();
  });

  it('replies larger than the socket takes at once arrive whole and in order, and their buffers are reused only once sent', async (t) => {
    // Read hits complete synchronously, so each burst is answered at the end of the read that
    // brought it, with one writev to the socket's descriptor; 4 MiB of replies is more than a
    // Unix socket takes at once, so the rest goes through the stream, and the next burst
    // (answered while that is still queued) must go behind it. Pooled reply buffers are reused
    // by the next burst: one given back too early would show as wrong data.
    const exp = newExport(16 * MiB);
    const srv = await startServer({ export: exp });
    t.after(() => srv.stop());
    const { client } = await connectAndGo(srv.path);
    const length = 128 * 1024;
    const perBurst = 32;
    const bursts = 4;
    // The client reads nothing until every burst has been answered: what the socket did not
    // take stays queued in the server while the later bursts take buffers from the pool.
    client.socket.pause();
    const callsBefore = exp.calls.length;
    for (let burst = 0; burst < bursts; burst += 1) {
      const first = burst * perBurst;
      client.write(Buffer.concat(Array.from({ length: perBurst }, (_, i) => request({ type: CMD.read, cookie: BigInt(first + i), offset: ((first + i) * length) % (16 * MiB), length }))));
      await waitUntil(() => exp.calls.length - callsBefore === first + perBurst, `burst ${burst} answered`);
    }
    client.socket.resume();
    for (let index = 0; index < bursts * perBurst; index += 1) {
      const reply = await client.simpleReply(length);
      assert.equal(reply.error, ERR.ok);
      assert.equal(reply.cookie, BigInt(index), 'replies in request order');
      const offset = (index * length) % (16 * MiB);
      assert.ok(reply.data.equals(Buffer.from(exp.device.bytes.subarray(offset, offset + length))), `the data of reply ${index}`);
    }
    client.disconnect();
  });

  it('reads straight into the reply buffer, behind the reply header', async (t) => {
    const exp = newExport();
    const srv = await startServer({ export: exp });
    t.after(() => srv.stop());
    for (const structured of [false, true]) {
      const { client } = await connectAndGo(srv.path, { structured });
      client.send({ type: CMD.read, cookie: 1n, offset: 8192, length: 8192 });
      await client.reply(8192);
      const target = exp.lastReadTarget;
      assert.ok(target !== undefined);
      const prefix = structured ? 20 + 8 : 16;
      assert.equal(target.byteOffset, prefix, 'the data sits right behind the header');
      assert.equal(target.buffer.byteLength, prefix + 8192, 'one buffer holds header and data');
      client.disconnect();
    }
  });

  it('passes FUA, NO_HOLE and FAST_ZERO through to the export', async (t) => {
    const exp = newExport();
    const srv = await startServer({ export: exp });
    t.after(() => srv.stop());
    const { client } = await connectAndGo(srv.path);
    assert.equal(await client.command({ type: CMD.write, flags: FLAG.fua, offset: 0 }, Buffer.alloc(512)), ERR.ok);
    assert.equal(await client.command({ type: CMD.trim, flags: FLAG.fua, offset: 0, length: 512 }), ERR.ok);
    assert.equal(await client.command({ type: CMD.writeZeroes, flags: FLAG.fastZero | FLAG.noHole, offset: 0, length: 512 }), ERR.ok);
    assert.equal(await client.command({ type: CMD.cache, offset: 0, length: 4096 }), ERR.ok);
    assert.deepEqual(exp.calls.map((c) => c.method), ['write(fua)', 'trim(fua)', 'writeZeroes(fast)', 'cache']);
    client.disconnect();
  });

  it('reports base:allocation extents with HOLE and ZERO, merged, and one extent with REQ_ONE', async (t) => {
    const exp = newExport();
    exp.extents = () => [
      { lengthBytes: 4096, zero: false, hole: false },
      { lengthBytes: 4096, zero: true, hole: true },
      { lengthBytes: 4096, zero: true, hole: true },
    ];
    const srv = await startServer({ export: exp });
    t.after(() => srv.stop());
    const { client } = await connectAndGo(srv.path, { structured: true, metaContext: true });
    client.send({ type: CMD.blockStatus, cookie: 1n, offset: 0, length: 16384 });
    const all = await client.reply() as Chunk;
    assert.equal(all.type, CHUNK.blockStatus);
    const descriptors = [0, 1].map((i) => [all.payload.readUInt32BE(4 + 8 * i), all.payload.readUInt32BE(8 + 8 * i)]);
    assert.deepEqual(descriptors, [[4096, 0], [8192, 3]]);
    assert.equal(all.payload.length, 4 + 16);
    client.send({ type: CMD.blockStatus, flags: FLAG.reqOne, cookie: 2n, offset: 0, length: 16384 });
    const one = await client.reply() as Chunk;
    assert.equal(one.payload.length, 4 + 8);
    client.disconnect();
  });

  it('shares one export between connections (CAN_MULTI_CONN): a flushed write is visible to another connection', async (t) => {
    const exp = newExport();
    const srv = await startServer({ export: exp });
    t.after(() => srv.stop());
    const writer = await connectAndGo(srv.path);
    const reader = await connectAndGo(srv.path);
    assert.ok((writer.info.flags & TFLAG.canMultiConn) !== 0);
    const data = patternBytes(4096, 9);
    assert.equal(await writer.client.command({ type: CMD.write, offset: 4096 }, data), ERR.ok);
    assert.equal(await writer.client.command({ type: CMD.flush }), ERR.ok);
    reader.client.send({ type: CMD.read, cookie: 1n, offset: 4096, length: 4096 });
    assert.deepEqual((await reader.client.simpleReply(4096)).data, data);
    writer.client.disconnect();
    reader.client.disconnect();
  });

  it('close() gives up on an export call that never settles after shutdownTimeoutMs', async (t) => {
    const exp = newExport(8 * MiB, 'async');
    const srv = await startServer({ export: exp, limits: { shutdownTimeoutMs: 200 } });
    t.after(() => { exp.release(); });
    const { client } = await connectAndGo(srv.path);
    exp.hold();
    client.send({ type: CMD.read, cookie: 1n, offset: 0, length: 512 });
    await waitUntil(() => exp.parkedCount === 1, 'the request is in flight');
    await srv.stop();
    await client.closed;
  });
});

describe('programmer errors', () => {
  for (const mode of ['sync', 'async'] as const) {
    it(`an AssertionFailure from the export (${mode}) crashes the process instead of becoming an NBD error`, async (t) => {
      const dir = tempDir(t, 'pcache-nbd-');
      const socketPath = path.join(dir, 'crash.sock');
      const script = path.join(path.dirname(fileURLToPath(import.meta.url)), 'crash_server.js');
      const child = spawn(process.execPath, [script, socketPath, mode], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
      const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => { resolve(code); }));
      t.after(() => { child.kill('SIGKILL'); });
      await new Promise<void>((resolve) => { child.stdout.once('data', () => { resolve(); }); });
      const { client } = await connectAndGo(socketPath);
      client.send({ type: CMD.read, cookie: 1n, offset: 0, length: 512 });
      const received = await client.readUntilClosed();
      assert.equal(received.length, 0, 'no error reply was sent for a programmer error');
      assert.notEqual(await exited, 0);
      assert.match(stderr, /AssertionFailure: injected broken invariant/);
    });
  }
});

function requestBytes(index: number): Buffer {
  const bytes = Buffer.alloc(28);
  bytes.writeUInt32BE(0x25609513, 0);
  bytes.writeUInt16BE(CMD.read, 6);
  bytes.writeBigUInt64BE(BigInt(index), 8);
  bytes.writeBigUInt64BE(BigInt(index * 512), 16);
  bytes.writeUInt32BE(512, 24);
  return bytes;
}
