// The control socket's server in-process, with handlers the test controls (a drain that ends
// when the test says so) and short limits: the bounds that keep one client from hurting the
// server or the others (pending requests per connection, connections, body and head size,
// timeouts that never cut a long drain), status answered while a drain is pending, stopping
// (pending requests answered 503 ESHUTDOWN), the socket's mode, and the client's mapping of
// answers back to PcacheErrors.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { ControlServer, type ControlHandlers } from '../../src/cli/control.js';
import type { ControlLimits } from '../../src/cli/control_api.js';
import { controlCheckpoint, controlRequest } from '../../src/cli/control_client.js';
import { PcacheError, isPcacheError } from '../../src/lib/errors.js';
import { errorOf, httpExchange, httpRequest } from '../helpers/control_http.js';
import { tempDir } from '../helpers/files.js';
import { sleep, waitUntil } from '../helpers/wait.js';

/** Handlers whose drains wait until release(); `status` counts its calls. */
class Handlers implements ControlHandlers {
  statusCalls = 0;
  drainsStarted = 0;
  settings: Record<string, unknown> = { gc_percent: 70 };
  private waiting: (() => void)[] = [];

  status(): unknown {
    this.statusCalls += 1;
    return { state: 'running', drainsStarted: this.drainsStarted };
  }

  drain(): Promise<void> {
    this.drainsStarted += 1;
    return new Promise((resolve) => { this.waiting.push(resolve); });
  }

  set(changes: Readonly<Record<string, unknown>>): Promise<unknown> {
    if ('broken' in changes) return Promise.reject(new PcacheError('EIO', 'the cache device failed'));
    if (Object.keys(changes).some((name) => name !== 'gc_percent')) return Promise.reject(new PcacheError('EINVAL', 'unknown setting'));
    Object.assign(this.settings, changes);
    return Promise.resolve(this.settings);
  }

  invalidate(): Promise<number> {
    return Promise.resolve(4096);
  }

  detach(): Promise<void> {
    return Promise.resolve();
  }

  /** Checkpoints held now; each hold ends when the server's signal says the connection went. */
  holds = 0;
  checkpointsReleased = 0;

  async checkpoint(held: (point: { seq: number; lsn: number }) => Promise<void>): Promise<void> {
    this.holds += 1;
    try {
      await held({ seq: 41, lsn: 4096 });
    } finally {
      this.holds -= 1;
      this.checkpointsReleased += 1;
    }
  }

  release(): void {
    for (const resolve of this.waiting.splice(0)) resolve();
  }
}

async function started(t: TestContext, limits: Partial<ControlLimits> = {}): Promise<{ server: ControlServer; handlers: Handlers; socket: string }> {
  const handlers = new Handlers();
  const server = new ControlServer(handlers, { version: '9.9.9', limits: { timeoutCheckIntervalMs: 50, ...limits } });
  const socket = path.join(tempDir(t), 'control.sock');
  await server.listen(socket);
  t.after(async () => {
    handlers.release();
    await server.close();
  });
  return { server, handlers, socket };
}

function connect(socket: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const connection = net.connect(socket, () => { resolve(connection); });
    connection.on('error', reject);
  });
}

/** Resolves with how long the server took to close `connection`, and what it sent before. */
function closedBy(connection: net.Socket): Promise<{ afterMs: number; sent: string }> {
  const startedMs = performance.now();
  let sent = '';
  connection.on('data', (chunk: Buffer) => { sent += chunk.toString('latin1'); });
  return new Promise((resolve) => { connection.on('close', () => { resolve({ afterMs: performance.now() - startedMs, sent }); }); });
}

const drainRequest = 'POST /drain HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n';

describe('control server bounds', () => {
  it('answers status at once on another connection while a drain is pending, and the drain when it ends', async (t) => {
    const { handlers, socket } = await started(t);
    let drained = false;
    const drain = httpRequest(socket, 'POST', '/drain').then((answer) => { drained = true; return answer; });
    await sleep(50);
    const status = await httpRequest(socket, 'GET', '/status');
    assert.deepEqual([status.status, status.json], [200, { state: 'running', drainsStarted: 1 }]);
    assert.equal(drained, false, 'the drain is still pending');
    handlers.release();
    assert.deepEqual(await drain.then((answer) => [answer.status, answer.json]), [200, { drained: true }]);
  });

  it('never cuts a drain that takes longer than the request timeout', async (t) => {
    const { handlers, socket } = await started(t, { headersTimeoutMs: 100, requestTimeoutMs: 200 });
    const drain = httpRequest(socket, 'POST', '/drain');
    await sleep(800);
    handlers.release();
    assert.deepEqual(await drain.then((answer) => [answer.status, answer.json]), [200, { drained: true }]);
  });

  it('answers pipelined requests beyond the pending limit with 429 EBUSY, in order', async (t) => {
    const { handlers, socket } = await started(t, { pendingPerConnectionMax: 2 });
    const exchange = httpExchange(socket, drainRequest.repeat(4), 4);
    await sleep(100);
    assert.equal(handlers.drainsStarted, 2, 'only two drains started');
    handlers.release();
    const { answers } = await exchange;
    assert.deepEqual(answers.map((answer) => answer.status), [200, 200, 429, 429]);
    assert.equal(errorOf(answers[2] ?? assert.fail()).code, 'EBUSY');
  });

  it('drops connections beyond the limit until one goes', async (t) => {
    const { socket } = await started(t, { connectionsMax: 2 });
    const first = await connect(socket);
    const second = await connect(socket);
    await sleep(50);
    await assert.rejects(controlRequest(socket, 'status'), /closed the connection without answering status/);
    first.destroy();
    second.destroy();
    await sleep(50);
    assert.deepEqual(await controlRequest(socket, 'status'), { state: 'running', drainsStarted: 0 });
  });

  it('refuses an oversized body (declared or chunked) with 413 and closes that connection only', async (t) => {
    const { handlers, socket } = await started(t, { bodyBytesMax: 64 });
    const declared = await httpRequest(socket, 'PATCH', '/settings', `{"gc_percent":50,"pad":"${'x'.repeat(100)}"}`);
    assert.deepEqual([declared.status, errorOf(declared).code, declared.headers.connection], [413, 'E2BIG', 'close']);
    const chunk = `{"gc_percent":50,"pad":"${'x'.repeat(100)}"}`;
    const chunked = await httpExchange(socket, `PATCH /settings HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n${chunk.length.toString(16)}\r\n${chunk}\r\n0\r\n\r\n`, 2);
    assert.deepEqual([chunked.answers.map((answer) => answer.status), chunked.closed], [[413], true]);
    assert.deepEqual(handlers.settings, { gc_percent: 70 }, 'nothing was applied');
    const fine = await httpRequest(socket, 'PATCH', '/settings', '{"gc_percent":50}');
    assert.deepEqual([fine.status, fine.json], [200, { gc_percent: 50 }]);
  });

  it('refuses an oversized head with 431', async (t) => {
    const { socket } = await started(t, { headerBytesMax: 1024 });
    const { answers, closed } = await httpExchange(socket, `GET /status HTTP/1.1\r\nhost: x\r\nx-pad: ${'y'.repeat(2048)}\r\n\r\n`, 2);
    assert.deepEqual([answers.map((answer) => answer.status), closed], [[431], true]);
    assert.equal(errorOf(answers[0] ?? assert.fail()).code, 'E2BIG');
  });

  it('closes a connection that sends nothing (408) and one idle after an answer', async (t) => {
    const { socket } = await started(t, { headersTimeoutMs: 200, requestTimeoutMs: 400, idleTimeoutMs: 300 });
    const silent = await closedBy(await connect(socket));
    assert.ok(silent.afterMs < 2000, `closed after ${silent.afterMs} ms`);
    assert.match(silent.sent, /^HTTP\/1\.1 408 /);
    assert.match(silent.sent, /"code":"ETIMEDOUT"/);
    const idle = await connect(socket);
    const closed = closedBy(idle);
    idle.write('GET /status HTTP/1.1\r\nhost: x\r\n\r\n');
    const { afterMs, sent } = await closed;
    assert.match(sent, /^HTTP\/1\.1 200 /);
    assert.ok(afterMs >= 250 && afterMs < 2000, `an idle keep-alive connection closed after ${afterMs} ms`);
  });

  it('answers unknown routes 404, other methods 405 with Allow, bad JSON 400, and the engine\'s failures by code', async (t) => {
    const { socket } = await started(t);
    const index = await httpRequest(socket, 'GET', '/');
    assert.equal((index.json as { version: string }).version, '9.9.9');
    const cases: [string, string, string | undefined, number, string][] = [
      ['GET', '/nope', undefined, 404, 'ENOENT'],
      ['PUT', '/settings', '{}', 405, 'EMETHOD'],
      ['GET', '/drain', undefined, 405, 'EMETHOD'],
      ['PATCH', '/settings', '{"gc_percent":', 400, 'EINVAL'],
      ['PATCH', '/settings', '"gc_percent"', 400, 'EINVAL'],
      ['PATCH', '/settings', '{"other":1}', 400, 'EINVAL'],
      ['PATCH', '/settings', '{"broken":1}', 500, 'EIO'],
    ];
    for (const [method, route, body, status, code] of cases) {
      const answer = await httpRequest(socket, method, route, body);
      assert.deepEqual([answer.status, errorOf(answer).code], [status, code], `${method} ${route} ${body ?? ''}`);
    }
    assert.equal((await httpRequest(socket, 'GET', '/drain')).headers.allow, 'POST');
    const patched = await httpRequest(socket, 'PATCH', '/settings?ignored=1', '{}');
    assert.deepEqual([patched.status, patched.json], [200, { gc_percent: 70 }]);
  });

  it('stops: pending requests get 503 ESHUTDOWN, the socket goes, and nothing answers afterwards', async (t) => {
    const { server, handlers, socket } = await started(t);
    assert.equal(fs.statSync(socket).mode & 0o777, 0o600, 'only this user may connect');
    const drain = httpRequest(socket, 'POST', '/drain');
    const client = controlRequest(socket, 'drain').then(() => undefined, (error: unknown) => error);
    await sleep(100);
    assert.equal(handlers.drainsStarted, 2);
    await server.close();
    const answer = await drain;
    assert.deepEqual([answer.status, errorOf(answer).code, answer.headers.connection], [503, 'ESHUTDOWN', 'close']);
    const error = await client;
    assert.ok(isPcacheError(error) && error.code === 'ESHUTDOWN', String(error));
    assert.match(error.message, /the server refused drain: the server is stopping/);
    assert.equal(fs.existsSync(socket), false);
    await assert.rejects(controlRequest(socket, 'status'), (rejected: unknown) => isPcacheError(rejected) && rejected.code === 'ENODEV');
  });

  it('the client gives up after its timeout, and maps the server\'s refusals to PcacheErrors', async (t) => {
    const { socket } = await started(t);
    await assert.rejects(controlRequest(socket, 'drain', { timeoutMs: 200 }), (error: unknown) => isPcacheError(error) && error.code === 'ETIMEDOUT' && /no answer to drain .* within 0\.2 s/.test(error.message));
    await assert.rejects(controlRequest(socket, 'set', { body: { other: 1 } }), (error: unknown) => isPcacheError(error) && error.code === 'EINVAL' && error.message === 'the server refused set: unknown setting');
    assert.deepEqual(await controlRequest(socket, 'set', { body: { gc_percent: 12 } }), { gc_percent: 12 });
    assert.deepEqual(await controlRequest(socket, 'settings'), { gc_percent: 12 });
  });

  it('holds a checkpoint while its connection stays open, and releases it when the client closes it or dies', async (t) => {
    const { handlers, socket } = await started(t);
    const result = await controlCheckpoint(socket, async (point) => {
      assert.deepEqual([point.seq, point.lsn, Number.isNaN(Date.parse(point.time))], [41, 4096, false]);
      await sleep(100);
      assert.equal(handlers.holds, 1, 'held while the client works');
      const status = await controlRequest(socket, 'status'); // other requests are answered meanwhile
      assert.equal((status as { state: string }).state, 'running');
      return 'snapshot taken';
    }, undefined);
    assert.equal(result, 'snapshot taken');
    for (let waited = 0; handlers.holds > 0 && waited < 100; waited++) await sleep(20);
    assert.deepEqual([handlers.holds, handlers.checkpointsReleased], [0, 1], 'closing the connection released the hold');

    // A client that dies mid-hold (its socket simply goes) releases it too.
    const connection = await connect(socket);
    const sent = new Promise<string>((resolve) => { connection.once('data', (chunk: Buffer) => { resolve(chunk.toString('latin1')); }); });
    connection.write('POST /checkpoint HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n');
    assert.match(await sent, /^HTTP\/1\.1 200 [^]*\{"held":\{"seq":41,"lsn":4096,"time":"/);
    assert.equal(handlers.holds, 1);
    connection.destroy();
    await waitUntil(() => handlers.checkpointsReleased === 2, 'the hold of the client that died is released');
    assert.equal(handlers.holds, 0);
  });
});
