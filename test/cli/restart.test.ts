// Stopping and restarting `pcache serve`: flushed data survives a clean stop (SIGTERM, SIGINT)
// and a crash (SIGKILL to its process group, or to the one process started); the sockets a
// killed server leaves behind do not block the restart, and a restart right after the kill
// finds no other process holding the cache, replays the log and serves the flushed data.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { MiB } from '../../src/lib/units.js';
import { patternBytes } from '../helpers/bytes.js';
import { tempDir } from '../helpers/files.js';
import { assertQuietLogs, logLines, pcacheJson, runCli, startServe } from '../helpers/pcache.js';
import { nbdcopy, processAlive, requireTool, uriFor } from '../helpers/tools.js';

interface Paths {
  readonly dir: string;
  readonly args: string[];
  readonly socket: string;
  readonly control: string;
}

function paths(t: TestContext): Paths {
  const dir = tempDir(t);
  const socket = path.join(dir, 'nbd.sock');
  const control = path.join(dir, 'control.sock');
  const args = ['--cache', path.join(dir, 'cache.img'), '--cache-size', '128M', '--backing', path.join(dir, 'backing.img'), '--backing-size', '64M', '--socket', socket, '--control', control];
  return { dir, args, socket, control };
}

/** Writes `data` at 0 with nbdcopy and a final flush (acknowledged flush = durable). */
async function writeFlushed(socket: string, dir: string, data: Buffer): Promise<void> {
  const source = path.join(dir, `in-${data.length}.bin`);
  fs.writeFileSync(source, data);
  await nbdcopy(['--flush', source, uriFor(socket)]);
}

async function readBack(socket: string, dir: string, length: number): Promise<Buffer> {
  const out = path.join(dir, 'out.bin');
  fs.rmSync(out, { force: true });
  await nbdcopy([uriFor(socket), out]);
  return fs.readFileSync(out).subarray(0, length);
}

async function serverPid(control: string): Promise<number> {
  return ((await pcacheJson(['status', '--control', control, '--json'])) as { pid: number }).pid;
}

describe('restart', () => {
  it('keeps flushed data across SIGTERM and SIGINT, exiting 0 each time', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const p = paths(t);
    const data = patternBytes(6 * MiB, 61);
    const first = await startServe(t, p.args, p.dir);
    await writeFlushed(p.socket, p.dir, data);
    assert.equal(await first.stop('SIGTERM'), 0);
    assert.match(first.stdout, /stopped \(SIGTERM\)\n$/);
    assert.deepEqual(assertQuietLogs(first.stderr).map((line) => line.msg), ['serving', 'stopping', 'stopped']);
    assert.equal(fs.existsSync(p.socket), false, 'a clean stop removes its socket');

    const second = await startServe(t, p.args, p.dir);
    assert.ok((await readBack(p.socket, p.dir, data.length)).equals(data), 'the data is back after SIGTERM');
    assert.equal(await second.stop('SIGINT'), 0);
    assert.match(second.stdout, /stopped \(SIGINT\)\n$/);

    const third = await startServe(t, p.args, p.dir);
    assert.ok((await readBack(p.socket, p.dir, data.length)).equals(data), 'and after SIGINT');
    assert.equal(await third.stop(), 0);
  });

  it('keeps flushed data across SIGKILL, and the stale sockets do not block the restart', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const p = paths(t);
    const data = patternBytes(6 * MiB, 62);
    const first = await startServe(t, p.args, p.dir);
    await writeFlushed(p.socket, p.dir, data);
    await first.crash();
    assert.ok(fs.statSync(p.socket).isSocket(), 'the killed server left its NBD socket behind');
    assert.ok(fs.statSync(p.control).isSocket(), 'and its control socket');

    const second = await startServe(t, p.args, p.dir);
    assert.ok((await readBack(p.socket, p.dir, data.length)).equals(data), 'the flushed data survived the crash');
    // A second crash right after more flushed writes, then a check of the cache offline.
    const more = patternBytes(2 * MiB, 63);
    await writeFlushed(p.socket, p.dir, more);
    await second.crash();
    const check = await runCli(['check', '--cache', path.join(p.dir, 'cache.img')]);
    assert.equal(check.code, 0, check.stdout + check.stderr);
    const third = await startServe(t, p.args, p.dir);
    const expected = Buffer.concat([more, data.subarray(more.length)]);
    assert.ok((await readBack(p.socket, p.dir, data.length)).equals(expected));
    assert.equal(await third.stop(), 0);
  });

  it('SIGKILL of the process started is the server\'s end: a restart at once succeeds, replays and has the flushed data', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const p = paths(t);
    const data = patternBytes(4 * MiB, 64);
    const first = await startServe(t, p.args, p.dir);
    assert.equal(await serverPid(p.control), first.pid, 'the server is the process started');
    await writeFlushed(p.socket, p.dir, data);
    process.kill(first.pid, 'SIGKILL'); // the process alone, not its group
    assert.equal((await first.wait()).signal, 'SIGKILL');
    assert.equal(processAlive(first.pid), false);

    const second = await startServe(t, p.args, p.dir);
    const serving = logLines(second.stderr).find((line) => line.msg === 'serving');
    const replay = serving?.replay as { ksets?: unknown; stopDamage?: unknown } | undefined;
    assert.ok(typeof replay?.ksets === 'number' && replay.ksets > 0, `the restart replayed the log: ${JSON.stringify(serving)}`);
    assert.equal(replay.stopDamage, false);
    assert.ok((await readBack(p.socket, p.dir, data.length)).equals(data), 'the flushed data survived the kill');
    assert.equal(await second.stop(), 0);
  });

  it('a second stop signal while stopping changes nothing', async (t) => {
    const p = paths(t);
    const server = await startServe(t, p.args, p.dir);
    server.child.kill('SIGTERM');
    server.child.kill('SIGINT');
    assert.equal((await server.wait()).code, 0);
    assert.equal((server.stdout.match(/^stopped /gm) ?? []).length, 1);
  });
});
