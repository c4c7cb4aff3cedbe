// Crash consistency of writeback that skips superseded data, under both writeback orderings,
// with workloads made for it (many writes, FUA writes that make ksets durable without ending an
// epoch, few flushes, frequent writeback steps: crash_suite.ts, absorbWeights).
// - strict: every crash state is checked as everywhere else, including that the backing device
//   alone holds a prefix of the flush epochs;
// - relaxed: the same checks but that one (cache and backing together, recovery, stability,
//   the backing device after a drain);
// - relaxed with the backing-alone check forced on: it must find violations, which shows that
//   the two orderings really promise different things and that the check can tell them apart.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomized } from './crash_suite.js';

const log = (line: string): void => { console.error(line); };
const seed = Number(process.env.PCACHE_CRASH_SEED ?? 1);
const run = { seed, runs: 1, segmentsPerRun: 2, opsPerSegment: 200, log };

describe('crash consistency of absorbing writeback', () => {
  it('strict ordering: no violations, the backing device alone included', async () => {
    const report = await randomized({ gcPercent: 0, absorb: true }, run);
    assert.equal(report.violationsTotal, 0, 'violations were found; the replay commands are printed above');
    assert.ok(report.statesExplored > 50);
  });

  it('relaxed ordering: no violations of what it promises', async () => {
    const report = await randomized({ gcPercent: 0, absorb: true, ordering: 'relaxed' }, run);
    assert.equal(report.violationsTotal, 0, 'violations were found; the replay commands are printed above');
    assert.ok(report.statesExplored > 50);
  });

  it('relaxed ordering does not keep the backing device alone a prefix of the epochs', async () => {
    // Whether one seeded run reaches such a state depends on the workload the seed draws; the
    // seeds after it are tried in turn (a bounded, reproducible search), and every violation
    // found must be of that one kind.
    const quiet = (): void => undefined;
    const seedsMax = 8;
    const kinds: string[] = [];
    let found = 0;
    for (let tried = 0; tried < seedsMax && found === 0; tried++) {
      const report = await randomized({ gcPercent: 0, absorb: true, ordering: 'relaxed', backingAloneCheck: true }, { ...run, seed: seed + tried, log: quiet });
      found = report.violationsTotal;
      kinds.push(...report.violations.map((violation) => violation.kind));
    }
    assert.ok(found > 0, `relaxed ordering was expected to leave the backing device alone out of epoch order within ${seedsMax} seeds from ${seed}`);
    assert.ok(kinds.every((kind) => kind === 'epoch-backing'), kinds.join(', '));
  });
});
