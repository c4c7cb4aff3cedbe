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
    await freshTurn();
    assert.equal(realTimers.pace(), undefined, 'the first piece of a turn starts the slice');
    assert.equal(realTimers.pace(), undefined, 'the slice is not spent yet');
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
