// Status: dm-pcache's nine fields and the counters dm-pcache lacks.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { dmStatusLine } from '../../src/cache/cache.js';
import { MiB } from '../../src/lib/units.js';
import { openRig, pattern, readBytes } from '../helpers/cache_fixture.js';

describe('status', () => {
  it("reports dm-pcache's nine fields in dm-pcache's order and format", async () => {
    const rig = await openRig({ segments: 8, format: { gcPercent: 60, dataCrc: true } });
    const fresh = rig.cache.status();
    // sb_flags, seg_total, cache_segs, segs_used (the log segment), gc_percent,
    // cache_flags (DATA_CRC | INIT_DONE | gc_percent << 6), key_head, dirty_tail, key_tail.
    assert.equal(dmStatusLine(fresh), `0 8 8 1 60 ${(0b11 | (60 << 6)).toString(16)} 0:0 0:0 0:0`);
    await rig.cache.write(pattern(1, 0, 8192), 0);
    await rig.cache.flush();
    const written = rig.cache.status();
    assert.equal(written.segsUsed, 2, 'a data segment joined the log segment');
    assert.equal(written.keyHead, '0:80', 'one kset of one key: a 40-byte header + 40');
    assert.equal(written.dirtyTail, '0:0');
    await rig.cache.drain();
    assert.equal(rig.cache.status().dirtyTail, '0:80');
    assert.equal(rig.cache.status().keyTail, '0:0', 'GC has not run (below gc_percent)');
  });

  it('counts hits and misses (requests and bytes), dirty bytes, writeback and GC progress, and errors', async () => {
    const rig = await openRig({ segments: 8, format: { gcPercent: 0 } });
    const { cache } = rig;
    await cache.write(pattern(1, 0, 16384), 0);
    await cache.writeZeroes(MiB, 8192);
    let counters = cache.status().counters;
    assert.equal(cache.status().dirtyBytes, 16384 + 8192);
    assert.equal(counters.writeRequests, 1);
    assert.equal(counters.writeBytes, 16384);
    assert.equal(counters.zeroRequests, 1);
    await readBytes(cache, 0, 4096); // hit
    await readBytes(cache, 8192, 16384); // half hit, half miss
    await readBytes(cache, 2 * MiB, 4096); // miss
    counters = cache.status().counters;
    assert.equal(counters.readRequests, 3);
    assert.equal(counters.readHitRequests, 1);
    assert.equal(counters.readMissRequests, 2);
    assert.equal(counters.readHitBytes, 4096 + 8192);
    assert.equal(counters.readMissBytes, 8192 + 4096);
    assert.equal(counters.fillsStored, 2, 'both misses were stored');
    // Two more segments of data, so the data head moves on and GC can free whole segments.
    await cache.write(pattern(2, 4 * MiB, 2 * MiB), 4 * MiB);
    await cache.flush();
    await cache.drain();
    counters = cache.status().counters;
    assert.equal(cache.status().dirtyBytes, 0);
    assert.equal(counters.writebackBytes, 16384 + 8192 + 2 * MiB);
    assert.ok(counters.writebackKsets >= 1);
    assert.equal(await cache.gcStep(), true);
    counters = cache.status().counters;
    assert.ok(counters.gcKsets >= 1);
    assert.ok(counters.gcSegmentsFreed >= 1);
    assert.equal(cache.status().reclaimableLogBytes, 0);
    assert.deepEqual(
      [counters.cacheIoErrors, counters.backingReadErrors, counters.backingWriteErrors, counters.dataCrcErrors, counters.writebackErrors, counters.gcErrors],
      [0, 0, 0, 0, 0, 0],
    );
    assert.equal(cache.status().state, 'running');
    assert.ok(cache.status().indexKeys > 0);
  });
});
