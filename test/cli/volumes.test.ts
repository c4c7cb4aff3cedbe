// Several volumes on one cache device, through the real command line and real NBD clients:
// `serve` without --backing, `pcache volume add|list|remove`, NBD_OPT_LIST and export names,
// fio verify on every volume at once, SIGKILL and restart with every volume intact, the
// refusals of bad requests (each changes nothing), and `pcache check` of the pool.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { MiB } from '../../src/lib/units.js';
import { assertFilesEqual, tempDir, writeRandomFile } from '../helpers/files.js';
import { printedMetricsUrl, runCli, startServe, type ServeProcess } from '../helpers/pcache.js';
import { connectClient } from '../helpers/nbd_client.js';
import { randomBytes } from 'node:crypto';
import { fioVerifyJobs, nbdcopy, requireFioNbd, requireTool, runTool, uriFor } from '../helpers/tools.js';

const names = ['alpha', 'beta', 'gamma'];
/** Writeback held back, so data stays dirty in the cache until asked (and survives a SIGKILL there). */
const tuning = 'writeback_idle_ms=600000,writeback_max_age_ms=600000,sequential_cutoff_bytes=0';

interface Pool {
  readonly dir: string;
  readonly cache: string;
  readonly socket: string;
  readonly control: string;
  readonly args: string[];
}

function poolIn(t: TestContext): Pool {
  const dir = tempDir(t, 'pcache-volumes-');
  const cache = path.join(dir, 'cache.img');
  const socket = path.join(dir, 'nbd.sock');
  const control = path.join(dir, 'control.sock');
  return { dir, cache, socket, control, args: ['--cache', cache, '--cache-size', '400M', '--segment-size', '4M', '--socket', socket, '--control', control, '--tuning', tuning] };
}

async function volume(pool: Pool, ...args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return runCli(['volume', args[0] ?? '', '--control', pool.control, ...args.slice(1)]);
}

async function listed(pool: Pool): Promise<Record<string, unknown>[]> {
  const result = await volume(pool, 'list', '--json');
  assert.equal(result.code, 0, result.stderr);
  return JSON.parse(result.stdout) as Record<string, unknown>[];
}

describe('volumes through the command line', () => {
  it('serves several volumes, verifies them all at once with fio, and keeps every one across a SIGKILL', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    await requireFioNbd();
    const pool = poolIn(t);
    let server: ServeProcess = await startServe(t, pool.args, pool.dir);
    assert.match(server.stdout, /serving 0 volumes/);
    for (const name of names) {
      const backing = path.join(pool.dir, `${name}.img`);
      fs.writeFileSync(backing, '');
      fs.truncateSync(backing, 64 * MiB);
      const added = await volume(pool, 'add', '--name', name, '--backing', backing, '--cache-size', '96M', '--json');
      assert.equal(added.code, 0, added.stderr);
      assert.equal((JSON.parse(added.stdout) as { shareBytes: number }).shareBytes, 96 * MiB);
    }
    const list = await runTool('nbdinfo', ['--list', '--json', uriFor(pool.socket)]);
    assert.equal(list.code, 0, list.stderr);
    assert.deepEqual((JSON.parse(list.stdout) as { exports: { 'export-name': string }[] }).exports.map((entry) => entry['export-name']).sort(), names);

    // fio verify on every volume at the same time: each job writes its own ranges and reads them back.
    await Promise.all(names.map((name) => fioVerifyJobs(uriFor(pool.socket, name), 2, `verify-${name}`)));
    // Distinct contents, flushed, while writeback is held: they are dirty in the cache at the kill.
    for (const name of names) {
      const file = path.join(pool.dir, `${name}.data`);
      writeRandomFile(file, 16 * MiB);
      const copied = await nbdcopy(['--flush', file, uriFor(pool.socket, name)]);
      assert.equal(copied.code, 0, copied.stderr);
    }
    const before = await listed(pool);
    for (const entry of before) assert.ok(Number(entry.dirtyBytes) >= 16 * MiB, `${String(entry.name)} holds its data dirty: ${String(entry.dirtyBytes)}`);

    // A volume holding dirty data is refused until told to drain.
    const refused = await volume(pool, 'remove', 'beta');
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /holds .* of dirty data .*--drain/);
    assert.deepEqual((await listed(pool)).map((entry) => entry.name), names, 'a refused remove changes nothing');

    await server.crash();
    server = await startServe(t, pool.args, pool.dir);
    assert.match(server.stdout, /serving 3 volumes/);
    for (const name of names) {
      const out = path.join(pool.dir, `${name}.out`);
      const copied = await nbdcopy([uriFor(pool.socket, name), out]);
      assert.equal(copied.code, 0, copied.stderr);
      fs.truncateSync(out, 16 * MiB);
      assertFilesEqual(out, path.join(pool.dir, `${name}.data`), `volume ${name} after SIGKILL and restart`);
    }
    // Replay counts the dirty data found as old, so writeback may have begun: --drain makes sure.
    const removed = await volume(pool, 'remove', 'beta', '--drain');
    assert.equal(removed.code, 0, removed.stderr);
    const beta = path.join(pool.dir, 'beta.img.head');
    fs.writeFileSync(beta, fs.readFileSync(path.join(pool.dir, 'beta.img')).subarray(0, 16 * MiB));
    assertFilesEqual(beta, path.join(pool.dir, 'beta.data'), 'the removed volume\'s backing file after --drain');
    assert.deepEqual((await listed(pool)).map((entry) => entry.name), ['alpha', 'gamma']);
    const gone = await runTool('nbdinfo', [uriFor(pool.socket, 'beta')]);
    assert.notEqual(gone.code, 0, 'a removed volume is no longer exported');

    // The freed share serves a new volume, which sees its own (empty) backing device.
    const delta = path.join(pool.dir, 'delta.img');
    fs.writeFileSync(delta, '');
    fs.truncateSync(delta, 32 * MiB);
    assert.equal((await volume(pool, 'add', '--name', 'delta', '--backing', delta, '--cache-size', '96M')).code, 0);
    const fresh = path.join(pool.dir, 'delta.out');
    assert.equal((await nbdcopy([uriFor(pool.socket, 'delta'), fresh])).code, 0);
    assert.ok(fs.readFileSync(fresh).every((byte) => byte === 0), 'the new volume does not see the removed one\'s data');

    assert.equal(await server.stop(), 0);
    // A volume whose backing device is gone fails alone: the others serve on.
    fs.renameSync(delta, `${delta}.away`);
    server = await startServe(t, pool.args, pool.dir);
    assert.match(server.stdout, /serving 3 volumes/);
    const states = Object.fromEntries((await listed(pool)).map((entry): [string, unknown] => [String(entry.name), entry.state]));
    assert.deepEqual(states, { alpha: 'running', delta: 'failed', gamma: 'running' });
    assert.match(String((await listed(pool)).find((entry) => entry.name === 'delta')?.failure), /delta\.img/);
    const alphaBack = path.join(pool.dir, 'alpha.again');
    assert.equal((await nbdcopy([uriFor(pool.socket, 'alpha'), alphaBack])).code, 0);
    fs.truncateSync(alphaBack, 16 * MiB);
    assertFilesEqual(alphaBack, path.join(pool.dir, 'alpha.data'), 'alpha serves while delta has failed');
    assert.notEqual((await runTool('nbdinfo', [uriFor(pool.socket, 'delta')])).code, 0, 'a failed volume is not exported');
    const removeFailed = await volume(pool, 'remove', 'delta', '--drain');
    assert.equal(removeFailed.code, 1);
    assert.match(removeFailed.stderr, /not serving/);
    assert.equal(await server.stop(), 0);
    fs.renameSync(`${delta}.away`, delta);
    const check = await runCli(['check', '--cache', pool.cache, '--json']);
    assert.equal(check.code, 0, check.stdout);
    const report = JSON.parse(check.stdout) as { ok: boolean; volumes: { name: string }[]; pool: { segmentsFree: number } };
    assert.deepEqual(report.volumes.map((entry) => entry.name).sort(), ['alpha', 'delta', 'gamma']);
    assert.equal(report.pool.segmentsFree, Math.floor((400 * MiB - MiB - 4096) / (4 * MiB)) - 3 * 24);
  });

  it('refuses bad requests with a clear error, and each changes nothing', async (t) => {
    const pool = poolIn(t);
    const server = await startServe(t, [...pool.args, '--metrics', '127.0.0.1:0'], pool.dir);
    const first = path.join(pool.dir, 'first.img');
    fs.writeFileSync(first, '');
    fs.truncateSync(first, 16 * MiB);
    fs.symlinkSync(first, path.join(pool.dir, 'link.img'));
    assert.equal((await volume(pool, 'add', '--name', 'first', '--backing', first, '--cache-size', '64M')).code, 0);
    const cases: [string[], RegExp][] = [
      [['--name', 'first', '--backing', path.join(pool.dir, 'other.img'), '--cache-size', '64M'], /does not exist/],
      [['--name', 'first', '--backing', first, '--cache-size', '64M'], /exists already|used by volume "first"/],
      [['--name', 'second', '--backing', path.join(pool.dir, 'link.img'), '--cache-size', '64M'], /used by volume "first"/],
      [['--name', 'second', '--backing', path.join(pool.dir, 'missing.img'), '--cache-size', '64M'], /does not exist/],
      [['--name', 'bad/name', '--backing', first, '--cache-size', '64M'], /not a valid export name/],
      [['--name', 'tiny', '--backing', path.join(pool.dir, 'first.img'), '--cache-size', '8M'], /used by volume|at least 4/],
      [['--name', 'huge', '--backing', 'nbd+unix:///x?socket=/nonexistent.sock', '--cache-size', '1G'], /does not fit|free/],
      [['--name', 'tiny2', '--backing', 'nbd+unix:///x?socket=/nonexistent.sock', '--cache-size', '8M'], /at least 4/],
    ];
    for (const [args, expected] of cases) {
      const result = await volume(pool, 'add', ...args);
      assert.equal(result.code, 1, `${args.join(' ')}: ${result.stdout}`);
      assert.match(result.stderr, expected, args.join(' '));
      assert.equal(result.stderr.trim().split('\n').length, 1, 'one line');
    }
    assert.deepEqual((await listed(pool)).map((entry) => entry.name), ['first']);
    // Every cache metric carries the volume's name.
    const metricsUrl = await printedMetricsUrl(server);
    const scrape = await (await fetch(metricsUrl)).text();
    assert.match(scrape, /^pcache_dirty_bytes\{volume="first"\} 0$/m);
    assert.match(scrape, /^pcache_state\{volume="first",state="running"\} 1$/m);
    assert.match(scrape, /^pcache_up 1$/m);
    const unknown = await volume(pool, 'remove', 'nope');
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /no volume named "nope"/);
    const usage = await runCli(['volume', 'frobnicate', '--control', pool.control]);
    assert.equal(usage.code, 2);
    // The cache device of volumes is refused by serve --backing, with what to do instead.
    assert.equal(await server.stop(), 0);
    const single = await runCli(['serve', '--cache', pool.cache, '--backing', first, '--socket', path.join(pool.dir, 'x.sock')]);
    assert.equal(single.code, 1);
    assert.match(single.stderr, /holds volumes/);
  });

  it('resizes a volume while a client stays connected: the client keeps its data and its connection', async (t) => {
    const pool = poolIn(t);
    await startServe(t, pool.args, pool.dir);
    const backing = path.join(pool.dir, 'grow.img');
    fs.writeFileSync(backing, '');
    fs.truncateSync(backing, 64 * MiB);
    assert.equal((await volume(pool, 'add', '--name', 'grow', '--backing', backing, '--cache-size', '64M')).code, 0);
    const client = await connectClient(t, uriFor(pool.socket, 'grow'));
    const data = randomBytes(4 * MiB);
    await client.write(data, 8 * MiB);
    await client.flush();
    const shareOf = async (): Promise<number> => Number((await listed(pool)).find((entry) => entry.name === 'grow')?.shareBytes);

    // Requests sent as the resize starts finish before it, or wait for it and complete on the new share.
    const resizing = volume(pool, 'resize', 'grow', '--cache-size', '160M', '--json');
    const during = randomBytes(64 * 1024);
    const racing = Promise.all([client.write(during, 20 * MiB).then(() => client.flush()), (async () => {
      const back = new Uint8Array(4 * MiB);
      await client.read(back, 8 * MiB);
      return back;
    })()]);
    const grown = await resizing;
    assert.equal(grown.code, 0, grown.stderr);
    assert.equal((JSON.parse(grown.stdout) as { shareBytes: number }).shareBytes, 160 * MiB);
    const [, readDuring] = await racing;
    assert.deepEqual(Buffer.from(readDuring), data, 'a read racing the resize sees the data');
    assert.equal(await shareOf(), 160 * MiB);
    const after = new Uint8Array(4 * MiB);
    await client.read(after, 8 * MiB);
    assert.deepEqual(Buffer.from(after), data, 'the data is kept across a grow, on the same connection');
    const afterDuring = new Uint8Array(during.length);
    await client.read(afterDuring, 20 * MiB);
    assert.deepEqual(Buffer.from(afterDuring), during, 'a write racing the resize landed');

    assert.equal((await volume(pool, 'resize', 'grow', '--cache-size', '64M')).code, 0);
    assert.equal(await shareOf(), 64 * MiB);
    await client.read(after, 8 * MiB);
    assert.deepEqual(Buffer.from(after), data, 'the data is kept across a shrink');

    const tooBig = await volume(pool, 'resize', 'grow', '--cache-size', '1G');
    assert.equal(tooBig.code, 1);
    assert.match(tooBig.stderr, /does not fit/);
    const tooSmall = await volume(pool, 'resize', 'grow', '--cache-size', '8M');
    assert.equal(tooSmall.code, 1);
    assert.match(tooSmall.stderr, /at least 4/);
    assert.equal(await shareOf(), 64 * MiB, 'a refused resize changes nothing');
    await client.read(after, 8 * MiB);
    assert.deepEqual(Buffer.from(after), data);
    const usage = await runCli(['volume', 'resize', '--control', pool.control, 'grow']);
    assert.equal(usage.code, 2, 'resize without --cache-size is a usage error');

    // Clients connected: remove is refused unless told to disconnect them.
    const busy = await volume(pool, 'remove', 'grow');
    assert.equal(busy.code, 1);
    assert.match(busy.stderr, /1 client connection: .*--disconnect/);
    const removed = await volume(pool, 'remove', 'grow', '--disconnect', '--drain');
    assert.equal(removed.code, 0, removed.stderr);
    await assert.rejects(client.read(after, 8 * MiB), 'the disconnected client\'s requests fail');
    assert.deepEqual(fs.readFileSync(backing).subarray(8 * MiB, 12 * MiB), data, 'written back before the remove');
  });
});

