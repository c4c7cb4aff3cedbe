// Writeback absorbs overwrites: a range superseded by a newer key after the round's window is
// not written back (the newer key is made durable before dirty_tail passes the older one);
// under strict ordering only within the flush epoch still open, under relaxed ordering across
// epochs; and the writeback_ordering setting is checked.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache, eagerWriteback } from '../../src/cache/cache.js';
import type { WritebackOrdering } from '../../src/cache/cache_tuning.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { MiB } from '../../src/lib/units.js';
import { cacheBytesFor, type DeviceEvent, pattern, readBytes, RecordingDevice } from '../helpers/cache_fixture.js';

const S = 512;
const fua = { fua: true };

async function rig(ordering: WritebackOrdering) {
  const events: DeviceEvent[] = [];
  const cacheDevice = new RecordingDevice(new MemoryDevice(cacheBytesFor(8)), 'cache', events);
  const backingDevice = new RecordingDevice(new MemoryDevice(pattern(0xbb, 0, 32 * MiB)), 'backing', events, { blocking: false });
  const open = (): Promise<Cache> => Cache.open({
    cacheDevice, backingDevice, timers: new ManualTimers(), background: false,
    formatIfBlank: { segmentSizeBytes: MiB, gcPercent: 70 },
    tuning: { ...eagerWriteback, writebackOrdering: ordering },
  });
  const cache = await open();
  events.length = 0;
  const backingWrites = (): number[][] => events.filter((e) => e.device === 'backing' && e.kind === 'write').map((e) => [e.offsetBytes / S, e.lengthBytes / S]);
  return { cache, events, backingDevice, open, backingWrites };
}

describe('writeback absorbs superseded ranges', () => {
  it('strict: within the open epoch, an extent overwritten after the window is skipped, and the newer key is durable before dirty_tail passes it', async () => {
    const r = await rig('strict');
    await r.cache.write(pattern(1, 0, 16 * S), 0, fua); // its kset is durable: the window
    await r.cache.write(pattern(2, 4 * S, 8 * S), 4 * S); // newer, in the open kset, no flush
    assert.equal(await r.cache.writebackStep(), true);
    // Only the parts the newer write left alone reach the backing device.
    assert.deepEqual(r.backingWrites(), [[0, 4], [12, 4]]);
    assert.equal(r.cache.status().counters.writebackSkippedBytes, 8 * S);
    assert.equal(r.cache.status().counters.writebackBackingBytes, 8 * S);
    // A crash now: the newer data was committed by the round, so it is still there.
    r.cache.abandon();
    const reopened = await r.open();
    assert.deepEqual(await readBytes(reopened, 0, 16 * S), Buffer.concat([pattern(1, 0, 4 * S), pattern(2, 4 * S, 8 * S), pattern(1, 12 * S, 4 * S)]));
    await reopened.drain();
    assert.deepEqual(Buffer.from(r.backingDevice.inner.bytes.subarray(0, 16 * S)), Buffer.concat([pattern(1, 0, 4 * S), pattern(2, 4 * S, 8 * S), pattern(1, 12 * S, 4 * S)]));
    await reopened.close();
  });

  it('strict: an extent of a finished epoch is written back even when a later epoch overwrote it', async () => {
    const r = await rig('strict');
    await r.cache.write(pattern(1, 0, 8 * S), 0);
    await r.cache.flush(); // epoch 1 ends: the backing device alone must get it whole
    await r.cache.write(pattern(2, 0, 8 * S), 0);
    assert.equal(await r.cache.writebackStep(), true);
    assert.deepEqual(r.backingWrites(), [[0, 8]]);
    assert.deepEqual(Buffer.from(r.backingDevice.inner.bytes.subarray(0, 8 * S)), pattern(1, 0, 8 * S));
    assert.equal(r.cache.status().counters.writebackSkippedBytes, 0);
    await r.cache.close();
  });

  it('relaxed: an extent overwritten in a later epoch is skipped, and rounds merge across epochs', async () => {
    const r = await rig('relaxed');
    await r.cache.write(pattern(1, 0, 8 * S), 0);
    await r.cache.flush();
    await r.cache.write(pattern(2, 8 * S, 8 * S), 8 * S);
    await r.cache.flush();
    await r.cache.write(pattern(3, 0, 8 * S), 0); // after both epochs, not yet durable
    assert.equal(await r.cache.writebackStep(), true);
    // One round over both epochs: [0, 8) is superseded, [8, 16) is written.
    assert.deepEqual(r.backingWrites(), [[8, 8]]);
    assert.equal(r.cache.status().counters.writebackSkippedBytes, 8 * S);
    r.events.length = 0;
    assert.equal(await r.cache.writebackStep(), true);
    assert.deepEqual(r.backingWrites(), [[0, 8]]);
    assert.deepEqual(Buffer.from(r.backingDevice.inner.bytes.subarray(0, 16 * S)), Buffer.concat([pattern(3, 0, 8 * S), pattern(2, 8 * S, 8 * S)]));
    await r.cache.close();
  });

  it('ZERO keys: data trimmed later is skipped, a trim written over later is skipped too', async () => {
    const r = await rig('strict');
    await r.cache.write(pattern(1, 0, 8 * S), 0, fua);
    await r.cache.trim(16 * S, 8 * S, fua);
    await r.cache.trim(0, 8 * S); // supersedes the data
    await r.cache.write(pattern(4, 16 * S, 8 * S), 16 * S); // supersedes the trim
    assert.equal(await r.cache.writebackStep(), true);
    assert.deepEqual(r.backingWrites(), []);
    assert.equal(r.cache.status().counters.writebackSkippedBytes, 16 * S);
    await r.cache.drain();
    const backing = Buffer.from(r.backingDevice.inner.bytes.subarray(0, 24 * S));
    assert.ok(backing.subarray(0, 8 * S).every((b) => b === 0));
    assert.deepEqual(backing.subarray(16 * S, 24 * S), pattern(4, 16 * S, 8 * S));
    await r.cache.close();
  });

  it('writeback_ordering takes strict or relaxed, and can change at run time', async () => {
    const r = await rig('strict');
    assert.equal(r.cache.tuning.writebackOrdering, 'strict');
    assert.throws(() => r.cache.setTuning({ writebackOrdering: 'loose' as WritebackOrdering }), /writebackOrdering must be strict or relaxed/);
    assert.equal(r.cache.setTuning({ writebackOrdering: 'relaxed' }).writebackOrdering, 'relaxed');
    await r.cache.close();
  });
});
