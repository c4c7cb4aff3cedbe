// NbdClient and NbdRemoteDevice against real nbdkit (Debian package nbdkit): round trips with
// structured and simple (--no-sr) replies, requests split to an advertised maximum payload,
// zeroing beyond 1 GiB split too, many requests in flight, FUA on the wire, requests spread
// over connections, flush semantics with and without CAN_MULTI_CONN, and nbdkit's injected
// errors mapped back to PcacheError codes. nbdkit's log filter shows what reached the server.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { GiB, MiB } from '../../../src/lib/units.js';
import { patternBytes } from '../../helpers/bytes.js';
import { isCode } from '../../helpers/errors.js';
import { connectClient, openRemoteDevice } from '../../helpers/nbd_client.js';
import { type LogEntry, Nbdkit } from '../../helpers/nbdkit.js';
import { waitUntil } from '../../helpers/wait.js';

/** Log entries of one action, after the log has caught up with `count` of them. */
async function logged(server: Nbdkit, action: string, count: number): Promise<LogEntry[]> {
  await waitUntil(() => server.log().filter((e) => e.action === action).length >= count, `nbdkit logged ${count} ${action}`);
  return server.log().filter((e) => e.action === action);
}

describe('against nbdkit', () => {
  for (const flags of [[], ['--no-sr']]) {
    const mode = flags.length === 0 ? 'structured replies' : 'simple replies (--no-sr)';
    it(`round-trips read, write, discard and sync with ${mode}`, async (t) => {
      const server = await Nbdkit.start(t, { plugin: 'memory', args: ['64M'], flags });
      const device = await openRemoteDevice(t, server.uri);
      assert.equal(device.sizeBytes, 64 * MiB);
      assert.equal(device.state().structuredReplies, flags.length === 0);
      assert.equal(device.state().multiConn, true, 'the memory plugin advertises multi-conn');
      const data = patternBytes(3 * MiB, 21);
      await device.write(data, 5 * MiB);
      await device.discard(5 * MiB + 4096, 4096);
      await device.sync();
      // A separate connection sees what the device wrote.
      const reader = await connectClient(t, server.uri);
      const back = Buffer.alloc(3 * MiB);
      await reader.read(back, 5 * MiB);
      const expected = Buffer.from(data);
      expected.fill(0, 4096, 8192);
      assert.ok(back.equals(expected), 'the data and the zeroed range are on the server');
      await device.read(back, 5 * MiB);
      assert.ok(back.equals(expected));
    });
  }

  it('splits reads and writes to the server\'s advertised maximum (which it enforces)', async (t) => {
    const server = await Nbdkit.start(t, {
      plugin: 'memory', args: ['64M', 'blocksize-maximum=1M', 'blocksize-error-policy=error'], filters: ['blocksize-policy'], log: true,
    });
    const client = await connectClient(t, server.uri);
    assert.equal(client.payloadMaxBytes, MiB);
    const data = patternBytes(5 * MiB + 4096, 4);
    await client.write(data, 4096);
    const back = Buffer.alloc(data.length);
    await client.read(back, 4096);
    assert.ok(back.equals(data));
    const writes = await logged(server, 'Write', 6);
    // nbdkit runs them concurrently, so the log may list them in any order.
    assert.deepEqual(writes.map((e) => [e.offset, e.count]).sort((a, b) => (a[0] ?? 0) - (b[0] ?? 0)), Array.from({ length: 6 }, (_, i) => [4096 + i * MiB, i < 5 ? MiB : 4096]));
  });

  it('splits zeroing beyond 1 GiB into several WRITE_ZEROES requests', async (t) => {
    const server = await Nbdkit.start(t, { plugin: 'memory', args: ['3G'], log: true });
    const device = await openRemoteDevice(t, server.uri, { connections: 1 });
    await device.write(patternBytes(4096, 1), 2 * GiB + 512 * MiB - 4096);
    await device.discard(0, 2 * GiB + 512 * MiB);
    const zeroes = await logged(server, 'Zero', 3);
    assert.deepEqual(zeroes.map((e) => [e.offset / MiB, e.count / MiB]).sort((a, b) => (a[0] ?? 0) - (b[0] ?? 0)), [[0, 1024], [1024, 1024], [2048, 512]]);
    const back = Buffer.alloc(8192);
    await device.read(back, 2 * GiB + 512 * MiB - 4096);
    assert.ok(back.every((b) => b === 0), 'the last block of the range was zeroed');
  });

  it('keeps many requests in flight on one connection (the server runs them concurrently)', async (t) => {
    const server = await Nbdkit.start(t, { plugin: 'memory', args: ['64M', 'delay-read=300ms'], filters: ['delay'], log: true });
    const client = await connectClient(t, server.uri);
    await Promise.all(Array.from({ length: 32 }, (_, i) => client.read(Buffer.alloc(4096), i * 4096)));
    assert.equal(client.peakInFlightRequests, 32);
    const reads = await logged(server, 'Read', 32);
    const returns = server.returns();
    const firstReturn = Math.min(...reads.map((e) => returns.get(`${e.connection}:Read:${e.id}`) ?? Number.POSITIVE_INFINITY));
    const startedBeforeAnyReturned = reads.filter((e) => e.line < firstReturn).length;
    assert.ok(startedBeforeAnyReturned >= 8, `only ${startedBeforeAnyReturned} reads were running at once in nbdkit`);
  });

  it('spreads requests over its connections, sends FUA, and flushes once with multi-conn', async (t) => {
    const server = await Nbdkit.start(t, { plugin: 'memory', args: ['64M'], log: true });
    const device = await openRemoteDevice(t, server.uri, { connections: 4 });
    await Promise.all(Array.from({ length: 16 }, (_, i) => device.read(Buffer.alloc(4096), i * 4096)));
    const reads = await logged(server, 'Read', 16);
    assert.equal(new Set(reads.map((e) => e.connection)).size, 4, 'every connection served reads');
    await Promise.all(Array.from({ length: 8 }, (_, i) => device.write(patternBytes(4096, i), i * 4096)));
    await device.write(patternBytes(4096, 9), MiB, { fua: true });
    await device.sync();
    const writes = await logged(server, 'Write', 9);
    assert.deepEqual(writes.map((e) => e.fua), [...Array.from({ length: 8 }, () => false), true]);
    assert.ok(new Set(writes.map((e) => e.connection)).size >= 2, 'writes went over several connections');
    const flushes = await logged(server, 'Flush', 1);
    assert.equal(flushes.length, 1, 'one FLUSH covers every connection with multi-conn');
  });

  it('without multi-conn, flushes every connection that acknowledged writes since its last flush', async (t) => {
    const server = await Nbdkit.start(t, {
      plugin: 'memory', args: ['64M', 'multi-conn-mode=disable'], filters: ['multi-conn'], log: true,
    });
    const device = await openRemoteDevice(t, server.uri, { connections: 4 });
    assert.equal(device.state().multiConn, false);
    await Promise.all(Array.from({ length: 12 }, (_, i) => device.write(patternBytes(4096, i), i * 4096)));
    await device.sync();
    const writes = await logged(server, 'Write', 12);
    const writers = new Set(writes.map((e) => e.connection));
    assert.ok(writers.size >= 2, 'writes went over several connections');
    const flushes = await logged(server, 'Flush', writers.size);
    assert.deepEqual(new Set(flushes.map((e) => e.connection)), writers, 'each writing connection was flushed');
    for (const write of writes) {
      assert.ok(flushes.some((f) => f.connection === write.connection && f.line > write.line), `write ${write.id} on connection ${write.connection} is covered`);
    }
    // Nothing written since: one FLUSH still reaches the server.
    await device.sync();
    assert.equal((await logged(server, 'Flush', writers.size + 1)).length, writers.size + 1);
  });

  for (const flags of [[], ['--no-sr']]) {
    it(`maps nbdkit's injected errors back to PcacheError codes (${flags.length === 0 ? 'structured' : 'simple'} replies)`, async (t) => {
      // Errors are injected only while the file `inject` exists.
      const server = await Nbdkit.start(t, (dir) => ({
        plugin: 'memory', filters: ['error'], flags,
        args: ['64M', ...['pread:EIO', 'pwrite:ENOSPC', 'zero:EPERM', 'trim:EINVAL'].flatMap((spec) => {
          const [op = '', error = ''] = spec.split(':');
          return [`error-${op}=${error}`, `error-${op}-rate=100%`, `error-${op}-file=${path.join(dir, 'inject')}`];
        })],
      }));
      const inject = server.file('inject');
      const client = await connectClient(t, server.uri);
      writeFileSync(inject, '');
      await assert.rejects(() => client.read(Buffer.alloc(4096), 0), isCode('EIO', /READ 0\+4096 with EIO/));
      await assert.rejects(() => client.write(Buffer.alloc(4096), 0), isCode('ENOSPC'));
      await assert.rejects(() => client.writeZeroes(0, 4096), isCode('EPERM'));
      await assert.rejects(() => client.trim(0, 4096), isCode('EINVAL'));
      rmSync(inject);
      await client.write(patternBytes(4096, 2), 0);
      const back = Buffer.alloc(4096);
      await client.read(back, 0);
      assert.deepEqual(back, patternBytes(4096, 2), 'the connection survived the errors');
    });
  }

  it('under random read errors, every read either fails with EIO or returns the right data', async (t) => {
    const server = await Nbdkit.start(t, { plugin: 'memory', args: ['64M', 'error-pread-rate=30%'], filters: ['error'] });
    const device = await openRemoteDevice(t, server.uri);
    const data = patternBytes(MiB, 8);
    await device.write(data, 0);
    const results = await Promise.all(Array.from({ length: 64 }, async (_, i) => {
      const back = Buffer.alloc(16384);
      try {
        await device.read(back, i * 16384);
      } catch (error) {
        isCode('EIO')(error);
        return 'EIO';
      }
      assert.ok(back.equals(data.subarray(i * 16384, (i + 1) * 16384)), `read ${i} returned the right data`);
      return 'ok';
    }));
    assert.ok(results.includes('EIO') && results.includes('ok'), `both outcomes occur: ${results.join(',')}`);
    assert.equal(device.state().connectionsConnected, 4, 'error replies do not cost connections');
  });
});
