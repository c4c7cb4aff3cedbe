// `pcache status`, `drain` and `set`: through a running server's control socket (JSON fields,
// the readable table in dm-pcache's order, drain leaving the backing file equal to what was
// written, status answered while a drain runs, the HTTP routes as curl sees them, bad clients
// that cannot hurt the server) and offline on an idle cache device (the same fields; refused
// while a server has it open). control_server.test.ts tests the server's bounds in-process.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { MiB } from '../../src/lib/units.js';
import { patternBytes } from '../helpers/bytes.js';
import { errorOf, httpExchange, httpRequest } from '../helpers/control_http.js';
import { tempDir } from '../helpers/files.js';
import { assertOneLineError, pcacheJson, runCli, type ServeProcess, startServe } from '../helpers/pcache.js';
import { nbdcopy, requireTool, runTool, uriFor } from '../helpers/tools.js';
import { sleep, waitUntil } from '../helpers/wait.js';

const nineFields = ['sbFlags', 'segTotal', 'cacheSegs', 'segsUsed', 'gcPercent', 'cacheFlags', 'keyHead', 'dirtyTail', 'keyTail'];
const nineNames = ['sb_flags', 'seg_total', 'cache_segs', 'segs_used', 'gc_percent', 'cache_flags', 'key_head', 'dirty_tail', 'key_tail'];

interface Rig {
  readonly dir: string;
  readonly cache: string;
  readonly backing: string;
  readonly socket: string;
  readonly control: string;
  readonly server: ServeProcess;
}

async function serveRig(t: TestContext): Promise<Rig> {
  const dir = tempDir(t);
  const cache = path.join(dir, 'cache.img');
  const backing = path.join(dir, 'backing.img');
  fs.writeFileSync(backing, Buffer.alloc(32 * MiB));
  const socket = path.join(dir, 'nbd.sock');
  const control = path.join(dir, 'control.sock');
  const server = await startServe(t, ['--cache', cache, '--cache-size', '128M', '--backing', backing, '--socket', socket, '--control', control, '--gc-percent', '60'], dir);
  return { dir, cache, backing, socket, control, server };
}

type Json = Record<string, unknown>;

async function statusJson(args: string[]): Promise<Json> {
  return (await pcacheJson(['status', ...args, '--json'])) as Json;
}

async function copyIn(rig: Rig, data: Buffer, flush: boolean): Promise<void> {
  const source = path.join(rig.dir, 'source.bin');
  fs.writeFileSync(source, data);
  await nbdcopy([...(flush ? ['--flush'] : []), source, uriFor(rig.socket)]);
}

describe('status through the control socket', () => {
  it('reports the server, dm-pcache\'s nine fields, the counters and the NBD counters as JSON', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const rig = await serveRig(t);
    await copyIn(rig, patternBytes(3 * MiB, 1), true);
    const report = await statusJson(['--control', rig.control]);
    assert.equal(report.source, 'server');
    assert.equal(typeof report.pid, 'number');
    assert.equal(report.uvThreadPoolSize, 16, 'the server runs with the larger thread pool');
    assert.equal(report.uri, uriFor(rig.socket, 'pcache'));
    assert.equal(report.cachePath, rig.cache);
    assert.equal(report.backingPath, rig.backing);
    const cache = report.cache as Json;
    for (const field of nineFields) assert.ok(field in cache, `cache.${field}`);
    // 128 MiB in segments of 1 MiB (the default for that size: segmentSizeDefaultFor), less the metadata's first one.
    assert.deepEqual([cache.segTotal, cache.cacheSegs, cache.segmentSizeBytes, cache.gcPercent, cache.cacheFlags, cache.state], [127, 127, MiB, 60, 0b10 | (60 << 6), 'running']);
    assert.equal(String(report.dmStatusLine).split(' ').length, 9);
    assert.equal(report.dmStatusLine, nineFields.map((f) => (f === 'sbFlags' || f === 'cacheFlags' ? Number(cache[f]).toString(16) : String(cache[f]))).join(' '));
    const counters = cache.counters as Json;
    assert.equal(counters.writeBytes, 3 * MiB);
    assert.ok(Number(counters.flushRequests) >= 1);
    assert.ok(Number((report.nbd as Json).connectionsTotal) >= 1);
  });

  it('prints a table that starts with the nine fields in dm-pcache\'s order', async (t) => {
    const rig = await serveRig(t);
    const result = await runCli(['status', '--control', rig.control]);
    assert.equal(result.code, 0, result.stderr);
    const names = result.stdout.split('\n').map((line) => line.split(/\s{2,}/)[0]);
    assert.equal(names[0], 'server');
    assert.deepEqual(names.slice(1, 10), nineNames);
    assert.match(result.stdout, /^state\s+running$/m);
    assert.match(result.stdout, /^cache_flags\s+0xf02$/m);
  });

  it('answers status on another connection while a drain is still running', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const rig = await serveRig(t);
    await copyIn(rig, patternBytes(32 * MiB, 2), false);
    const order: string[] = [];
    const drain = httpRequest(rig.control, 'POST', '/drain').then((answer) => { order.push('drain'); return answer; });
    const status = await httpRequest(rig.control, 'GET', '/status');
    order.push('status');
    assert.equal(status.status, 200);
    const cache = (status.json as Json).cache as Json;
    assert.ok(Number(cache.dirtyBytes) > 0, 'the status was taken before the drain ended');
    assert.deepEqual(await drain.then((answer) => [answer.status, answer.json]), [200, { drained: true }]);
    assert.deepEqual(order, ['status', 'drain']);
  });

  it('speaks HTTP to curl: routes, status, settings, drain, and JSON errors', async (t) => {
    requireTool('curl', 'curl');
    const rig = await serveRig(t);
    const curl = async (...args: string[]): Promise<{ status: number; json: Json }> => {
      const result = await runTool('curl', ['-sS', '--unix-socket', rig.control, '-w', '\n%{http_code}', ...args]);
      assert.equal(result.code, 0, result.stderr);
      const lines = result.stdout.trimEnd().split('\n');
      const status = Number(lines.pop());
      return { status, json: JSON.parse(lines.join('\n')) as Json };
    };
    const index = await curl('http://localhost/');
    assert.equal(index.status, 200);
    assert.equal(index.json.service, 'pcache');
    assert.deepEqual((index.json.routes as Json[]).map((route) => `${String(route.method)} ${String(route.path)}`),
      ['GET /', 'GET /status', 'POST /drain', 'GET /settings', 'PATCH /settings', 'POST /invalidate', 'POST /detach', 'POST /checkpoint', 'GET /volumes', 'POST /volumes', 'POST /volumes/remove', 'POST /volumes/resize']);
    const status = await curl('http://localhost/status');
    assert.equal(status.status, 200);
    assert.equal(status.json.pid, (await statusJson(['--control', rig.control])).pid);
    assert.equal((status.json.cache as Json).gcPercent, 60);
    const patched = await curl('-X', 'PATCH', '-H', 'content-type: application/json', '-d', '{"gc_percent":45,"writeback_idle_ms":250}', 'http://localhost/settings');
    assert.deepEqual([patched.status, patched.json.gc_percent, patched.json.writeback_idle_ms], [200, 45, 250]);
    assert.equal((await curl('http://localhost/settings')).json.writeback_idle_ms, 250);
    const refused = await curl('-X', 'PATCH', '-d', '{"gc_percent":45,"writeback_idle_ms":-1}', 'http://localhost/settings');
    assert.equal(refused.status, 400);
    assert.deepEqual(Object.keys(refused.json), ['error']);
    assert.equal((refused.json.error as Json).code, 'EINVAL');
    assert.match(String((refused.json.error as Json).message), /writeback_idle_ms must be an integer/);
    assert.deepEqual([(await curl('http://localhost/nowhere')).status, (await curl('-X', 'POST', 'http://localhost/status')).status], [404, 405]);
    const drained = await curl('-X', 'POST', 'http://localhost/drain');
    assert.deepEqual([drained.status, drained.json], [200, { drained: true }]);
  });

  it('survives bad clients: oversized, malformed, unknown, wrong-method, pipelined and too many connections', async (t) => {
    const rig = await serveRig(t);
    const oversized = await httpRequest(rig.control, 'PATCH', '/settings', `{"gc_percent":50,"pad":"${'x'.repeat(8192)}"}`);
    assert.deepEqual([oversized.status, errorOf(oversized).code], [413, 'E2BIG']);
    const notJson = await httpRequest(rig.control, 'PATCH', '/settings', 'gc_percent=50');
    assert.deepEqual([notJson.status, errorOf(notJson).code], [400, 'EINVAL']);
    const notObject = await httpRequest(rig.control, 'PATCH', '/settings', '[1,2]');
    assert.deepEqual([notObject.status, errorOf(notObject).code], [400, 'EINVAL']);
    const unknown = await httpRequest(rig.control, 'GET', '/explode');
    assert.deepEqual([unknown.status, errorOf(unknown).code], [404, 'ENOENT']);
    const wrongMethod = await httpRequest(rig.control, 'DELETE', '/settings');
    assert.deepEqual([wrongMethod.status, wrongMethod.headers.allow], [405, 'GET, PATCH']);
    const garbage = await httpExchange(rig.control, 'not http at all\r\n\r\n', 2); // one answer, then the connection closes
    assert.deepEqual([garbage.answers.map((answer) => answer.status), errorOf(garbage.answers[0] ?? notJson).code, garbage.closed], [[400], 'EINVAL', true]);
    const pipelined = await httpExchange(rig.control, Array.from({ length: 6 }, () => 'POST /drain HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n').join(''), 6);
    const codes = pipelined.answers.map((answer) => answer.status);
    assert.deepEqual(codes, [200, 200, 200, 200, 429, 429], 'four drains may be pending per connection');
    // Sixteen connections at most: a seventeenth is dropped until one of them goes.
    const hogs = await Promise.all(Array.from({ length: 16 }, () => new Promise<net.Socket>((resolve) => { const socket = net.connect(rig.control, () => { resolve(socket); }); })));
    await sleep(200);
    assertOneLineError(await runCli(['status', '--control', rig.control]), 1, /closed the connection without answering status/);
    for (const hog of hogs) hog.destroy();
    await waitUntil(async () => (await runCli(['status', '--control', rig.control])).code === 0, 'the server answers again');
    assert.ok(rig.server.running);
  });

  it('set: lists, refuses bad settings with EINVAL and changes nothing, applies good ones', async (t) => {
    const rig = await serveRig(t);
    for (const body of ['{"gc_percent":91}', '{"writeback_idle_ms":5,"no_such_knob":1}', '{"writeback_idle_ms":"5"}', '{"writeback_stop_percent":90}', '{"writeback_ordering":"loose"}', '{"writeback_ordering":1}']) {
      const answer = await httpRequest(rig.control, 'PATCH', '/settings', body);
      assert.deepEqual([answer.status, errorOf(answer).code], [400, 'EINVAL'], body);
    }
    const refused = await runCli(['set', '--control', rig.control, 'writeback_stop_percent', '90']);
    assertOneLineError(refused, 1, /the server refused set: writeback_stop_percent \(90\) must not exceed writeback_start_percent \(80\)/);
    const listed = await runCli(['set', '--control', rig.control, '--json']);
    const before = JSON.parse(listed.stdout) as Json;
    assert.equal(before.writeback_idle_ms, 1000, 'the refused changes left the default in place');
    assert.equal(before.gc_percent, 60);
    const applied = await runCli(['set', '--control', rig.control, 'writeback_idle_ms', '5', 'gc_percent', '40']);
    assert.equal(applied.code, 0, applied.stderr);
    assert.match(applied.stdout, /^gc_percent\s+40 %\s+\(changed, stored in the cache\)$/m);
    assert.match(applied.stdout, /^writeback_idle_ms\s+5 ms\s+\(changed until the server stops\)$/m);
    assert.match(applied.stdout, /^writeback_max_age_ms\s+30000 ms$/m);
    assert.equal(((await statusJson(['--control', rig.control])).cache as Json).gcPercent, 40);
  });

  it('fails with one line when no server answers', async (t) => {
    const dir = tempDir(t);
    assertOneLineError(await runCli(['status', '--control', path.join(dir, 'none.sock')]), 1, /no control socket at .*none\.sock \(is `pcache serve --control/);
    assertOneLineError(await runCli(['drain', '--control', path.join(dir, 'none.sock')]), 1, /no control socket at/);
  });
});

describe('drain', () => {
  it('leaves the backing file equal to what was written, and the cache clean', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const rig = await serveRig(t);
    const data = patternBytes(32 * MiB, 3);
    await copyIn(rig, data, false);
    const drained = await runCli(['drain', '--control', rig.control]);
    assert.equal(drained.code, 0, drained.stderr);
    assert.ok(fs.readFileSync(rig.backing).equals(data), 'the backing file holds every byte written');
    const cache = (await statusJson(['--control', rig.control])).cache as Json;
    assert.equal(cache.dirtyBytes, 0);
    assert.equal(cache.dirtyTail, cache.keyHead, 'dirty_tail caught up with key_head');
  });
});

describe('status and check of an idle cache device', () => {
  it('are refused while a server has the device open, and agree with the server once it stopped', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const rig = await serveRig(t);
    await copyIn(rig, patternBytes(2 * MiB, 4), true);
    assertOneLineError(await runCli(['status', '--cache', rig.cache]), 1, /refusing to read the status of .*cache\.img: it is open in node \(pid \d+\); stop that first/);
    assertOneLineError(await runCli(['check', '--cache', rig.cache]), 1, /refusing to check .*cache\.img: it is open in node/);
    await runCli(['drain', '--control', rig.control]);
    const live = (await statusJson(['--control', rig.control])).cache as Json;
    assert.equal(await rig.server.stop(), 0);
    const offline = await statusJson(['--cache', rig.cache]);
    assert.equal(offline.source, 'device');
    const cache = offline.cache as Json;
    for (const field of ['sbFlags', 'segTotal', 'cacheSegs', 'gcPercent', 'cacheFlags', 'dirtyTail', 'keyTail']) {
      assert.deepEqual(cache[field], live[field], `${field} offline equals the live value`);
    }
    assert.equal(cache.state, 'stopped');
    assert.equal(cache.dirtyBytes, 0);
    assert.deepEqual(offline.problems, []);
    assert.equal(String(offline.dmStatusLine).split(' ').length, 9);
    const table = await runCli(['status', '--cache', rig.cache]);
    assert.deepEqual(table.stdout.split('\n').slice(1, 10).map((line) => line.split(/\s{2,}/)[0]), nineNames);
  });

  it('refuses a device that holds no cache', async (t) => {
    const dir = tempDir(t);
    const blank = path.join(dir, 'blank.img');
    fs.writeFileSync(blank, Buffer.alloc(MiB));
    assertOneLineError(await runCli(['status', '--cache', blank]), 1, /blank\.img holds no pcache cache \(it is blank\)/);
  });
});
