// `pcache format`: formats blank devices; refuses (exit 1, one line, device byte-for-byte
// unchanged) a non-blank device without --force, a cache holding dirty data even with --force
// unless --discard-dirty, and a device another process has open.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Cache } from '../../src/cache/cache.js';
import { FileDevice } from '../../src/device/file_device.js';
import { MiB } from '../../src/lib/units.js';
import { patternBytes } from '../helpers/bytes.js';
import { tempDir } from '../helpers/files.js';
import { assertOneLineError, runCli } from '../helpers/pcache.js';

interface Files {
  readonly dir: string;
  readonly cache: string;
  readonly backing: string;
}

function files(t: TestContext, cacheBytes = 8 * MiB, backingBytes = 16 * MiB): Files {
  const dir = tempDir(t);
  const cache = path.join(dir, 'cache.img');
  const backing = path.join(dir, 'backing.img');
  fs.writeFileSync(backing, Buffer.alloc(backingBytes));
  fs.writeFileSync(cache, '');
  fs.truncateSync(cache, cacheBytes);
  return { dir, cache, backing };
}

async function format(f: Files, ...extra: string[]): Promise<Awaited<ReturnType<typeof runCli>>> {
  return runCli(['format', '--cache', f.cache, '--backing', f.backing, '--segment-size', '1M', ...extra]);
}

async function cacheUuid(cache: string): Promise<string> {
  const result = await runCli(['status', '--cache', cache, '--json']);
  assert.equal(result.code, 0, result.stderr);
  return (JSON.parse(result.stdout) as { cache: { cacheUuid: string } }).cache.cacheUuid;
}

/** Writes `bytes` at `offset` through the engine and leaves them dirty (flushed, never written back). */
async function leaveDirty(f: Files, bytes: Buffer, offset: number): Promise<void> {
  const cacheDevice = await FileDevice.open(f.cache, { blocking: true });
  const backingDevice = await FileDevice.open(f.backing);
  const cache = await Cache.open({ cacheDevice, backingDevice, background: false });
  await cache.write(bytes, offset);
  await cache.flush();
  assert.equal(cache.status().dirtyBytes, bytes.length);
  await cache.close();
  await cacheDevice.close();
  await backingDevice.close();
}

describe('pcache format', () => {
  it('formats a blank device with the requested geometry and settings', async (t) => {
    const f = files(t);
    const result = await format(f, '--gc-percent', '40', '--data-crc');
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /^formatted .*cache\.img \(8 MiB\): 7 segments of 1 MiB, gc_percent 40, data CRC, for backing device .*backing\.img \(16 MiB\); cache uuid [0-9a-f-]{36}\n$/);
    const status = await runCli(['status', '--cache', f.cache, '--json']);
    assert.equal(status.code, 0, status.stderr);
    const cache = (JSON.parse(status.stdout) as { cache: Record<string, unknown> }).cache;
    assert.deepEqual([cache.segTotal, cache.gcPercent, cache.dataCrc, cache.segmentSizeBytes, cache.backingSizeBytes, cache.dirtyBytes],
      [7, 40, true, MiB, 16 * MiB, 0]);
  });

  it('creates a missing cache file with --cache-size, and refuses a missing one without it', async (t) => {
    const f = files(t);
    const missing = { ...f, cache: path.join(f.dir, 'new.img') };
    assertOneLineError(await format(missing), 1, /new\.img does not exist \(give --cache-size SIZE to create it\)/);
    assert.equal(fs.existsSync(missing.cache), false);
    // A missing backing device is refused before the cache file is created.
    const noBacking = { ...missing, backing: path.join(f.dir, 'no-such-backing.img') };
    assertOneLineError(await format(noBacking, '--cache-size', '6M'), 1, /no-such-backing\.img/);
    assert.equal(fs.existsSync(missing.cache), false, 'no cache file is left behind');
    const created = await format(missing, '--cache-size', '6M');
    assert.equal(created.code, 0, created.stderr);
    assert.equal(fs.statSync(missing.cache).size, 6 * MiB);
    // A format that fails after creating the file (a segment size the device cannot hold) removes it again.
    const tooSmall = { ...f, cache: path.join(f.dir, 'small.img') };
    const refused = await runCli(['format', '--cache', tooSmall.cache, '--backing', f.backing, '--cache-size', '2M', '--segment-size', '4M']);
    assertOneLineError(refused, 1, /holds 0 segments of 4194304 bytes; at least \d+ are needed/);
    assert.equal(fs.existsSync(tooSmall.cache), false, 'the file this failed format created is gone');
  });

  it('refuses a non-blank device that is not a cache without --force, leaving it byte for byte unchanged', async (t) => {
    const f = files(t);
    const foreign = patternBytes(8 * MiB, 5);
    fs.writeFileSync(f.cache, foreign);
    assertOneLineError(await format(f), 1, /cache\.img is not blank and is not a pcache cache; refusing to overwrite it \(add --force/);
    assert.ok(fs.readFileSync(f.cache).equals(foreign), 'the foreign device is unchanged');
    const forced = await format(f, '--force');
    assert.equal(forced.code, 0, forced.stderr);
    assert.equal(await runCli(['check', '--cache', f.cache]).then((r) => r.code), 0);
  });

  it('refuses to replace a cache without --force, and replaces a clean one with it', async (t) => {
    const f = files(t);
    assert.equal((await format(f)).code, 0);
    const before = fs.readFileSync(f.cache);
    const uuid = await cacheUuid(f.cache);
    assertOneLineError(await format(f), 1, /already holds a pcache cache; refusing to overwrite it \(add --force to replace it\)/);
    assert.ok(fs.readFileSync(f.cache).equals(before), 'unchanged');
    const forced = await format(f, '--force');
    assert.equal(forced.code, 0, forced.stderr);
    assert.notEqual(await cacheUuid(f.cache), uuid, 'a new cache');
  });

  it('never lets --force discard dirty data: it says how many bytes and to drain, unless --discard-dirty', async (t) => {
    const f = files(t);
    assert.equal((await format(f)).code, 0);
    await leaveDirty(f, patternBytes(12_288, 9), 64 * 1024);
    const before = fs.readFileSync(f.cache);
    const refused = await format(f, '--force');
    assertOneLineError(refused, 1, /holds 12288 bytes \(12 KiB\) of dirty data not yet written back to its backing device; drain it first .*--discard-dirty/);
    assert.ok(fs.readFileSync(f.cache).equals(before), 'the dirty cache is unchanged');
    const offline = await runCli(['status', '--cache', f.cache, '--json']);
    assert.equal((JSON.parse(offline.stdout) as { cache: { dirtyBytes: number } }).cache.dirtyBytes, 12_288);
    const discarded = await format(f, '--force', '--discard-dirty');
    assert.equal(discarded.code, 0, discarded.stderr);
    const after = await runCli(['status', '--cache', f.cache, '--json']);
    assert.equal((JSON.parse(after.stdout) as { cache: { dirtyBytes: number } }).cache.dirtyBytes, 0);
  });

  it('refuses a device that another process has open, even with --force', async (t) => {
    const f = files(t);
    const fd = fs.openSync(f.cache, 'r');
    t.after(() => { fs.closeSync(fd); });
    assertOneLineError(await format(f, '--force'), 1, new RegExp(`refusing to format .*cache\\.img: it is open in .*\\(pid ${process.pid}\\)`));
    assert.ok(fs.readFileSync(f.cache).every((byte) => byte === 0), 'still blank');
  });

  it('refuses a cache device too small for four segments, naming the size it needs and what smaller segments give', async (t) => {
    const f = files(t, 3 * MiB);
    assertOneLineError(await format(f), 1, /holds 2 segments of 1048576 bytes; at least 4 are needed: use a cache device of at least 4218880 bytes/);
    const g = files(t, 40 * MiB);
    assertOneLineError(await runCli(['format', '--cache', g.cache, '--backing', g.backing, '--segment-size', '16M']), 1, /holds 2 segments of 16777216 bytes.*or smaller segments \(--segment-size 1M gives 39\)/);
    // Without --segment-size, a small device gets segments small enough (segmentSizeDefaultFor).
    const formatted = await runCli(['format', '--cache', g.cache, '--backing', g.backing]);
    assert.equal(formatted.code, 0, formatted.stderr);
    assert.match(formatted.stdout, /39 segments of 1 MiB/);
  });

  it('recognises a dirty cache whose superblocks are both garbage, refusing --force; check --repair mends one damaged copy', async (t) => {
    const f = files(t);
    assert.equal((await format(f)).code, 0);
    await leaveDirty(f, patternBytes(8192, 5), 0);
    // One superblock copy lost: everything still reads, check warns, --repair restores it.
    const size = fs.statSync(f.cache).size;
    const garbage = (tag: number, at: number): void => {
      const fd = fs.openSync(f.cache, 'r+');
      fs.writeSync(fd, patternBytes(4096, tag), 0, 4096, at);
      fs.closeSync(fd);
    };
    garbage(77, 4096);
    const checked = await runCli(['check', '--cache', f.cache]);
    assert.equal(checked.code, 0, checked.stderr);
    assert.match(checked.stdout, /warning: superblock copy 0: .*\(the other copy is used\)/);
    const repaired = await runCli(['check', '--cache', f.cache, '--repair']);
    assert.equal(repaired.code, 0, repaired.stderr);
    assert.match(repaired.stdout, /repaired: superblock copy 0/);
    assert.match(repaired.stdout, /ok: no problems \(0 warnings\)/);
    // Both copies lost: not a superblock anywhere, but the other records say what this was.
    garbage(78, 4096);
    garbage(79, Math.floor(size / 4096) * 4096 - 4096);
    const before = fs.readFileSync(f.cache);
    assertOneLineError(await format(f), 1, /holds a damaged pcache cache \(no readable superblock; found .*cache_info copy 0/);
    assertOneLineError(await format(f, '--force'), 1, /damaged pcache cache .* so it may hold dirty data; `pcache check` explains; add --discard-dirty/);
    const served = await runCli(['serve', '--cache', f.cache, '--backing', f.backing, '--socket', path.join(f.dir, 's.sock')]);
    assertOneLineError(served, 1, /no valid pcache superblock, but it holds pcache records .*a damaged pcache cache/);
    assert.ok(fs.readFileSync(f.cache).equals(before), 'nothing was written');
    const discarded = await format(f, '--force', '--discard-dirty');
    assert.equal(discarded.code, 0, discarded.stderr);
  });

  it('says that --cache-size does not resize an existing cache file', async (t) => {
    const f = files(t);
    const result = await format(f, '--cache-size', '64M');
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stderr, /--cache-size 64 MiB is not applied: .*cache\.img already exists with 8 MiB, and pcache never resizes an existing device/);
    assert.equal(fs.statSync(f.cache).size, 8 * MiB);
  });
});
