// Replays one crash-harness failure of a toy target from the spec a run printed:
//   npm run build && PCACHE_SIM_REPLAY='target=… mode=… seed=… [workload=…]' node --test dist/test/sim/replay.test.js
// The replayed run prints every violation with its details and fails if any remains. Without
// the variable, the file proves the mechanism: a mutant's printed command reproduces it.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runExhaustive } from '../../sim/harness.js';
import { replaySpecOf, replayToy, toyExhaustiveShape, toyTarget } from './toy_targets.js';

const requested = process.env['PCACHE_SIM_REPLAY'];

describe('crash harness replay', () => {
  if (requested !== undefined) {
    it(`replays ${requested}`, async () => {
      const report = await replayToy(requested, (line) => console.log(line));
      assert.deepEqual(report.violations.map((violation) => violation.kind), []);
    });
    return;
  }

  it('reproduces a failure from the command the failing run printed', async () => {
    const name = 'write-through.flushWithoutSync';
    const lines: string[] = [];
    const original = await runExhaustive({ ...toyExhaustiveShape, name, target: toyTarget(name), opsMax: 2, violationsMax: 1, log: (line) => lines.push(line) });
    const first = original.violations[0];
    assert.ok(first !== undefined);
    assert.ok(lines.some((line) => line.includes(first.replay)), 'the command is printed');
    const replayed = await replayToy(replaySpecOf(first.replay), () => undefined);
    assert.equal(replayed.workloads, 1);
    assert.deepEqual(replayed.violations[0], first);
  });
});
