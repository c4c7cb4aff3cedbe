// Crash consistency of the engine, exhaustive tier: every workload of one to three operations
// (write, FUA write, flush, trim, write-zeroes, writeback step, GC step) over two blocks and two
// payload values, a crash at every device-operation boundary, the prefix, omit-one and
// torn-last states of both devices, crashes during recovery, the oracle, the structural
// checker, and the epoch-prefix property of the backing device. This file takes half of the
// three-operation workloads (more than 100,000 crash states); crash_more.test.ts the rest of the tier.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { exhaustive } from './crash_suite.js';

describe('crash consistency, exhaustive', () => {
  it('every 1-3 operation workload (shard 1 of 2): no violations in more than 100,000 crash states', async () => {
    // Without garbage states: they add a sixth to this tier's states, more than its time budget
    // allows; crash_more.test.ts and crash_aged.test.ts run them.
    const report = await exhaustive({ gcPercent: 0 }, { opsMax: 3, shard: { index: 0, count: 2 }, garbage: false, log: (line) => { console.error(line); } });
    assert.equal(report.violationsTotal, 0, 'violations were found; the replay commands are printed above');
    assert.ok(report.statesExplored >= 100_000, `explored ${report.statesExplored} crash states`);
    console.error(`crash tier (exhaustive): ${report.statesExplored} crash states explored, ${report.violationsTotal} violations`);
  });
});
