// The line `pcache drain --progress` draws: bar, percentage, bytes left, rate, time left.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { drainProgressLine } from '../../src/cli/drain_cmd.js';
import { MiB } from '../../src/lib/units.js';


describe('drain progress line', () => {
  it('shows the share done, bytes left, the rate and the time left', () => {
    const line = drainProgressLine(400 * MiB, 100 * MiB, 50 * MiB);
    assert.match(line, /^\[#{18}\.{6}\] {3}75% {2}100 MiB left {2}50 MiB\/s {2}2 s left$/);
  });

  it('before a rate is known shows no rate; with no progress it says it is waiting', () => {
    assert.equal(drainProgressLine(10 * MiB, 10 * MiB, undefined), `[${'.'.repeat(24)}]    0%  10 MiB left`);
    assert.match(drainProgressLine(10 * MiB, 10 * MiB, 0), /0 B\/s {2}waiting for the backing device$/);
  });

  it('clamps: nothing to do is 100% done, and more left than the total is 0%', () => {
    assert.match(drainProgressLine(0, 0, 1), /^\[#{24}\] {2}100% {2}0 B left {2}1 B\/s {2}done$/);
    assert.match(drainProgressLine(MiB, 2 * MiB, undefined), /^\[\.{24}\] {4}0%/);
  });

  it('writes long waits in minutes and hours', () => {
    assert.match(drainProgressLine(10_000 * MiB, 9000 * MiB, 10 * MiB), /15 min 0 s left$/);
    assert.match(drainProgressLine(100_000 * MiB, 90_000 * MiB, 10 * MiB), /2 h 30 min left$/);
  });
});
