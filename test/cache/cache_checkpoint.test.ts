// Checkpoints (Cache.checkpoint, the engine side of `pcache checkpoint`): the backing device is
// brought to what the log held durably at the call, and held there while the callback runs;
// clients keep writing into the cache meanwhile; writeback resumes afterwards.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { eagerWriteback } from '../../src/cache/cache.js';
import { MiB } from '../../src/lib/units.js';
import { openRig, pattern, readBytes } from '../helpers/cache_fixture.js';
import { isCode } from '../helpers/errors.js';

const S = 512;

async function backingBytes(device: { read(target: Uint8Array, offsetBytes: number): Promise<void> }, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
  const out = Buffer.alloc(lengthBytes);
  await device.read(out, offsetBytes);
  return out;
}

describe('checkpoint', () => {
  for (const background of [false, true]) {
    it(`holds the backing device at every flushed write while clients go on writing (background ${background ? 'on' : 'off'})`, async () => {
      const rig = await openRig({ background });
      const { cache, backingDevice } = rig;
      if (background) cache.setTuning({ ...eagerWriteback, writebackStartPercent: 100, writebackStopPercent: 0, writebackIdleMs: 3_600_000, writebackMaxAgeMs: 3_600_000 });
      const flushed = pattern(1, 0, 64 * S);
      await cache.write(flushed, 0);
      await cache.flush();
      const unflushed = pattern(2, MiB, 64 * S);
      await cache.write(unflushed, MiB); // sits in the open kset: not durable, not in the checkpoint
      assert.ok((await backingBytes(backingDevice, 0, 64 * S)).every((byte) => byte === 0), 'nothing written back before the checkpoint');

      const during = pattern(3, 2 * MiB, 64 * S);
      const point = await cache.checkpoint(async (held) => {
        assert.ok((await backingBytes(backingDevice, 0, 64 * S)).equals(flushed), 'the flushed write is on the backing device');
        assert.ok((await backingBytes(backingDevice, MiB, 64 * S)).every((byte) => byte === 0), 'the write not yet durable is not');
        // A client writes and flushes while the checkpoint holds: answered at once, into the cache.
        await cache.write(during, 2 * MiB);
        await cache.flush();
        assert.equal(await cache.writebackStep(), false, 'no writeback round runs while held');
        assert.ok((await backingBytes(backingDevice, 2 * MiB, 64 * S)).every((byte) => byte === 0), 'the backing device did not move');
        assert.ok((await readBytes(cache, 2 * MiB, 64 * S)).equals(during), 'clients read their writes from the cache');
        return held;
      });
      assert.ok(point.seq > 0 && point.lsn > 0, `the point names the log position: ${JSON.stringify(point)}`);
      await cache.drain();
      assert.ok((await backingBytes(backingDevice, MiB, 64 * S)).equals(unflushed), 'writeback resumes after the checkpoint');
      assert.ok((await backingBytes(backingDevice, 2 * MiB, 64 * S)).equals(during));
      assert.deepEqual(await cache.check(), []);
      await cache.close();
    });
  }

  it('gives up when the signal fires before the backing device gets there, and releases writeback', async () => {
    const rig = await openRig({ background: false });
    const { cache, backingDevice } = rig;
    await cache.write(pattern(1, 0, 64 * S), 0);
    await cache.flush();
    const controller = new AbortController();
    controller.abort();
    let ran = false;
    await assert.rejects(cache.checkpoint(() => {
      ran = true;
      return Promise.resolve();
    }, controller.signal), isCode('ETIMEDOUT'));
    assert.equal(ran, false, 'the callback never runs');
    await cache.drain();
    assert.ok((await backingBytes(backingDevice, 0, 64 * S)).equals(pattern(1, 0, 64 * S)), 'writeback is not held afterwards');
    await cache.close();
  });

  it('releases writeback when the callback fails', async () => {
    const rig = await openRig({ background: false });
    const { cache, backingDevice } = rig;
    await cache.write(pattern(1, 0, 64 * S), 0);
    await cache.flush();
    await assert.rejects(cache.checkpoint(() => Promise.reject(new Error('snapshot failed'))), /snapshot failed/);
    await cache.write(pattern(2, MiB, 64 * S), MiB);
    await cache.drain();
    assert.ok((await backingBytes(backingDevice, MiB, 64 * S)).equals(pattern(2, MiB, 64 * S)));
    await cache.close();
  });

  it('runs checkpoints one at a time: a second one starts once the first is released', async () => {
    const rig = await openRig({ background: false });
    const { cache } = rig;
    await cache.write(pattern(1, 0, 64 * S), 0);
    await cache.flush();
    const order: string[] = [];
    let releaseFirst: () => void = () => undefined;
    const first = cache.checkpoint(async () => {
      order.push('first held');
      await new Promise<void>((resolve) => { releaseFirst = resolve; });
      order.push('first released');
    });
    const second = cache.checkpoint(() => {
      order.push('second held');
      return Promise.resolve();
    });
    while (order.length === 0) await new Promise((resolve) => setImmediate(resolve));
    await new Promise((resolve) => setImmediate(resolve));
    assert.deepEqual(order, ['first held']);
    releaseFirst();
    await Promise.all([first, second]);
    assert.deepEqual(order, ['first held', 'first released', 'second held']);
    await cache.close();
  });
});
