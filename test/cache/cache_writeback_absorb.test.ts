// Writeback absorbs overwrites: a range superseded by a newer key after the round's window is
// not written back (the newer key is made durable before dirty_tail passes the older one);
// under strict ordering only within the flush epoch still open, under relaxed ordering across
// epochs; and the writeback_ordering setting is checked. Rounds plan from the live index in one
// pass when they may skip, and give the same plan as merging the window in a private index.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache, eagerWriteback } from '../../src/cache/cache.js';
import type { WritebackOrdering } from '../../src/cache/cache_tuning.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { MiB } from '../../src/lib/units.js';
import { cacheBytesFor, type DeviceEvent, pattern, readBytes, RecordingDevice } from '../helpers/cache_fixture.js';
import { planWrites, readWindow, readWindowPlan, type WindowLimits } from '../../src/cache/cache_writeback_plan.js';
import { ksetBytesMax } from '../../src/ondisk/kset.js';
import { Prng } from '../../sim/prng.js';

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

describe('writeback plans from the live index', () => {
  it('keys of one window that supersede each other: only the newest data, as one run, without merging the window', async () => {
    const r = await rig('strict');
    await r.cache.write(pattern(1, 0, 16 * S), 0, fua);
    await r.cache.write(pattern(2, 4 * S, 8 * S), 4 * S, fua); // newer, in the same window
    assert.equal(await r.cache.writebackStep(), true);
    // The older key's front and back and the newer key between them are contiguous: one write.
    assert.deepEqual(r.backingWrites(), [[0, 16]]);
    const expected = Buffer.concat([pattern(1, 0, 4 * S), pattern(2, 4 * S, 8 * S), pattern(1, 12 * S, 4 * S)]);
    assert.deepEqual(Buffer.from(r.backingDevice.inner.bytes.subarray(0, 16 * S)), expected);
    const counters = r.cache.status().counters;
    assert.equal(counters.writebackWindowsMerged, 0);
    assert.equal(counters.writebackSkippedBytes, 8 * S, 'what the newer key superseded in the window counts as skipped');
    assert.equal(counters.writebackBackingBytes, 16 * S);
    await r.cache.close();
  });

  it('merges the window when skipping is not allowed (strict ordering, an epoch ended) or the live index cannot tell (a trim over a trim)', async () => {
    const r = await rig('strict');
    await r.cache.write(pattern(1, 0, 8 * S), 0);
    await r.cache.flush();
    await r.cache.write(pattern(2, 0, 8 * S), 0);
    assert.equal(await r.cache.writebackStep(), true);
    assert.equal(r.cache.status().counters.writebackWindowsMerged, 1);
    assert.deepEqual(Buffer.from(r.backingDevice.inner.bytes.subarray(0, 8 * S)), pattern(1, 0, 8 * S), 'the finished epoch reached the backing device whole');
    await r.cache.drain();
    const merged = r.cache.status().counters.writebackWindowsMerged;
    // Two trims of one range in the open epoch: the live index's ZERO key may be either.
    await r.cache.write(pattern(3, 32 * S, 8 * S), 32 * S, fua);
    await r.cache.trim(32 * S, 8 * S, fua);
    await r.cache.trim(32 * S, 8 * S, fua);
    await r.cache.drain();
    assert.ok(r.cache.status().counters.writebackWindowsMerged > merged);
    assert.ok(r.backingDevice.inner.bytes.subarray(32 * S, 40 * S).every((b) => b === 0));
    await r.cache.close();
  });

  for (const ordering of ['strict', 'relaxed'] as const) {
    it(`${ordering}: random overlapping writes, trims and flushes: every plan from the live index equals the merged plan, and the backing device ends up right`, async () => {
      const r = await rig(ordering);
      const prng = new Prng(ordering === 'strict' ? 7 : 11);
      const rangeSectors = 256;
      const model = Buffer.from(r.backingDevice.inner.bytes.subarray(0, rangeSectors * S));
      const core = r.cache.internals;
      const scratch = new Uint8Array(ksetBytesMax);
      let decided = 0;
      let compared = 0;
      let payload = 10;
      for (let step = 0; step < 600; step++) {
        const choice = prng.nextInt(100);
        const offset = prng.nextInt(rangeSectors - 1);
        const length = 1 + prng.nextInt(Math.min(32, rangeSectors - offset));
        if (choice < 70) {
          const data = pattern(payload++, offset * S, length * S);
          await r.cache.write(data, offset * S, prng.nextInt(4) === 0 ? fua : undefined);
          data.copy(model, offset * S);
        } else if (choice < 78) {
          await r.cache.trim(offset * S, length * S, prng.nextInt(2) === 0 ? fua : undefined);
          model.fill(0, offset * S, (offset + length) * S);
        } else if (choice < 85) {
          await r.cache.flush();
        } else {
          // Plan the window both ways, as a round would, before the round runs.
          const ctx = core.ctx;
          const start = ctx.dirtyTail;
          const limits: WindowLimits = { ksetsMax: 1024, dirtyBytesMax: 64 * MiB, stopAtEpochEnd: ordering === 'strict', endLsn: () => core.log.durableHead.lsn };
          const skipAllowed = (): boolean => ordering === 'relaxed' || core.log.lastEpochEndSeq < start.seq;
          if (skipAllowed()) {
            const fast = await readWindowPlan(ctx, core.log, start, limits, scratch, ctx.index, skipAllowed);
            if (fast !== undefined) {
              decided++;
              const window = await readWindow(ctx, core.log, start, { ...limits, endLsn: () => fast.window.end.lsn }, scratch);
              assert.equal(window.end.lsn, fast.window.end.lsn);
              assert.equal(window.dirtyBytes, fast.window.dirtyBytes);
              const merged = await planWrites(window, ctx.index, skipAllowed, ctx.timers);
              const shape = (parts: typeof merged.parts): number[][] => parts.map((k) => [k.offsetBytes, k.lengthBytes, k.flags, k.segment, k.segmentOffsetBytes, k.crcDeltaBytes]);
              assert.deepEqual(shape(fast.plan.parts), shape(merged.parts), `step ${step}`);
              assert.equal(fast.plan.bytes, merged.bytes);
              compared += fast.plan.parts.length;
            }
          }
          await r.cache.writebackStep();
        }
      }
      await r.cache.drain();
      assert.deepEqual(Buffer.from(r.backingDevice.inner.bytes.subarray(0, rangeSectors * S)), model);
      // Not vacuous: the live index decided many windows, with real parts in them.
      assert.ok(decided >= 10, `the live index decided ${decided} windows`);
      assert.ok(compared >= 50, `${compared} parts compared`);
      await r.cache.close();
    });
  }
});
