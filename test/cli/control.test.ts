// `pcache status` and `pcache drain`: through a running server's control socket (JSON fields,
// the readable table in dm-pcache's order, drain leaving the backing file equal to what was
// written, status answered while a drain runs, bad clients that cannot hurt the server) and
// offline on an idle cache device (the same fields; refused while a server has it open).

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { patternBytes, requireTool, runTool } from '../nbd/harness.js';
import { assertOneLineError, controlExchange, MiB, runCli, startServe, tempDir, uriFor, type ServeProcess } from './cli_harness.js';

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
  const result = await runCli(['status', ...args, '--json']);
  assert.equal(result.code, 0, result.stderr);
  return JSON.parse(result.stdout) as Json;
}

async function copyIn(rig: Rig, data: Buffer, flush: boolean): Promise<void> {
  const source = path.join(rig.dir, 'source.bin');
  fs.writeFileSync(source, data);
  const copy = await runTool('nbdcopy', [...(flush ? ['--flush'] : []), source, uriFor(rig.socket)]);
  assert.equal(copy.code, 0, copy.stderr);
}

describe('status through the control socket', () => {
  it('reports the server, dm-pcache\'s nine fields, the counters and the NBD counters as JSON', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const rig = await serveRig(t);
    await copyIn(rig, patternBytes(3 * MiB, 1), true);
    const report = await statusJson(['--control', rig.control]);
    assert.equal(report.source, 'server');
    assert.equal(typeof report.pid, 'number');
    assert.equal(report.uvThreadPoolSize, '16', 'the server runs with the larger thread pool');
    assert.equal(report.uri, uriFor(rig.socket, 'pcache'));
    assert.equal(report.cachePath, rig.cache);
    assert.equal(report.backingPath, rig.backing);
    const cache = report.cache as Json;
    for (const field of nineFields) assert.ok(field in cache, `cache.${field}`);
    assert.deepEqual([cache.segTotal, cache.cacheSegs, cache.gcPercent, cache.cacheFlags, cache.state], [7, 7, 60, 0b10 | (60 << 6), 'running']);
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

  it('answers status while a drain on the same connection is still running', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const rig = await serveRig(t);
    await copyIn(rig, patternBytes(8 * MiB, 2), false);
    const { replies } = await controlExchange(rig.control, '{"v":1,"id":"d","op":"drain"}\n{"v":1,"id":"s","op":"status"}\n', 2);
    assert.deepEqual(replies.map((reply) => [reply.id, reply.ok]), [['s', true], ['d', true]], 'status first, then the drain');
  });

  it('survives bad clients: oversized, malformed, wrong-version, unknown and too many requests', async (t) => {
    const rig = await serveRig(t);
    const oversized = await controlExchange(rig.control, 'x'.repeat(8192), 1);
    assert.deepEqual(oversized.replies.map((r) => (r.error as Json).code), ['E2BIG']);
    const mixed = await controlExchange(rig.control, [
      'not json', '[1,2]', '{"v":2,"id":1,"op":"status"}', '{"v":1,"id":2,"op":"explode"}', '{"v":1,"id":3}', '{"v":1,"id":4,"op":"hello"}',
    ].join('\n') + '\n', 6);
    assert.deepEqual(mixed.replies.map((r) => [r.id, r.ok, (r.error as Json | undefined)?.code ?? null]), [
      [null, false, 'EINVAL'], [null, false, 'EINVAL'], [1, false, 'EPROTO'], [2, false, 'EINVAL'], [3, false, 'EINVAL'], [4, true, null],
    ]);
    assert.deepEqual((mixed.replies[5]?.result as Json).protocol, 1);
    const flood = await controlExchange(rig.control, Array.from({ length: 6 }, (_, i) => `{"v":1,"id":${i},"op":"drain"}\n`).join(''), 6);
    const codes = flood.replies.map((r) => (r.ok === true ? 'ok' : String((r.error as Json).code)));
    assert.deepEqual(codes.filter((c) => c === 'EBUSY').length, 2, `four drains may be pending per connection: ${codes.join(' ')}`);
    assert.deepEqual(codes.filter((c) => c === 'ok').length, 4);
    const result = await runCli(['status', '--control', rig.control]);
    assert.equal(result.code, 0, 'the server still answers');
    assert.ok(rig.server.running);
  });

  it('set over the wire: lists, refuses bad settings with EINVAL and changes nothing, applies good ones', async (t) => {
    const rig = await serveRig(t);
    const { replies } = await controlExchange(rig.control, [
      '{"v":1,"id":1,"op":"hello"}',
      '{"v":1,"id":2,"op":"set","settings":[1]}',
      '{"v":1,"id":3,"op":"set","settings":{"gc_percent":91}}',
      '{"v":1,"id":4,"op":"set","settings":{"writeback_idle_ms":5,"no_such_knob":1}}',
      '{"v":1,"id":5,"op":"set","settings":{"writeback_idle_ms":"5"}}',
    ].join('\n') + '\n', 5);
    const byId = new Map(replies.map((reply) => [reply.id, reply]));
    assert.deepEqual((byId.get(1)?.result as Json).ops, ['hello', 'status', 'drain', 'set']);
    for (const id of [2, 3, 4, 5]) assert.equal((byId.get(id)?.error as Json | undefined)?.code, 'EINVAL', `request ${id} refused`);
    const listed = await controlExchange(rig.control, '{"v":1,"id":6,"op":"set"}\n', 1);
    const before = listed.replies[0]?.result as Json;
    assert.equal(before.writeback_idle_ms, 1000, 'the refused changes left the default in place');
    assert.equal(before.gc_percent, 60);
    const applied = await controlExchange(rig.control, '{"v":1,"id":7,"op":"set","settings":{"writeback_idle_ms":5,"gc_percent":40}}\n', 1);
    const after = applied.replies[0]?.result as Json;
    assert.deepEqual([after.writeback_idle_ms, after.gc_percent], [5, 40]);
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
