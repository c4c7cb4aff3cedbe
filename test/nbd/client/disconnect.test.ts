// When the server goes away: requests in flight and new ones fail fast with ENODEV, the device
// reconnects by itself with exponential back-off, a restarted server of another size is
// refused for good, writes acknowledged on a lost connection make the next sync fail once,
// a frozen server is declared dead by the request and connect time limits, and close() stops
// reconnecting. nbdkit (file plugin on a temporary file, so data outlives the process) is
// killed with SIGKILL and restarted on the same socket; the back-off schedule itself is
// checked with pcache's own server and manual timers.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { DeviceExport } from '../../../src/device/device_export.js';
import { MemoryDevice } from '../../../src/device/memory_device.js';
import { ManualTimers } from '../../../src/lib/timers.js';
import type { NbdRemoteDevice, NbdRemoteOptions } from '../../../src/nbd/client/remote_device.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import { MiB } from '../../../src/lib/units.js';
import { patternBytes } from '../../helpers/bytes.js';
import { isCode } from '../../helpers/errors.js';
import { tempDir } from '../../helpers/files.js';
import { openRemoteDevice } from '../../helpers/nbd_client.js';
import { fileSpec, Nbdkit } from '../../helpers/nbdkit.js';
import { uriFor } from '../../helpers/tools.js';
import { sleep, waitUntil } from '../../helpers/wait.js';
const fastReconnect = { delayMinMs: 50, delayMaxMs: 200 };

/** A remote device that reconnects within 50 to 200 ms, closed after the test. */
function openDevice(t: TestContext, uri: string, options: NbdRemoteOptions = {}): Promise<NbdRemoteDevice> {
  return openRemoteDevice(t, uri, { reconnect: fastReconnect, ...options });
}

describe('remote device when the server goes away', () => {
  it('fails requests in flight and new ones with ENODEV at once, then reconnects by itself', async (t) => {
    const server = await Nbdkit.start(t, fileSpec(16 * MiB, { filters: ['delay'], args: ['delay-read=3'], log: true }));
    const image = server.file('disk.img');
    const device = await openDevice(t, server.uri);
    const data = patternBytes(MiB, 31);
    await device.write(data, 2 * MiB);
    await device.sync();
    // Eight reads that nbdkit holds for three seconds each.
    const reads = Array.from({ length: 8 }, (_, i) => device.read(Buffer.alloc(4096), i * 4096).then(() => 'ok', (e: unknown) => e));
    await waitUntil(() => server.log().filter((e) => e.action === 'Read').length === 8, 'nbdkit received the reads');
    const killedAt = Date.now();
    await server.kill();
    const outcomes = await Promise.all(reads);
    assert.ok(Date.now() - killedAt < 2500, 'the reads failed promptly instead of waiting for a reply that never comes');
    for (const outcome of outcomes) isCode('ENODEV', /connection/)(outcome);

    await assert.rejects(() => device.read(Buffer.alloc(512), 0), isCode('ENODEV', /is offline since \d{4}-\d\d-\d\dT/));
    await assert.rejects(() => device.write(Buffer.alloc(512), 0), isCode('ENODEV'));
    await assert.rejects(() => device.sync(), isCode('ENODEV'));
    const down = device.state();
    assert.equal(down.connectionsConnected, 0);
    assert.ok(down.offlineSince !== undefined);
    assert.ok(down.lastError !== undefined);
    await waitUntil(() => device.state().reconnectAttempts >= 8, 'reconnection attempts while the server is down');

    await server.restart(fileSpec(16 * MiB)(server.dir));
    await waitUntil(() => device.state().connectionsConnected === 4, 'all four connections are back');
    const up = device.state();
    assert.deepEqual([up.offlineSince, up.reconnectAttempts, up.refused], [undefined, 0, undefined]);
    const back = Buffer.alloc(MiB);
    await device.read(back, 2 * MiB);
    assert.ok(back.equals(data), 'the data written before the kill is there');
    await device.write(patternBytes(4096, 32), 0);
    await device.sync();
    assert.ok(fs.readFileSync(image).subarray(0, 4096).equals(patternBytes(4096, 32)), 'writes after the reconnect reach the file');
  });

  it('refuses a restarted server whose export has another size, and stays disconnected', async (t) => {
    const server = await Nbdkit.start(t, fileSpec(16 * MiB));
    const device = await openDevice(t, server.uri, { connections: 2 });
    await server.kill();
    await waitUntil(() => device.state().connectionsConnected === 0, 'the loss was noticed');
    await server.restart(fileSpec(32 * MiB)(server.dir));
    await waitUntil(() => device.state().refused !== undefined, 'the device refused the new export');
    const refused = device.state();
    assert.match(refused.refused ?? '', /size changed from 16777216 to 33554432 bytes/);
    assert.equal(refused.connectionsConnected, 0);
    await assert.rejects(() => device.read(Buffer.alloc(512), 0), isCode('ENODEV', /size changed/));
    const attempts = refused.reconnectAttempts;
    await sleep(4 * fastReconnect.delayMaxMs);
    assert.equal(device.state().reconnectAttempts, attempts, 'no further attempts');
    assert.equal(device.state().connectionsConnected, 0);
  });

  it('fails the next sync once when a connection holding unflushed writes was lost', async (t) => {
    const server = await Nbdkit.start(t, fileSpec(16 * MiB));
    const device = await openDevice(t, server.uri, { connections: 2 });
    // Flushed before the loss: nothing is owed.
    await device.write(patternBytes(4096, 1), 0);
    await device.sync();
    await server.kill();
    await waitUntil(() => device.state().connectionsConnected === 0, 'the loss was noticed');
    await server.restart();
    await waitUntil(() => device.state().connectionsConnected === 2, 'reconnected');
    await device.sync();
    // Acknowledged but not flushed when the connection went: the next sync must say so.
    await device.write(patternBytes(4096, 2), 0);
    await server.kill();
    await waitUntil(() => device.state().connectionsConnected === 0, 'the loss was noticed');
    await server.restart();
    await waitUntil(() => device.state().connectionsConnected === 2, 'reconnected again');
    await assert.rejects(() => device.sync(), isCode('ENODEV', /unflushed writes was lost; they may not be durable/));
    await device.write(patternBytes(4096, 2), 0);
    await device.sync();
  });

  it('declares a frozen server dead after requestTimeoutMs, and reconnects once it thaws', async (t) => {
    const server = await Nbdkit.start(t, fileSpec(16 * MiB));
    const device = await openDevice(t, server.uri, { connections: 2, limits: { requestTimeoutMs: 400, connectTimeoutMs: 400 } });
    await server.freeze();
    // Two reads at once go over both connections (NBD has no ping: an idle connection to a
    // frozen server looks healthy until it is asked something).
    const outcomes = await Promise.allSettled([0, 1].map((i) => device.read(Buffer.alloc(4096), i * 4096)));
    for (const outcome of outcomes) {
      assert.equal(outcome.status, 'rejected');
      isCode('ENODEV', /no reply for \d+ ms/)(outcome.reason);
    }
    assert.equal(device.state().connectionsConnected, 0, 'both connections given up');
    await waitUntil(() => /no NBD session after 400 ms/.test(device.state().lastError ?? ''), 'reconnection attempts time out');
    server.thaw();
    await waitUntil(() => device.state().connectionsConnected === 2, 'reconnected after the thaw');
    await device.read(Buffer.alloc(4096), 0);
  });
});

describe('reconnection policy (pcache\'s server, manual timers)', () => {
  async function listen(socketPath: string): Promise<NbdServer> {
    const server = new NbdServer({ export: new DeviceExport(new MemoryDevice(4 * MiB)), exportName: '', readOnly: false });
    await server.listen({ path: socketPath });
    return server;
  }

  it('backs off exponentially to the maximum, resets after reconnecting, and stops at close()', async (t) => {
    const dir = tempDir(t, 'pcache-reconnect-');
    const socketPath = path.join(dir, 'nbd.sock');
    let server = await listen(socketPath);
    t.after(() => server.close());
    const timers = new ManualTimers();
    const device = await openRemoteDevice(t, uriFor(socketPath), {
      connections: 2, timers, reconnect: { delayMinMs: 100, delayMaxMs: 400 },
    });
    await server.close();
    await waitUntil(() => device.state().connectionsConnected === 0 && timers.armed === 1, 'both connections lost, a retry armed');
    assert.equal(device.state().offlineSince, '2026-01-01T00:00:00.000Z');

    // Each round tries both empty connections; the delay doubles from 100 ms and stops at 400 ms.
    let attempts = 0;
    for (const delayMs of [100, 200, 400, 400]) {
      timers.advance(delayMs - 1);
      assert.equal(device.state().reconnectAttempts, attempts, `nothing before ${delayMs} ms`);
      timers.advance(1);
      attempts += 2;
      assert.equal(device.state().reconnectAttempts, attempts, `a round after ${delayMs} ms`);
      await waitUntil(() => timers.armed === 1, 'the round failed and armed the next one');
      assert.match(device.state().lastError ?? '', /ENOENT/);
    }

    server = await listen(socketPath);
    timers.advance(400);
    await waitUntil(() => device.state().connectionsConnected === 2, 'reconnected');
    assert.deepEqual([device.state().reconnectAttempts, device.state().offlineSince, timers.armed], [0, undefined, 0]);
    await device.write(patternBytes(4096, 3), 0);

    // A new outage starts again from the minimum delay; close() cancels the pending retry.
    await server.close();
    await waitUntil(() => timers.armed === 1, 'a retry armed after the second loss');
    timers.advance(99);
    assert.equal(device.state().reconnectAttempts, 0);
    timers.advance(1);
    assert.equal(device.state().reconnectAttempts, 2, 'the delay was reset to the minimum');
    await waitUntil(() => timers.armed === 1, 'the next retry armed');
    await device.close();
    assert.equal(timers.armed, 0, 'close() cancelled the retry');
    timers.advance(10_000);
    assert.equal(device.state().reconnectAttempts, 2);
    assert.equal(device.state().closed, true);
  });

  it('gives up after reconnect.attemptsMax attempts and says so', async (t) => {
    const dir = tempDir(t, 'pcache-reconnect-');
    const socketPath = path.join(dir, 'nbd.sock');
    const server = await listen(socketPath);
    const device = await openRemoteDevice(t, uriFor(socketPath), {
      connections: 1, reconnect: { delayMinMs: 10, delayMaxMs: 20, attemptsMax: 3 },
    });
    await server.close();
    await waitUntil(() => device.state().refused !== undefined, 'the device gave up');
    assert.match(device.state().refused ?? '', /gave up after 3 reconnection attempts; last error: .*ENOENT/);
    await assert.rejects(() => device.read(Buffer.alloc(512), 0), isCode('ENODEV', /gave up/));
  });
});
