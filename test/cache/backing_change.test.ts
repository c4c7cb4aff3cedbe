// The backing device changed behind pcache's back: noticed at start against the fingerprint of
// the last clean stop (clean copies dropped; a cache holding dirty data refuses), dropped on
// request at runtime (invalidate), and a cache detached from its backing device.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Cache } from '../../src/cache/cache.js';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { isPcacheError } from '../../src/lib/errors.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { crc32c } from '../../src/lib/crc32c.js';
import { MiB, writeU32LE } from '../../src/lib/units.js';
import { decodeCacheInfo, encodeCacheInfo, noFingerprint } from '../../src/ondisk/cache_info.js';
import { cacheBytesFor, pattern, readBytes } from '../helpers/cache_fixture.js';

const backingBytes = 16 * MiB;

interface Devices {
  readonly cacheDevice: MemoryDevice;
  readonly backingDevice: MemoryDevice;
}

function devices(): Devices {
  return { cacheDevice: new MemoryDevice(cacheBytesFor(8)), backingDevice: new MemoryDevice(pattern(1, 0, backingBytes)) };
}

function open(d: Devices, extra: { acceptBackingChange?: boolean; readOnly?: boolean } = {}): Promise<Cache> {
  return Cache.open({ ...d, formatIfBlank: { segmentSizeBytes: MiB }, background: false, timers: new ManualTimers(), ...extra });
}

/** A cache holding clean copies of [0, 64 KiB) (read through it) and, optionally, dirty data at 1 MiB. */
async function warmed(d: Devices, dirty: boolean): Promise<void> {
  const cache = await open(d);
  assert.deepEqual(await readBytes(cache, 0, 65536), pattern(1, 0, 65536));
  assert.ok(cache.status().counters.fillsStored > 0, 'the reads left clean copies');
  if (dirty) {
    await cache.write(pattern(2, MiB, 8192), MiB);
    await cache.flush();
  }
  await cache.close();
}

/** Something else writes to the backing device while pcache is stopped. */
function changeBehindPcache(d: Devices): void {
  d.backingDevice.bytes.set(pattern(9, 0, 65536), 0);
}

const refusedAsChanged = (error: unknown): boolean => isPcacheError(error) && error.code === 'FOREIGN' && error.reason === 'backing-changed';

describe('a backing device changed while pcache was stopped', () => {
  it('an unchanged device keeps its clean copies: reads are hits', async () => {
    const d = devices();
    await warmed(d, false);
    const cache = await open(d);
    assert.equal(cache.backingCheck.found, 'same');
    const before = cache.status().counters.readHitBytes;
    assert.deepEqual(await readBytes(cache, 0, 65536), pattern(1, 0, 65536));
    assert.equal(cache.status().counters.readHitBytes - before, 65536);
    await cache.close();
  });

  it('a changed device with a clean cache: the clean copies are dropped, for good, and the new contents are read', async () => {
    const d = devices();
    await warmed(d, false);
    changeBehindPcache(d);
    const cache = await open(d);
    assert.equal(cache.backingCheck.found, 'changed');
    assert.equal(cache.backingCheck.droppedCleanBytes, 65536);
    assert.deepEqual(await readBytes(cache, 0, 65536), pattern(9, 0, 65536), 'never the stale copy');
    cache.abandon(); // a crash: the drop must hold without a clean stop
    const again = await open(d);
    assert.equal(again.backingCheck.found, 'unknown', 'after a crash there is nothing to compare');
    assert.deepEqual(await readBytes(again, 0, 65536), pattern(9, 0, 65536));
    assert.deepEqual(await again.check(), []);
    await again.close();
  });

  it('a changed device with dirty data: refused without a byte written, unless the change is accepted', async () => {
    const d = devices();
    await warmed(d, true);
    changeBehindPcache(d);
    const before = Buffer.from(d.cacheDevice.bytes);
    await assert.rejects(() => open(d), refusedAsChanged);
    assert.ok(before.equals(d.cacheDevice.bytes), 'the refusal wrote nothing');
    const cache = await open(d, { acceptBackingChange: true });
    assert.equal(cache.backingCheck.found, 'changed');
    assert.deepEqual(await readBytes(cache, 0, 65536), pattern(9, 0, 65536), 'the clean copies went');
    assert.deepEqual(await readBytes(cache, MiB, 8192), pattern(2, MiB, 8192), 'the dirty data stayed');
    await cache.drain();
    assert.ok(Buffer.from(d.backingDevice.bytes.subarray(MiB, MiB + 8192)).equals(pattern(2, MiB, 8192)));
    await cache.close();
  });

  it('a declared copy (another identity, accepted) is compared by its contents: a faithful copy keeps the clean copies, a different one loses them', async () => {
    // A device that describes itself, as a file does: a copy always has another description.
    class Described extends MemoryDevice {
      constructor(contents: Uint8Array, readonly name: string) {
        super(contents, { identity: name });
      }
      fingerprint(): Promise<string | undefined> {
        return Promise.resolve(`described:${this.name}`);
      }
    }
    const cacheDevice = new MemoryDevice(cacheBytesFor(8));
    const original = new Described(pattern(1, 0, backingBytes), 'a');
    await warmed({ cacheDevice, backingDevice: original }, true);
    const openCopy = (copy: Described): Promise<Cache> =>
      Cache.open({ cacheDevice, backingDevice: copy, acceptOtherBackingIdentity: true, background: false, timers: new ManualTimers() });

    const faithful = new Described(Buffer.from(original.bytes), 'b');
    const cache = await openCopy(faithful);
    assert.equal(cache.backingCheck.found, 'same');
    const before = cache.status().counters.readHitBytes;
    assert.deepEqual(await readBytes(cache, 0, 65536), pattern(1, 0, 65536));
    assert.equal(cache.status().counters.readHitBytes - before, 65536, 'the clean copies are still hits');
    await cache.close();

    const different = new Described(Buffer.from(faithful.bytes), 'c');
    different.bytes.set(pattern(9, 0, 65536), 0);
    await assert.rejects(() => openCopy(different), refusedAsChanged, 'a copy of other contents with dirty data is refused');
  });

  it('read-only: a changed device is served without its stale copies, and nothing is written', async () => {
    const d = devices();
    await warmed(d, false);
    changeBehindPcache(d);
    const before = Buffer.from(d.cacheDevice.bytes);
    const cache = await open(d, { readOnly: true });
    assert.deepEqual(await readBytes(cache, 0, 65536), pattern(9, 0, 65536));
    await cache.close();
    assert.ok(before.equals(d.cacheDevice.bytes));
  });
});

describe('invalidate and detach', () => {
  it('invalidate drops the clean copies now and after a restart, and keeps dirty data', async () => {
    const d = devices();
    const cache = await open(d);
    await readBytes(cache, 0, 65536);
    await cache.write(pattern(3, MiB, 4096), MiB);
    await cache.flush(); // the clean copies and the dirty write are durable in the log
    d.backingDevice.bytes.set(pattern(7, 0, 65536), 0); // changed while served
    assert.equal(await cache.invalidate(), 65536);
    assert.deepEqual(await readBytes(cache, 0, 65536), pattern(7, 0, 65536));
    assert.deepEqual(await readBytes(cache, MiB, 4096), pattern(3, MiB, 4096));
    cache.abandon(); // a crash right after: the copies read before the drop must not come back
    d.backingDevice.bytes.set(pattern(8, 0, 65536), 0);
    const again = await open(d);
    assert.deepEqual(await readBytes(again, 0, 65536), pattern(8, 0, 65536));
    assert.deepEqual(await readBytes(again, MiB, 4096), pattern(3, MiB, 4096), 'dirty data survives invalidate and a crash');
    assert.deepEqual(await again.check(), []);
    await again.close();
  });

  it('detach writes everything back, closes, and a later start begins with nothing cached whatever happened to the device', async () => {
    const d = devices();
    const cache = await open(d);
    await readBytes(cache, 0, 65536);
    await cache.write(pattern(4, 2 * MiB, 8192), 2 * MiB);
    await cache.detach();
    assert.equal(cache.status().state, 'stopped');
    assert.ok(Buffer.from(d.backingDevice.bytes.subarray(2 * MiB, 2 * MiB + 8192)).equals(pattern(4, 2 * MiB, 8192)), 'written back');
    changeBehindPcache(d); // used without pcache meanwhile
    const again = await open(d);
    assert.equal(again.backingCheck.found, 'changed');
    assert.equal(again.status().dirtyBytes, 0);
    assert.deepEqual(await readBytes(again, 0, 65536), pattern(9, 0, 65536));
    await again.close();
  });
});

describe('cache_info of format version 2', () => {
  it('round-trips the backing state and fingerprint, and refuses an unknown state', () => {
    const fingerprint = Uint8Array.from({ length: 16 }, (_, i) => i * 11);
    const info = { dataCrc: false, initDone: true, gcPercent: 70, segmentCount: 8, firstSegment: 0, backingState: 'clean' as const, backingFingerprint: fingerprint, mode: 'writeback' as const };
    const decoded = decodeCacheInfo(encodeCacheInfo(info, 4, 2), 8, 'cache_info', 2);
    assert.ok(decoded.ok);
    assert.equal(decoded.value.backingState, 'clean');
    assert.deepEqual([...decoded.value.backingFingerprint], [...fingerprint]);
    const record = encodeCacheInfo({ ...info, backingState: 'detached', backingFingerprint: noFingerprint }, 4, 2);
    const detached = decodeCacheInfo(record, 8, 'cache_info', 2);
    assert.ok(detached.ok && detached.value.backingState === 'detached');
    writeU32LE(record, 24, 9);
    writeU32LE(record, 0, crc32c(record.subarray(4)));
    const unknown = decodeCacheInfo(record, 8, 'cache_info', 2);
    assert.ok(!unknown.ok && /unknown backing state 9/.test(unknown.problem));
  });
});
