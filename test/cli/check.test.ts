// `pcache check`: exit 0 on a healthy cache (also one a crash left behind), exit 1 with the
// problems listed on a damaged one or on a device that holds no cache; never writes.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Cache } from '../../src/cache/cache.js';
import { FileDevice } from '../../src/device/file_device.js';
import { segmentInfoOffsetsBytes, segmentOffsetBytes } from '../../src/ondisk/layout.js';
import { MiB } from '../../src/lib/units.js';
import { patternBytes } from '../helpers/bytes.js';
import { tempDir } from '../helpers/files.js';
import { runCli } from '../helpers/pcache.js';

interface CheckJson {
  ok: boolean;
  problems: string[];
  warnings: string[];
  summary: { keys: number; dirtyBytes: number } | null;
}

/** A formatted 1 MiB-segment cache holding a few flushed, partly written-back writes. */
async function cacheWithData(dir: string): Promise<string> {
  const cache = path.join(dir, 'cache.img');
  const backing = path.join(dir, 'backing.img');
  fs.writeFileSync(backing, Buffer.alloc(16 * MiB));
  const formatted = await runCli(['format', '--cache', cache, '--cache-size', '8M', '--segment-size', '1M', '--backing', backing]);
  assert.equal(formatted.code, 0, formatted.stderr);
  const cacheDevice = await FileDevice.open(cache, { blocking: true });
  const backingDevice = await FileDevice.open(backing);
  const engine = await Cache.open({ cacheDevice, backingDevice, background: false });
  await engine.write(patternBytes(64 * 1024, 1), 0);
  await engine.flush();
  await engine.drain();
  await engine.write(patternBytes(128 * 1024, 2), 4 * MiB);
  await engine.flush();
  await engine.close();
  await cacheDevice.close();
  await backingDevice.close();
  return cache;
}

describe('pcache check', () => {
  it('passes a healthy cache (exit 0), in text and JSON, without writing to it', async (t) => {
    const cache = await cacheWithData(tempDir(t));
    const before = fs.readFileSync(cache);
    const text = await runCli(['check', '--cache', cache]);
    assert.equal(text.code, 0, text.stdout + text.stderr);
    assert.match(text.stdout, /cache\.img: 7 segments \(1 log, \d data, \d free\), \d+ ksets, 2 keys, 131072 dirty bytes; log ends: /);
    assert.match(text.stdout, /^ok: no problems \(0 warnings\)$/m);
    const json = await runCli(['check', '--cache', cache, '--json']);
    assert.equal(json.code, 0);
    const report = JSON.parse(json.stdout) as CheckJson;
    assert.deepEqual([report.ok, report.problems, report.summary?.keys, report.summary?.dirtyBytes], [true, [], 2, 131072]);
    assert.ok(fs.readFileSync(cache).equals(before), 'check never writes');
  });

  it('fails a cache whose segment chain is damaged (exit 1), naming the problem', async (t) => {
    const cache = await cacheWithData(tempDir(t));
    const fd = fs.openSync(cache, 'r+');
    for (const copy of segmentInfoOffsetsBytes) fs.writeSync(fd, Buffer.alloc(64, 0xee), 0, 64, segmentOffsetBytes(3, MiB) + copy);
    fs.closeSync(fd);
    const text = await runCli(['check', '--cache', cache]);
    assert.equal(text.code, 1, text.stdout);
    assert.match(text.stdout, /^problem: segment 3: no valid seg_info/m);
    assert.match(text.stdout, /^\d+ problem\(s\) found$/m);
    const json = JSON.parse((await runCli(['check', '--cache', cache, '--json'])).stdout) as CheckJson;
    assert.equal(json.ok, false);
    assert.ok(json.problems.some((p) => p.startsWith('segment 3: no valid seg_info')), json.problems.join('; '));
  });

  it('fails a device that holds no cache (exit 1)', async (t) => {
    const dir = tempDir(t);
    const file = path.join(dir, 'other.img');
    fs.writeFileSync(file, patternBytes(MiB, 7));
    const result = await runCli(['check', '--cache', file, '--json']);
    assert.equal(result.code, 1);
    const report = JSON.parse(result.stdout) as CheckJson;
    assert.deepEqual([report.ok, report.summary], [false, null]);
    assert.match(report.problems[0] ?? '', /no pcache superblock/);
  });
});
