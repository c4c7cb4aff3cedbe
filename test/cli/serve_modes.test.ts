// `pcache serve` beyond the basic path: the no-argument default (files, printed recipes,
// stop), refusals that must not write a byte (a cache of another backing file, a device that
// is not a cache, a cache another server is using, a socket another server is listening on),
// TCP, --gc-percent on an existing cache, and --no-cache.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { GiB, MiB } from '../../src/lib/units.js';
import { patternBytes } from '../helpers/bytes.js';
import { tempDir } from '../helpers/files.js';
import { assertOneLineError, runCli, startServe } from '../helpers/pcache.js';
import { nbdcopy, requireTool, runTool, uriFor } from '../helpers/tools.js';

describe('pcache serve with no arguments', () => {
  it('creates ./pcache-data with a 1 GiB cache and an 8 GiB disk, prints how to connect, and serves them', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const cwd = tempDir(t);
    const server = await startServe(t, [], cwd);
    const data = path.join(cwd, 'pcache-data');
    assert.equal(fs.statSync(path.join(data, 'cache.img')).size, 1 * GiB);
    assert.equal(fs.statSync(path.join(data, 'backing.img')).size, 8 * GiB);
    assert.ok(fs.statSync(path.join(data, 'backing.img')).blocks * 512 < 64 * MiB, 'the disk is sparse');
    const socket = path.join(data, 'nbd.sock');
    const uri = `nbd+unix:///pcache?socket=${socket}`;
    const out = server.stdout;
    assert.match(out, /^created pcache-data\/backing\.img \(sparse\)\ncreated pcache-data\/cache\.img \(sparse\)\n/);
    assert.match(out, /serving pcache-data\/backing\.img \(8 GiB\) through cache pcache-data\/cache\.img \(1 GiB\) \(formatted now\) at /);
    for (const recipe of [
      `nbdinfo '${uri}'`,
      `nbdcopy disk.img '${uri}'`,
      `nbdfuse /tmp/pcache-fuse '${uri}' &`,
      `qemu-img info '${uri}'`,
      `qemu-system-x86_64 -drive file=${uri},format=raw,if=virtio`,
      `nbd-client -unix ${socket} /dev/nbd0 -N pcache -b 4096 -C 4`,
      'pcache status --control pcache-data/control.sock',
      'pcache drain --control pcache-data/control.sock',
    ]) {
      assert.ok(out.includes(recipe), `prints: ${recipe}`);
    }
    const size = await runTool('nbdinfo', ['--size', uri]);
    assert.equal(size.stdout.trim(), String(8 * GiB), 'the printed nbdinfo line works');
    const status = await runCli(['status', '--control', 'pcache-data/control.sock', '--json'], { cwd });
    assert.equal(status.code, 0, status.stderr);
    assert.equal(await server.stop('SIGINT'), 0);

    // A second start reuses the files and does not format again.
    const again = await startServe(t, [], cwd);
    assert.doesNotMatch(again.stdout, /created|formatted now/);
    assert.equal(await again.stop(), 0);
  });
});

describe('serve refusals', () => {
  it('refuses a cache that belongs to another backing file, without writing a byte', async (t) => {
    const dir = tempDir(t);
    const cache = path.join(dir, 'cache.img');
    const backingA = path.join(dir, 'a.img');
    const backingB = path.join(dir, 'b.img');
    fs.writeFileSync(backingA, Buffer.alloc(16 * MiB));
    fs.writeFileSync(backingB, Buffer.alloc(16 * MiB));
    assert.equal((await runCli(['format', '--cache', cache, '--cache-size', '8M', '--segment-size', '1M', '--backing', backingA])).code, 0);
    const before = fs.readFileSync(cache);
    const refused = await runCli(['serve', '--cache', cache, '--backing', backingB, '--socket', path.join(dir, 's.sock')]);
    assertOneLineError(refused, 1, /cannot serve .*b\.img through .*cache\.img: this cache belongs to backing device "file:ino=\d+", not "file:ino=\d+"/);
    assert.ok(fs.readFileSync(cache).equals(before), 'the cache is unchanged');
    assert.equal(fs.existsSync(path.join(dir, 's.sock')), false, 'nothing listened');

    // Another file stays another file at any size (a grown backing device is served at its new
    // size only when it is the same device: test/cache/cache_recovery.test.ts).
    fs.writeFileSync(backingB, Buffer.alloc(32 * MiB));
    const resized = await runCli(['serve', '--cache', cache, '--backing', backingB, '--socket', path.join(dir, 's.sock')]);
    assertOneLineError(resized, 1, /this cache belongs to backing device "file:ino=\d+", not "file:ino=\d+"/);
    assert.ok(fs.readFileSync(cache).equals(before));
  });

  it('refuses a cache device holding something that is not a cache, without writing a byte', async (t) => {
    const dir = tempDir(t);
    const cache = path.join(dir, 'cache.img');
    const foreign = patternBytes(8 * MiB, 3);
    fs.writeFileSync(cache, foreign);
    const refused = await runCli(['serve', '--cache', cache, '--backing', path.join(dir, 'b.img'), '--backing-size', '16M', '--socket', path.join(dir, 's.sock')]);
    assertOneLineError(refused, 1, /holds data that is not a pcache cache; refusing to touch it/);
    assert.ok(fs.readFileSync(cache).equals(foreign));
    assert.equal(fs.existsSync(path.join(dir, 'b.img')), false, 'the backing file this failed start created is gone');
  });

  it('refuses a second server on a cache in use, and a socket another server listens on', async (t) => {
    const dir = tempDir(t);
    const cache = path.join(dir, 'cache.img');
    const backing = path.join(dir, 'b.img');
    const socket = path.join(dir, 's.sock');
    const first = await startServe(t, ['--cache', cache, '--cache-size', '128M', '--backing', backing, '--backing-size', '16M', '--socket', socket], dir);
    const twin = await runCli(['serve', '--cache', cache, '--backing', backing, '--socket', path.join(dir, 'other.sock')]);
    assertOneLineError(twin, 1, new RegExp(`refusing to serve .*cache\\.img: it is open in node \\(pid \\d+\\)`));
    const other = path.join(dir, 'other-cache.img');
    const squatter = await runCli(['serve', '--cache', other, '--cache-size', '128M', '--backing', path.join(dir, 'c.img'), '--backing-size', '16M', '--socket', socket]);
    assertOneLineError(squatter, 1, /s\.sock is in use by another server/);
    assert.equal(fs.existsSync(other), false, 'the cache file this failed start created is gone');
    assert.equal(fs.existsSync(path.join(dir, 'c.img')), false, 'and so is its backing file');
    assert.equal(await first.stop(), 0);
  });
});

describe('serve options', () => {
  it('listens on TCP on 127.0.0.1 with --port, under a chosen export name', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const dir = tempDir(t);
    const server = await startServe(t, ['--cache', path.join(dir, 'c.img'), '--cache-size', '128M', '--backing', path.join(dir, 'b.img'), '--backing-size', '16M', '--port', '0', '--export-name', 'disk1'], dir);
    const line = await server.ready();
    const match = /at (nbd:\/\/127\.0\.0\.1:(\d+)\/disk1) \(connect with: nbdinfo 'nbd:\/\/127\.0\.0\.1:\d+\/disk1'\)$/.exec(line);
    assert.ok(match !== null, line);
    const result = await runTool('nbdinfo', ['--json', match[1] ?? '']);
    assert.equal(result.code, 0, result.stderr);
    const info = (JSON.parse(result.stdout) as { exports: { 'export-name': string; 'export-size': number }[] }).exports[0];
    assert.deepEqual([info?.['export-name'], info?.['export-size']], ['disk1', 16 * MiB]);
    assert.equal(await server.stop(), 0);
  });

  it('stores --gc-percent in an existing cache', async (t) => {
    const dir = tempDir(t);
    const cache = path.join(dir, 'c.img');
    const args = ['--cache', cache, '--cache-size', '128M', '--backing', path.join(dir, 'b.img'), '--backing-size', '16M', '--socket', path.join(dir, 's.sock')];
    const first = await startServe(t, args, dir);
    assert.equal(await first.stop(), 0);
    const second = await startServe(t, [...args, '--gc-percent', '25'], dir);
    assert.equal(await second.stop(), 0);
    const status = await runCli(['status', '--cache', cache, '--json']);
    assert.equal((JSON.parse(status.stdout) as { cache: { gcPercent: number } }).cache.gcPercent, 25);
  });

  it('serves the backing file directly with --no-cache', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const dir = tempDir(t);
    const backing = path.join(dir, 'b.img');
    const data = patternBytes(4 * MiB, 8);
    fs.writeFileSync(backing, data);
    const socket = path.join(dir, 's.sock');
    const control = path.join(dir, 'ctl.sock');
    const server = await startServe(t, ['--no-cache', '--backing', backing, '--socket', socket, '--control', control], dir);
    assert.match(await server.ready(), /serving .*b\.img \(4 MiB\) without a cache at /);
    const out = path.join(dir, 'out.bin');
    await nbdcopy([uriFor(socket), out]);
    assert.ok(fs.readFileSync(out).equals(data));
    const status = await runCli(['status', '--control', control, '--json']);
    assert.equal((JSON.parse(status.stdout) as { cache: unknown }).cache, null);
    assert.equal(await server.stop(), 0);
  });
});
