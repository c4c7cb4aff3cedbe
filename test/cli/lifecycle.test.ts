// The server's life cycle as an operator sees it: stopping with and without --drain-on-exit
// (and a drain that cannot finish within --drain-timeout), opening a cache on a copy of its
// backing file (--force-backing), and the logs (--log-level; nothing per request at info).
//
// Writeback is held off by --tuning where a test needs dirty data to stay dirty, and the
// backing file is compared with what was written, so each test can tell written-back data
// from data still only in the cache. The clients come from Debian packages (libnbd-bin,
// qemu-utils, fio, nbdkit); a missing one fails its test naming the package.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { logLevels } from '../../src/cli/args.js';
import { MiB } from '../../src/lib/units.js';
import { patternBytes } from '../helpers/bytes.js';
import { tempDir } from '../helpers/files.js';
import { Nbdkit } from '../helpers/nbdkit.js';
import { assertOneLineError, assertQuietLogs, type LogLine, logLines, pcacheJson, runCli, type ServeProcess, startServe } from '../helpers/pcache.js';
import { nbdcopy, qemuIo, requireFioNbd, requireTool, runTool, uriFor } from '../helpers/tools.js';

/** Writeback held off: nothing reaches the backing device until a drain or a stop with --drain-on-exit. */
const holdWriteback = 'writeback_start_percent=100,writeback_stop_percent=100,writeback_idle_ms=600000,writeback_max_age_ms=600000,sequential_cutoff_bytes=0';
const backingBytes = 16 * MiB;
const levelWarn = 40;

interface CacheReport {
  dirtyBytes: number;
}

/** `pcache status --cache` of an idle cache device. */
async function deviceStatus(cache: string): Promise<CacheReport> {
  return ((await pcacheJson(['status', '--cache', cache, '--json'])) as { cache: CacheReport }).cache;
}

async function serverStatus(control: string): Promise<{ cache: CacheReport; nbd: { requestsTotal: number } }> {
  return (await pcacheJson(['status', '--control', control, '--json'])) as { cache: CacheReport; nbd: { requestsTotal: number } };
}

async function copyOut(uri: string, file: string): Promise<Buffer> {
  await nbdcopy([uri, file]);
  return fs.readFileSync(file);
}

interface DirtyRig {
  readonly dir: string;
  readonly cache: string;
  readonly backing: string;
  /** The backing file's contents before anything was written. */
  readonly original: Buffer;
  /** What was written at offset 0 (4 MiB). */
  readonly data: Buffer;
  readonly server: ServeProcess;
}

/** A server (with `extra` flags) holding 4 MiB of dirty data that is not on the backing file. */
async function dirtyServer(t: TestContext, extra: readonly string[]): Promise<DirtyRig> {
  requireTool('nbdcopy', 'libnbd-bin');
  const dir = tempDir(t, 'pcache-lifecycle-');
  const cache = path.join(dir, 'cache.img');
  const backing = path.join(dir, 'backing.img');
  const original = patternBytes(backingBytes, 101);
  fs.writeFileSync(backing, original);
  const socket = path.join(dir, 'nbd.sock');
  const control = path.join(dir, 'control.sock');
  const server = await startServe(t, [
    '--cache', cache, '--cache-size', '128M', '--backing', backing, '--socket', socket, '--control', control, '--tuning', holdWriteback, ...extra,
  ], dir);
  const data = patternBytes(4 * MiB, 202);
  const source = path.join(dir, 'data.bin');
  fs.writeFileSync(source, data);
  await nbdcopy(['--flush', source, uriFor(socket)]);
  assert.equal((await serverStatus(control)).cache.dirtyBytes, data.length, 'the data is dirty in the cache');
  assert.ok(fs.readFileSync(backing).equals(original), 'writeback is held off: the backing file is untouched');
  return { dir, cache, backing, original, data, server };
}

function expectedBacking(rig: DirtyRig): Buffer {
  const expected = Buffer.from(rig.original);
  rig.data.copy(expected, 0);
  return expected;
}

describe('stopping the server', () => {
  it('with --drain-on-exit writes everything back before exiting 0', async (t) => {
    const rig = await dirtyServer(t, ['--drain-on-exit']);
    assert.equal(await rig.server.stop('SIGTERM'), 0);
    assert.match(rig.server.stdout, /^writing back 4194304 dirty bytes before stopping \(stop again to skip\)$/m);
    assert.match(rig.server.stdout, /^drained in [\d.]+ s$/m);
    assert.match(rig.server.stdout, /^stopped \(SIGTERM\)$/m);
    assert.ok(fs.readFileSync(rig.backing).equals(expectedBacking(rig)), 'the backing file holds the data, and nothing else changed');
    assert.equal((await deviceStatus(rig.cache)).dirtyBytes, 0, 'the cache is clean');
    // The state watcher may or may not catch the short drain ('cache draining', 'cache running').
    const messages = assertQuietLogs(rig.server.stderr).map((line) => line.msg).filter((msg) => !/^cache (draining|running)$/.test(msg));
    assert.deepEqual(messages, ['serving', 'stopping', 'draining before exit', 'drain started', 'drain finished', 'drained before exit', 'stopped']);
  });

  it('without --drain-on-exit leaves the dirty data in the cache and the backing file as it was', async (t) => {
    const rig = await dirtyServer(t, []);
    assert.equal(await rig.server.stop('SIGTERM'), 0);
    assert.doesNotMatch(rig.server.stdout, /writing back|drained/);
    assert.match(rig.server.stdout, /^stopped \(SIGTERM\)$/m);
    assert.ok(fs.readFileSync(rig.backing).equals(rig.original), 'the backing file does not hold the data yet');
    assert.equal((await deviceStatus(rig.cache)).dirtyBytes, rig.data.length, 'the data is still dirty in the cache');
    assert.deepEqual(assertQuietLogs(rig.server.stderr).map((line) => line.msg), ['serving', 'stopping', 'stopped']);
  });

  it('with --drain-timeout stops anyway when the drain cannot finish in time, and the data stays safe in the cache', async (t) => {
    requireTool('qemu-io', 'qemu-utils');
    const original = patternBytes(backingBytes, 303);
    // Every write to the backing device takes 2 s: a drain of several flush epochs (one
    // writeback round each, one after another) cannot finish within 1 s.
    const nbdkit = await Nbdkit.start(t, (dir) => {
      fs.writeFileSync(path.join(dir, 'backing.img'), original);
      return { plugin: 'file', args: [`file=${path.join(dir, 'backing.img')}`, 'delay-write=2'], filters: ['delay'] };
    });
    const backingFile = nbdkit.file('backing.img');
    const dir = tempDir(t, 'pcache-lifecycle-');
    const cache = path.join(dir, 'cache.img');
    const socket = path.join(dir, 'nbd.sock');
    const serveArgs = ['--cache', cache, '--cache-size', '128M', '--backing', nbdkit.uri, '--socket', socket, '--control', path.join(dir, 'control.sock')];
    const server = await startServe(t, [...serveArgs, '--tuning', holdWriteback, '--drain-on-exit', '--drain-timeout', '1'], dir);
    const epochs = [0x11, 0x22, 0x33, 0x44];
    await qemuIo(uriFor(socket), epochs.flatMap((pattern, index) => [`write -P ${pattern} ${index}M 1M`, 'flush']));
    const startedMs = performance.now();
    assert.equal(await server.stop('SIGTERM'), 0, 'the stop succeeded although the drain did not finish');
    const stopSeconds = (performance.now() - startedMs) / 1000;
    assert.ok(stopSeconds < 30, `stopped in ${stopSeconds.toFixed(1)} s`);
    assert.match(server.stdout, /^writing back 4194304 dirty bytes before stopping/m);
    assert.doesNotMatch(server.stdout, /drained in/);
    assert.match(server.stdout, /^stopped \(SIGTERM\)$/m);
    // stdout tells the operator; stderr holds only JSON log lines.
    assert.match(server.stdout, /^stopping before the drain finished \(the drain timeout \(1 s\)\); \d+ dirty bytes stay safe in the cache for the next start$/m);
    const lines = logLines(server.stderr);
    const warning = lines.find((line) => line.msg === 'stopping without a complete drain');
    assert.ok(warning !== undefined, `a warning says the drain did not complete: ${server.stderr}`);
    assert.equal(warning.level, levelWarn);
    assert.equal(warning.reason, 'the drain timeout (1 s)');
    assert.ok(typeof warning.dirtyBytes === 'number' && warning.dirtyBytes > 0, `the warning says how much is still dirty: ${JSON.stringify(warning)}`);

    const left = (await deviceStatus(cache)).dirtyBytes;
    assert.ok(left > 0 && left <= 4 * MiB, `dirty data stays in the cache: ${left} bytes`);
    assert.ok(!fs.readFileSync(backingFile).subarray(3 * MiB, 4 * MiB).equals(Buffer.alloc(MiB, 0x44)), 'the last epoch never reached the backing device');

    // Reopened (the backing device fast again), the cache serves every byte that was written.
    await nbdkit.kill();
    await nbdkit.restart({ plugin: 'file', args: [`file=${backingFile}`] });
    const again = await startServe(t, serveArgs, dir);
    await qemuIo(uriFor(socket), epochs.map((pattern, index) => `read -P ${pattern} ${index}M 1M`));
    assert.equal(await again.stop(), 0);
  });
});

describe('format for an NBD backing device', () => {
  it('formats a cache for an nbd+unix export, which serve then accepts; an export that is not there is one clear error', async (t) => {
    requireTool('qemu-io', 'qemu-utils');
    const nbdkit = await Nbdkit.start(t, (dir) => {
      fs.writeFileSync(path.join(dir, 'backing.img'), Buffer.alloc(32 * MiB));
      return { plugin: 'file', args: [`file=${path.join(dir, 'backing.img')}`] };
    });
    const dir = tempDir(t, 'pcache-lifecycle-');
    const cache = path.join(dir, 'cache.img');
    const formatted = await runCli(['format', '--cache', cache, '--cache-size', '128M', '--backing', nbdkit.uri, '--gc-percent', '55']);
    assert.equal(formatted.code, 0, formatted.stderr);
    assert.match(formatted.stdout, /for backing device nbd\+unix:\/\/\/\?socket=.*nbdkit\.sock \(32 MiB\)/);
    const status = JSON.parse((await runCli(['status', '--cache', cache, '--json'])).stdout) as { cache: { gcPercent: number; backingSizeBytes: number } };
    assert.deepEqual([status.cache.gcPercent, status.cache.backingSizeBytes], [55, 32 * MiB]);
    const socket = path.join(dir, 'nbd.sock');
    const server = await startServe(t, ['--cache', cache, '--backing', nbdkit.uri, '--socket', socket], dir);
    assert.doesNotMatch(server.stdout, /formatted now/, 'serve opened the cache format made');
    const io = await runTool('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 64k', '-c', 'read -P 0x5a 0 64k', uriFor(socket)]);
    assert.equal(io.code, 0, io.stderr);
    assert.doesNotMatch(io.stdout, /Pattern verification failed/);
    assert.equal(await server.stop('SIGTERM'), 0);
    const missing = await runCli(['format', '--cache', path.join(dir, 'other.img'), '--cache-size', '128M', '--backing', `nbd+unix:///?socket=${path.join(dir, 'none.sock')}`]);
    assertOneLineError(missing, 1, /cannot open nbd\+unix:\/\/\/\?socket=.*none\.sock: /);
  });
});

describe('serve --force-backing', () => {
  it('refuses a copy of the backing file without writing a byte, and serves it with --force-backing', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const dir = tempDir(t, 'pcache-lifecycle-');
    const cache = path.join(dir, 'cache.img');
    const backingA = path.join(dir, 'a.img');
    const backingA2 = path.join(dir, 'a2.img');
    const original = patternBytes(backingBytes, 404);
    fs.writeFileSync(backingA, original);
    const format = await runCli(['format', '--cache', cache, '--cache-size', '128M', '--backing', backingA]);
    assert.equal(format.code, 0, format.stderr);
    const socket = path.join(dir, 'nbd.sock');
    const first = await startServe(t, ['--cache', cache, '--backing', backingA, '--socket', socket, '--tuning', holdWriteback], dir);
    await qemuIo(uriFor(socket), ['write -P 0x5c 1M 2M', 'flush']);
    assert.equal(await first.stop(), 0);
    assert.ok(fs.readFileSync(backingA).equals(original), 'the data is only in the cache');

    fs.copyFileSync(backingA, backingA2);
    assert.notEqual(fs.statSync(backingA2).ino, fs.statSync(backingA).ino, 'the copy is another file');
    const cacheBefore = fs.readFileSync(cache);
    const refused = await runCli(['serve', '--cache', cache, '--backing', backingA2, '--socket', socket]);
    assertOneLineError(refused, 1, /cannot serve .*a2\.img through .*cache\.img: this cache belongs to backing device "file:ino=\d+", not "file:ino=\d+" \(accept it only if it is a copy of that device\): add --force-backing to accept it$/);
    assert.equal(refused.stdout, '');
    assert.ok(fs.readFileSync(cache).equals(cacheBefore), 'the refused start wrote nothing to the cache');
    assert.equal(fs.existsSync(socket), false, 'nothing listened');

    const forced = await startServe(t, ['--cache', cache, '--backing', backingA2, '--socket', socket, '--force-backing', '--tuning', holdWriteback], dir);
    const expected = Buffer.from(original);
    expected.fill(0x5c, 1 * MiB, 3 * MiB);
    assert.ok((await copyOut(uriFor(socket), path.join(dir, 'out.bin'))).equals(expected), 'the copy, through the cache, holds what was written');
    assert.equal(await forced.stop(), 0);
    // (Replayed dirty data counts as old, so writeback to the copy may already have begun.)
    assert.ok(fs.readFileSync(backingA).equals(original), 'nothing was written to the file the cache was formatted for');
  });
});

describe('serve logs', () => {
  it('accepts every --log-level and refuses anything else', async (t) => {
    const dir = tempDir(t, 'pcache-lifecycle-');
    // A missing backing directory fails after the command line was accepted (exit 1, not 2).
    const base = ['serve', '--cache', path.join(dir, 'cache.img'), '--backing', path.join(dir, 'missing', 'b.img'), '--socket', path.join(dir, 's.sock')];
    const accepted = await Promise.all(logLevels.map((level) => runCli([...base, '--log-level', level])));
    accepted.forEach((result, index) => {
      assert.equal(result.code, 1, `--log-level ${logLevels[index] ?? ''} is accepted: ${result.stderr}`);
      assert.doesNotMatch(result.stderr, /--log-level/);
    });
    const bad: [string, RegExp][] = [
      ['verbose', /^pcache: serve: --log-level must be one of fatal, error, warn, info, debug, trace, silent, got 'verbose'$/],
      ['INFO', /--log-level must be one of .*, got 'INFO'/],
      ['30', /--log-level must be one of .*, got '30'/],
      ['', /--log-level needs a non-empty value/],
    ];
    const refused = await Promise.all(bad.map(([level]) => runCli([...base, `--log-level=${level}`])));
    refused.forEach((result, index) => {
      const [level, pattern] = bad[index] ?? ['', /./];
      assert.doesNotThrow(() => { assertOneLineError(result, 2, pattern); }, `--log-level '${level}': ${result.code} ${result.stderr}`);
    });
    assert.deepEqual(fs.readdirSync(dir), [], 'nothing was created');
  });

  it('at info, logs a handful of JSON lines for a server that answered thousands of requests', async (t) => {
    await requireFioNbd();
    const dir = tempDir(t, 'pcache-lifecycle-');
    const socket = path.join(dir, 'nbd.sock');
    const control = path.join(dir, 'control.sock');
    const server = await startServe(t, [
      '--cache', path.join(dir, 'cache.img'), '--cache-size', '128M', '--backing', path.join(dir, 'backing.img'), '--backing-size', '16M',
      '--socket', socket, '--control', control, '--log-level', 'info',
    ], dir);
    const fio = await runTool('fio', [
      '--name=many-requests', '--ioengine=nbd', `--uri=${uriFor(socket)}`, '--rw=randrw', '--bs=4k', '--size=16m', '--iodepth=8', '--output-format=json',
    ], 120_000);
    assert.equal(fio.code, 0, fio.stderr);
    const requests = (await serverStatus(control)).nbd.requestsTotal;
    assert.ok(requests >= 4000, `the server answered thousands of requests (${requests})`);
    assert.equal(await server.stop(), 0);
    const lines = assertQuietLogs(server.stderr);
    assert.deepEqual(lines.map((line) => line.msg), ['serving', 'stopping', 'stopped'], server.stderr);
    for (const line of lines) assertLogLine(line);
  });

  it('--log-level warn prints no info lines; --log-level debug is accepted and logs JSON', async (t) => {
    const dir = tempDir(t, 'pcache-lifecycle-');
    const socket = path.join(dir, 'nbd.sock');
    const args = ['--cache', path.join(dir, 'cache.img'), '--cache-size', '128M', '--backing', path.join(dir, 'backing.img'), '--backing-size', '16M', '--socket', socket];
    const quiet = await startServe(t, [...args, '--log-level', 'warn'], dir);
    await qemuIo(uriFor(socket), ['write -P 7 0 64k', 'flush', 'read -P 7 0 64k']);
    assert.equal(await quiet.stop(), 0);
    assert.equal(quiet.stderr, '', 'nothing below warn was logged');
    assert.match(quiet.stdout, /^serving /m, 'the terminal output does not depend on the log level');
    assert.match(quiet.stdout, /^stopped \(SIGTERM\)$/m);

    const verbose = await startServe(t, [...args, '--log-level', 'debug'], dir);
    assert.equal(await verbose.stop(), 0);
    const lines = assertQuietLogs(verbose.stderr);
    for (const line of lines) assertLogLine(line);
    assert.deepEqual(lines.filter((line) => line.level === 30).map((line) => line.msg), ['serving', 'stopping', 'stopped'], 'debug logs the info lines too');
  });
});

/** A log line as log.ts promises: JSON with a numeric level, a message, an ISO time and the pid. */
function assertLogLine(line: LogLine): void {
  assert.equal(typeof line.msg, 'string');
  assert.ok([10, 20, 30, 40, 50, 60].includes(line.level), `a pino level: ${line.level}`);
  assert.ok(typeof line.time === 'string' && !Number.isNaN(Date.parse(line.time)), `an ISO time: ${JSON.stringify(line)}`);
  assert.equal(typeof line.pid, 'number');
}
