import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { backgroundSliceMs, ManualTimers, realTimers } from '../../src/lib/timers.js';

/** Keeps the thread busy for `ms` (background work standing in for a slice's worth of copies). */
function spin(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end) { /* busy */ }
}

/** Starts each test in a fresh turn, so no slice from earlier work is open. */
function freshTurn(): Promise<void> {
  return new Promise((resolve) => { setImmediate(resolve); });
}

describe('background pacing (Timers.pace)', () => {
  it('lets background work go on without an await until the turn\'s slice is spent', async () => {
    // A loaded machine can take the CPU from this thread between two calls for longer than a
    // slice (a clean-clone run of the whole suite once did): then the second call rightly
    // defers, and says nothing about a slice not yet spent. So turns are tried until one runs
    // both calls within a slice, and in that one the second call must not defer.
    let within = false;
    for (let attempt = 0; attempt < 50 && !within; attempt++) {
      await freshTurn();
      const startMs = performance.now();
      assert.equal(realTimers.pace(), undefined, 'the first piece of a turn starts the slice');
      const second = realTimers.pace();
      if (performance.now() - startMs < backgroundSliceMs) {
        assert.equal(second, undefined, 'the slice is not spent yet');
        within = true;
      } else if (second !== undefined) {
        await second;
      }
    }
    assert.ok(within, 'some turn ran two calls within one slice');
    spin(backgroundSliceMs * 2);
    const deferred = realTimers.pace();
    assert.notEqual(deferred, undefined, 'a spent slice defers the next piece');
    await deferred;
  });

  it('defers spent work behind what was already queued, then gives it a fresh slice', async () => {
    await freshTurn();
    const order: string[] = [];
    realTimers.pace();
    spin(backgroundSliceMs * 2);
    setImmediate(() => { order.push('queued before'); });
    const deferred = realTimers.pace();
    assert.ok(deferred !== undefined);
    await deferred;
    order.push('deferred work');
    assert.deepEqual(order, ['queued before', 'deferred work']);
    assert.equal(realTimers.pace(), undefined, 'resumed work starts a fresh slice');
  });

  it('never defers under manual timers (tests and the simulator stay deterministic)', () => {
    const timers = new ManualTimers();
    assert.equal(timers.pace(), undefined);
    spin(backgroundSliceMs * 2);
    assert.equal(timers.pace(), undefined);
  });
});
