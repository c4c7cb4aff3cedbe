// Write modes through the real command: `serve --mode`, `pcache set mode`, the mode kept in the
// cache across a restart, `status` (server and offline) and the metrics, writethrough data on
// the backing file at acknowledgement, the sequential cutoff as a setting, and bad input that
// changes nothing (a usage error on the command line, EINVAL from the control socket).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { MiB } from '../../src/lib/units.js';
import { patternBytes } from '../helpers/bytes.js';
import { errorOf, httpRequest } from '../helpers/control_http.js';
import { tempDir } from '../helpers/files.js';
import { openRemoteDevice } from '../helpers/nbd_client.js';
import { assertOneLineError, pcacheJson, printedMetricsUrl, runCli, startServe } from '../helpers/pcache.js';
import { uriFor } from '../helpers/tools.js';

interface StatusJson {
  cache: { mode: string; cacheFlags: number; counters: Record<string, number> };
}

async function modeOf(args: string[]): Promise<string> {
  return ((await pcacheJson(['status', ...args, '--json'])) as StatusJson).cache.mode;
}

function fileHolds(file: string, offsetBytes: number, expected: Uint8Array): boolean {
  const fd = fs.openSync(file, 'r');
  try {
    const bytes = Buffer.alloc(expected.length);
    fs.readSync(fd, bytes, 0, bytes.length, offsetBytes);
    return bytes.equals(Buffer.from(expected));
  } finally {
    fs.closeSync(fd);
  }
}

describe('write modes through pcache serve', () => {
  it('serve --mode, set mode, status and metrics show it, a restart keeps it, bad input changes nothing', async (t) => {
    const dir = tempDir(t, 'pcache-modes-');
    const cache = path.join(dir, 'cache.img');
    const backing = path.join(dir, 'backing.img');
    const control = path.join(dir, 'control.sock');
    const socket = path.join(dir, 'nbd.sock');
    const serveArgs = ['--cache', cache, '--cache-size', '128M', '--backing', backing, '--backing-size', '16M', '--socket', socket, '--control', control];

    const badMode = await runCli(['serve', ...serveArgs, '--mode', 'writeforward']);
    assertOneLineError(badMode, 2, /^pcache: serve: mode must be one of writeback, writethrough, writearound, passthrough, got "writeforward"$/);
    assert.ok(!fs.existsSync(cache), 'a refused serve creates nothing');

    const server = await startServe(t, [...serveArgs, '--mode', 'writethrough', '--metrics', '127.0.0.1:0'], dir);
    const status = (await pcacheJson(['status', '--control', control, '--json'])) as StatusJson;
    assert.equal(status.cache.mode, 'writethrough');
    assert.equal((status.cache.cacheFlags >> 2) & 0xf, 1, 'the cache mode bits of dm-pcache\'s cache_flags');

    // Writethrough: the backing file holds the data when the write is acknowledged.
    const device = await openRemoteDevice(t, uriFor(socket));
    const data = patternBytes(64 * 1024, 5);
    await device.write(data, MiB);
    assert.ok(fileHolds(backing, MiB, data));

    const set = await runCli(['set', '--control', control, 'mode', 'passthrough', 'sequential_cutoff_bytes', '0']);
    assert.equal(set.code, 0, set.stderr);
    assert.match(set.stdout, /^mode +passthrough {3}\(changed, stored in the cache\)$/m);
    assert.match(set.stdout, /^sequential_cutoff_bytes +0 bytes {3}\(changed until the server stops\)$/m);
    assert.equal(await modeOf(['--control', control]), 'passthrough');

    // Refused, on the command line and by the server: nothing changes.
    assertOneLineError(await runCli(['set', '--control', control, 'mode', 'none']), 2, /mode must be one of writeback, writethrough, writearound, passthrough, got "none"/);
    for (const body of ['{"mode":"none"}', '{"mode":3}', '{"mode":"writeback","gc_percent":91}']) {
      const answer = await httpRequest(control, 'PATCH', '/settings', body);
      assert.equal(answer.status, 400, body);
      assert.equal(errorOf(answer).code, 'EINVAL');
    }
    assert.equal(await modeOf(['--control', control]), 'passthrough');

    const url = await printedMetricsUrl(server);
    const text = await (await fetch(url)).text();
    assert.match(text, /^pcache_mode\{mode="passthrough"\} 1$/m);
    assert.match(text, /^pcache_mode\{mode="writeback"\} 0$/m);
    assert.match(text, /^pcache_bypassed_requests_total\{reason="mode"\} 1$/m);
    assert.match(text, /^pcache_fills_admitted_total 1$/m);

    assert.equal(await server.stop(), 0);
    assert.equal(await modeOf(['--cache', cache]), 'passthrough', 'status of a stopped cache shows the stored mode');
    const again = await startServe(t, serveArgs, dir);
    assert.equal(await modeOf(['--control', control]), 'passthrough', 'a restart without --mode keeps the stored one');
    assert.equal(await again.stop(), 0);
  });
});
