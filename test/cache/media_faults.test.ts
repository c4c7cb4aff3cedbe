// Media faults: one 4 KiB block of the cache device overwritten with garbage, for every block
// that holds metadata and for every block of the log, on a cache holding flushed dirty data.
//
// What must hold, block by block (issue: "never lose dirty data, never serve stale data"):
// - a metadata block: every record has its other copy in another block, so the cache opens and
//   serves every byte as written; `check` warns about the damaged copy and `check --repair`
//   (repairCacheDevice) restores it; a drain then leaves the backing device equal to the model;
// - a block of the log: the log was durable past it, so the cache refuses to open (CORRUPT,
//   reason log-damaged) instead of silently dropping acknowledged writes; the check names it;
// - a block of cached data (DATA_CRC): reads that touch it fail with EIO, every other read
//   returns what was written — never wrong bytes;
// - in every case the device still shows it is a pcache cache (probe, or the records that
//   `format --force` looks for when no superblock is readable).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Cache } from '../../src/cache/cache.js';
import { checkCacheDevice } from '../../src/cache/cache_check.js';
import { pcacheRecordsFound, probeDevice } from '../../src/cache/cache_metadata.js';
import { repairCacheDevice } from '../../src/cache/cache_repair.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { isPcacheError } from '../../src/lib/errors.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { MiB } from '../../src/lib/units.js';
import { blockBytes, lastBlockOffsetBytes, segmentDataOffsetBytes, segmentOffsetBytes } from '../../src/ondisk/layout.js';
import { Prng } from '../../sim/prng.js';
import { cacheBytesFor, pattern } from '../helpers/cache_fixture.js';

const segments = 8;
/** 4 KiB writes: enough keys for a log of several 4 KiB blocks, enough data for several segments. */
const writesMax = 900;
const writeBytes = 4096;
const backingBytes = 16 * MiB;

interface Image {
  readonly cache: Uint8Array;
  readonly backing: Uint8Array;
  /** What every block of the backing device must read as. */
  readonly model: Buffer;
  /** Byte ranges of the cache device: the log's ksets, and data extents. */
  readonly logBlocks: number[];
  readonly dataBlocks: number[];
}

/** A cache with flushed dirty data spread over several data segments and a log of many ksets. */
async function makeImage(): Promise<Image> {
  const cacheDevice = new MemoryDevice(cacheBytesFor(segments));
  const backingDevice = new MemoryDevice(backingBytes);
  const model = Buffer.alloc(backingBytes);
  const cache = await Cache.open({
    cacheDevice,
    backingDevice,
    formatIfBlank: { segmentSizeBytes: MiB, dataCrc: true, cacheUuid: new Uint8Array(16).fill(9), formatTimeMs: 0 },
    background: false,
    timers: new ManualTimers(),
  });
  const prng = new Prng(19);
  for (let index = 0; index < writesMax; index++) {
    const block = prng.nextInt(backingBytes / writeBytes);
    const data = pattern(index + 1, block * writeBytes, writeBytes);
    await cache.write(data, block * writeBytes);
    data.copy(model, block * writeBytes);
    if (index % 5 === 4) await cache.flush();
  }
  await cache.flush();
  const logEnd = cache.internals.log.durableHead;
  assert.equal(logEnd.segment, 0, 'the whole log fits its first segment');
  const logBlocks: number[] = [];
  for (let at = 0; at < logEnd.offsetBytes; at += blockBytes) logBlocks.push(segmentOffsetBytes(0, MiB) + segmentDataOffsetBytes + at);
  const dataBlocks: number[] = [];
  const index = cache.internals.ctx.index;
  for (const subtree of index.all()) {
    for (let row = 0; row < subtree.count && dataBlocks.length < 12; row += 7) {
      const at = segmentOffsetBytes(subtree.segment(row), MiB) + segmentDataOffsetBytes + subtree.segmentOffset(row);
      dataBlocks.push(Math.floor(at / blockBytes) * blockBytes);
    }
  }
  await cache.close(); // a clean stop: the flushed data stays dirty in the cache, not written back
  return { cache: cacheDevice.bytes.slice(), backing: backingDevice.bytes.slice(), model, logBlocks, dataBlocks };
}

/** Every metadata block of the device: the header blocks, the superblock's second copy, and each segment's three. */
function metadataBlocks(deviceBytes: number): number[] {
  const blocks = [0, 4096, 8192, 12288, 16384, lastBlockOffsetBytes(deviceBytes)];
  for (let segment = 0; segment < segments; segment++) {
    const start = segmentOffsetBytes(segment, MiB);
    blocks.push(start, start + 4096, start + 8192);
  }
  return blocks;
}

function damaged(image: Image, block: number, seed: number): { cacheDevice: MemoryDevice; backingDevice: MemoryDevice } {
  const bytes = image.cache.slice();
  const prng = new Prng(seed);
  for (let at = block; at < block + blockBytes; at++) bytes[at] = prng.nextInt(256);
  return { cacheDevice: new MemoryDevice(bytes), backingDevice: new MemoryDevice(image.backing.slice()) };
}

async function open(devices: { cacheDevice: MemoryDevice; backingDevice: MemoryDevice }): Promise<Cache> {
  return Cache.open({ ...devices, background: false, timers: new ManualTimers() });
}

/** Reads the whole backing range through the cache in 32 KiB pieces; returns the pieces that failed with EIO. */
async function readAll(cache: Cache, model: Buffer): Promise<{ eio: number; wrong: number[] }> {
  let eio = 0;
  const wrong: number[] = [];
  const piece = new Uint8Array(32768);
  for (let at = 0; at < backingBytes; at += piece.length) {
    try {
      const io = cache.read(piece, at);
      if (io !== undefined) await io;
    } catch (error) {
      if (isPcacheError(error) && error.code === 'EIO') {
        eio++;
        continue;
      }
      throw error;
    }
    if (!model.subarray(at, at + piece.length).equals(piece)) wrong.push(at);
  }
  return { eio, wrong };
}

async function stillRecognised(device: MemoryDevice): Promise<void> {
  const contents = await probeDevice(device);
  if (contents === 'pcache') return;
  assert.notEqual(contents, 'blank');
  assert.ok((await pcacheRecordsFound(device)).length > 0, 'format --force would take it for something foreign');
}

describe('media faults: one bad 4 KiB block', () => {
  it('any one metadata block: served intact, check warns, repair restores the copy, drain writes everything back', async () => {
    const image = await makeImage();
    for (const [n, block] of metadataBlocks(image.cache.length).entries()) {
      const devices = damaged(image, block, 1000 + n);
      await stillRecognised(devices.cacheDevice);
      const report = await checkCacheDevice(devices.cacheDevice);
      assert.deepEqual(report.problems, [], `block ${block}`);
      assert.ok(report.warnings.some((w) => /other copy is used/.test(w)), `block ${block}: ${report.warnings.join('; ')}`);
      const repairedDevices = damaged(image, block, 1000 + n);
      assert.ok((await repairCacheDevice(repairedDevices.cacheDevice)).length > 0, `block ${block}: something was repaired`);
      const after = await checkCacheDevice(repairedDevices.cacheDevice);
      assert.deepEqual(after.warnings.filter((w) => /other copy is used/.test(w)), [], `block ${block}: repaired`);
      const cache = await open(devices);
      assert.deepEqual(await readAll(cache, image.model), { eio: 0, wrong: [] }, `block ${block}`);
      await cache.drain();
      assert.ok(image.model.equals(devices.backingDevice.bytes), `block ${block}: the backing device holds every write`);
      await cache.close();
    }
  });

  it('any one block of the log: refused as damaged, never opened short', async () => {
    const image = await makeImage();
    assert.ok(image.logBlocks.length >= 4, 'the log spans several blocks');
    for (const [n, block] of image.logBlocks.entries()) {
      const devices = damaged(image, block, 2000 + n);
      await stillRecognised(devices.cacheDevice);
      await assert.rejects(() => open(devices), (error: unknown) => isPcacheError(error) && error.code === 'CORRUPT' && error.reason === 'log-damaged', `block ${block}`);
      const report = await checkCacheDevice(devices.cacheDevice);
      assert.ok(report.problems.some((p) => /the log is damaged/.test(p)), `block ${block}: ${report.problems.join('; ')}`);
    }
  });

  it('a damaged log served with the loss accepted: the damage is retired and the next open is clean', async () => {
    const image = await makeImage();
    const block = image.logBlocks[1];
    assert.ok(block !== undefined);
    const devices = damaged(image, block, 3000);
    const cache = await Cache.open({ ...devices, background: false, timers: new ManualTimers(), acceptLogLoss: true });
    assert.ok(cache.replayResult.damage !== undefined);
    const read = await readAll(cache, image.model);
    assert.equal(read.eio, 0);
    await cache.write(pattern(777, 0, 32768), 0);
    await cache.close();
    const again = await open(devices);
    assert.equal(again.replayResult.damage, undefined, 'the ksets beyond the damage are not found again');
    assert.deepEqual(await again.check(), []);
    await again.close();
  });

  it('any one block of cached data: EIO for what it holds, the right bytes everywhere else', async () => {
    const image = await makeImage();
    assert.ok(image.dataBlocks.length >= 6);
    for (const [n, block] of image.dataBlocks.entries()) {
      const devices = damaged(image, block, 4000 + n);
      const cache = await open(devices);
      const read = await readAll(cache, image.model);
      assert.deepEqual(read.wrong, [], `block ${block}: never wrong bytes`);
      assert.ok(read.eio >= 1, `block ${block}: the damaged extent fails its reads`);
      await cache.close();
    }
  });
});
