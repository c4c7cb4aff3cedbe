// Crash consistency of the engine, second half of the tier: the other shard of the three-
// operation workloads with data CRC on and the default gc_percent, and seeded randomized runs
// with many requests in flight, I/O completing in random order, and several crash-and-recover
// segments per run.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { exhaustive, randomized } from './crash_suite.js';

const log = (line: string): void => { console.error(line); };

describe('crash consistency, more', () => {
  it('every 1-2 operation workload with data CRC and gc_percent 70: no violations', async () => {
    const report = await exhaustive({ gcPercent: 70, dataCrc: true }, { opsMax: 2, log });
    assert.equal(report.violationsTotal, 0, 'violations were found; the replay commands are printed above');
    assert.ok(report.statesExplored > 5_000);
  });

  it('randomized runs with requests in flight and random completion order: no violations', async () => {
    const seed = Number(process.env.PCACHE_CRASH_SEED ?? 11);
    const report = await randomized({ gcPercent: 0 }, { seed, runs: 2, segmentsPerRun: 2, opsPerSegment: 200, log });
    assert.equal(report.violationsTotal, 0, 'violations were found; the replay commands are printed above');
    assert.ok(report.statesExplored > 100);
    console.error(`crash tier (randomized, seed ${seed}): ${report.statesExplored} crash states explored, ${report.violationsTotal} violations`);
  });

  it('randomized read-heavy runs: fills racing reads of the same blocks, under crashes: no violations', async () => {
    const seed = Number(process.env.PCACHE_CRASH_SEED ?? 21);
    const report = await randomized({ gcPercent: 0 }, { seed, runs: 1, segmentsPerRun: 2, opsPerSegment: 200, profile: 'reads', log });
    assert.equal(report.violationsTotal, 0, 'violations were found; the replay commands are printed above');
    assert.ok(report.statesExplored > 50);
    console.error(`crash tier (randomized reads, seed ${seed}): ${report.statesExplored} crash states explored, ${report.violationsTotal} violations`);
  });
});
