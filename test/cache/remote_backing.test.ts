// The cache engine over a remote backing device: a Cache whose backing device is an
// NbdRemoteDevice to nbdkit's file plugin. Online, writes, flush and drain land in nbdkit's
// file. With nbdkit killed, hits are still served, writes are absorbed, misses fail and
// status says 'backing-offline'. With nbdkit restarted on the same socket, the device
// reconnects by itself, writeback resumes, drain completes, and the file holds everything.
// The backing identity recorded at format lets the same cache reopen over a new connection.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { Cache } from '../../src/cache/cache.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { KiB, MiB } from '../../src/lib/units.js';
import { cacheBytesFor, pattern, readBytes } from '../helpers/cache_fixture.js';
import { openRemoteDevice } from '../helpers/nbd_client.js';
import { fileSpec, Nbdkit } from '../helpers/nbdkit.js';
import { waitUntil } from '../helpers/wait.js';
const backingBytes = 32 * MiB;

describe('the engine over an NbdRemoteDevice', () => {
  it('writes back to nbdkit, rides out nbdkit being killed, and catches up when it returns', async (t) => {
    const server = await Nbdkit.start(t, fileSpec(backingBytes));
    const image = server.file('disk.img');
    const fileAt = (offsetBytes: number, lengthBytes: number): Buffer => fs.readFileSync(image).subarray(offsetBytes, offsetBytes + lengthBytes);
    const reconnect = { delayMinMs: 50, delayMaxMs: 200 };
    const remote = await openRemoteDevice(t, server.uri, { reconnect });
    const cacheDevice = new MemoryDevice(cacheBytesFor(16));
    const cache = await Cache.open({ cacheDevice, backingDevice: remote, formatIfBlank: { segmentSizeBytes: MiB } });

    // Online: everything written and drained is in nbdkit's file.
    await cache.write(pattern(1, 0, 256 * KiB), 0);
    await cache.write(pattern(2, 8 * MiB, 64 * KiB), 8 * MiB);
    await cache.flush();
    await cache.drain();
    assert.ok(fileAt(0, 256 * KiB).equals(pattern(1, 0, 256 * KiB)), 'the first write reached the file');
    assert.ok(fileAt(8 * MiB, 64 * KiB).equals(pattern(2, 8 * MiB, 64 * KiB)), 'the second write reached the file');
    assert.equal(cache.status().state, 'running');

    // nbdkit dies: hits are served, writes absorbed, misses fail, status says backing-offline.
    await server.kill();
    await waitUntil(() => remote.state().connectionsConnected === 0, 'the remote device noticed');
    assert.deepEqual(await readBytes(cache, 0, 256 * KiB), pattern(1, 0, 256 * KiB), 'a hit is served');
    await cache.write(pattern(3, 4 * MiB, 128 * KiB), 4 * MiB);
    await cache.write(pattern(4, 64 * KiB, 4 * KiB), 64 * KiB);
    await cache.flush();
    await waitUntil(() => cache.status().state === 'backing-offline', 'the cache reports the backing device offline');
    assert.match(cache.status().stateReason ?? '', /backing offline since .*nbdkit\.sock/);
    await assert.rejects(() => readBytes(cache, 20 * MiB, 4 * KiB), (error: unknown) => {
      assert.match((error as Error).message, /offline|connection/);
      return true;
    }, 'a miss needs the backing device');
    assert.deepEqual(await readBytes(cache, 4 * MiB, 128 * KiB), pattern(3, 4 * MiB, 128 * KiB), 'an absorbed write reads back');
    assert.ok(cache.status().dirtyBytes > 0, 'nothing dirty was dropped');
    assert.ok(!fileAt(4 * MiB, 128 * KiB).equals(pattern(3, 4 * MiB, 128 * KiB)), 'the file does not have it yet');

    // nbdkit returns on the same socket: the device reconnects and writeback catches up.
    await server.restart();
    await waitUntil(() => remote.state().connectionsConnected === 4, 'the remote device reconnected');
    await cache.drain();
    assert.equal(cache.status().state, 'running');
    assert.equal(cache.status().dirtyBytes, 0);
    const expected = pattern(1, 0, 256 * KiB);
    pattern(4, 64 * KiB, 4 * KiB).copy(expected, 64 * KiB);
    assert.ok(fileAt(0, 256 * KiB).equals(expected), 'the overwrite made while offline reached the file');
    assert.ok(fileAt(4 * MiB, 128 * KiB).equals(pattern(3, 4 * MiB, 128 * KiB)), 'the write made while offline reached the file');
    assert.ok(fileAt(8 * MiB, 64 * KiB).equals(pattern(2, 8 * MiB, 64 * KiB)));
    assert.deepEqual(await readBytes(cache, 20 * MiB, 4 * KiB), Buffer.alloc(4 * KiB), 'misses work again');
    await cache.close();

    // The identity recorded at format matches a new connection to the same export.
    const again = await openRemoteDevice(t, server.uri, { connections: 2 });
    assert.equal(again.identity, remote.identity);
    const reopened = await Cache.open({ cacheDevice, backingDevice: again });
    assert.deepEqual(await readBytes(reopened, 4 * MiB, 128 * KiB), pattern(3, 4 * MiB, 128 * KiB));
    await reopened.close();
  });
});
