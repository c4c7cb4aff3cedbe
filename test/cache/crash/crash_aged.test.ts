// Crash consistency from caches with history (aged_bases.ts), where the bugs of issue 19 hid:
// every one-operation workload from the `stranded` base (a crash lost the LAST kset into a
// segment that holds a kset of this log with the seq it expects next, and the mirror of that
// segment's generation), with the cache device's metadata sectors left as garbage where a
// write was in flight; and a kset of two sectors written over that stale one, torn at the
// sector boundary. Both run with the whole tier's checks (oracle, structural checker right
// after recovery and after reading, stability, crashes during recovery, drain).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { exhaustive } from './crash_suite.js';

const log = (line: string): void => { console.error(line); };

/** Fourteen trims and a flush: fourteen ZERO keys in one kset of two sectors, and no data segment taken first. */
const twoSectorKsetWorkload = `${Array.from({ length: 14 }, (_, index) => `T${index % 2}`).join(',')},flush`;

describe('crash consistency from caches with history', () => {
  it('every 1-operation workload from a stranded log, metadata sectors garbage in flight: no violations', async () => {
    const report = await exhaustive({ gcPercent: 0 }, { opsMax: 1, base: 'stranded', log });
    assert.equal(report.violationsTotal, 0, 'violations were found; the replay commands are printed above');
    assert.ok(report.statesExplored > 1_000, `explored ${report.statesExplored} crash states`);
  });

  it('a two-sector kset written over the stranded one, torn at every sector: no violations', async () => {
    const report = await exhaustive({ gcPercent: 0 }, { opsMax: 1, base: 'stranded', workloads: [twoSectorKsetWorkload], log });
    assert.equal(report.violationsTotal, 0, 'violations were found; the replay commands are printed above');
    assert.ok(report.statesExplored > 10, `explored ${report.statesExplored} crash states`);
  });
});
