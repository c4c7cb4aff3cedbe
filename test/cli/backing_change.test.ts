// The backing file changed behind pcache's back, through the real command: a restart notices it
// and serves the new contents (never the cache's stale copy); `pcache invalidate` drops clean
// copies of a running server; `pcache detach` writes everything back and leaves the backing
// file to be used alone.
import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { MiB } from '../../src/lib/units.js';
import { tempDir } from '../helpers/files.js';
import { openRemoteDevice } from '../helpers/nbd_client.js';
import { logLines, runCli, startServe, type ServeProcess } from '../helpers/pcache.js';
import { patternBytes } from '../helpers/bytes.js';
import { uriFor } from '../helpers/tools.js';

interface Setup {
  readonly dir: string;
  readonly cache: string;
  readonly backing: string;
  readonly socket: string;
  readonly control: string;
}

function setup(t: TestContext): Setup {
  const dir = tempDir(t);
  const backing = path.join(dir, 'backing.img');
  fs.writeFileSync(backing, patternBytes(16 * MiB, 1));
  return { dir, cache: path.join(dir, 'cache.img'), backing, socket: path.join(dir, 'nbd.sock'), control: path.join(dir, 'ctl.sock') };
}

function serve(t: TestContext, s: Setup, extra: readonly string[] = []): Promise<ServeProcess> {
  return startServe(t, ['--cache', s.cache, '--cache-size', '16M', '--segment-size', '1M', '--backing', s.backing, '--socket', s.socket, '--control', s.control, ...extra], s.dir);
}

async function readThrough(t: TestContext, s: Setup, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
  const device = await openRemoteDevice(t, uriFor(s.socket), { connections: 1 });
  const out = Buffer.alloc(lengthBytes);
  await device.read(out, offsetBytes);
  await device.close();
  return out;
}

/** Something else writes to the backing file while pcache is stopped (or behind its back). */
function writeBehind(s: Setup, tag: number): Buffer {
  const bytes = patternBytes(65536, tag);
  const fd = fs.openSync(s.backing, 'r+');
  fs.writeSync(fd, bytes, 0, bytes.length, 0);
  fs.closeSync(fd);
  return bytes;
}

describe('a backing file changed behind pcache', () => {
  it('a restart after a clean stop notices the change and serves the new contents, not the stale copies', async (t) => {
    const s = setup(t);
    const first = await serve(t, s);
    assert.ok((await readThrough(t, s, 0, 65536)).equals(patternBytes(16 * MiB, 1).subarray(0, 65536)));
    assert.equal(await first.stop('SIGTERM'), 0);
    const changed = writeBehind(s, 9);
    const second = await serve(t, s);
    assert.ok((await readThrough(t, s, 0, 65536)).equals(changed), 'the new contents');
    const warned = logLines(second.stderr).find((line) => /backing device changed since the last clean stop/.test(line.msg));
    assert.ok(warned !== undefined, second.stderr);
    assert.equal(await second.stop('SIGTERM'), 0);
  });

  it('pcache invalidate drops a running server\'s clean copies; pcache detach writes back and stops it', async (t) => {
    const s = setup(t);
    const server = await serve(t, s);
    await readThrough(t, s, 0, 65536);
    const changed = writeBehind(s, 7); // while it serves: only invalidate can tell it
    const invalidated = await runCli(['invalidate', '--control', s.control]);
    assert.equal(invalidated.code, 0, invalidated.stderr);
    assert.match(invalidated.stdout, /dropped 65536 bytes \(64 KiB\) of clean cached copies; dirty data stays/);
    assert.ok((await readThrough(t, s, 0, 65536)).equals(changed));
    // A write left dirty in the cache, then detach: it reaches the backing file, and the server exits.
    const device = await openRemoteDevice(t, uriFor(s.socket), { connections: 1 });
    const dirty = patternBytes(8192, 5);
    await device.write(dirty, 4 * MiB);
    await device.sync();
    await device.close();
    const detached = await runCli(['detach', '--control', s.control, '--json']);
    assert.equal(detached.code, 0, detached.stderr);
    assert.deepEqual(JSON.parse(detached.stdout), { detached: true });
    assert.equal((await server.wait()).code, 0, 'the server stopped by itself');
    const onDisk = Buffer.alloc(8192);
    const fd = fs.openSync(s.backing, 'r');
    fs.readSync(fd, onDisk, 0, 8192, 4 * MiB);
    fs.closeSync(fd);
    assert.ok(onDisk.equals(dirty), 'the dirty write is in the backing file');
    // Used alone meanwhile, then served again: nothing stale.
    const later = writeBehind(s, 11);
    const again = await serve(t, s);
    assert.ok((await readThrough(t, s, 0, 65536)).equals(later));
    assert.equal(await again.stop('SIGTERM'), 0);
  });
});
