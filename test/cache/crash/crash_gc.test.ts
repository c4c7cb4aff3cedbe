// Crash consistency of GC reusing a segment (the `log-full` base, aged_bases.ts): every segment
// in use, the log's head at its segment's end and key_tail still in the oldest log segment. A
// FUA trim's commit finds no free segment and waits; GC's first round frees that oldest segment
// and the commit takes it at once, writing its new generation and then ksets into it. Crashed
// at every boundary with the prefix, omit-one, torn and garbage states: a segment handed out
// before the key_tail that leaves it is durable shows as a crash state that keeps the reused
// segment's new generation and loses key_tail, so replay, starting from the old key_tail,
// finds a kset of an older use of its segment and the log cannot be read (issue 19's mutant
// (d), docs/testing.md). Every recovery here replays two segments of ksets, so the crashes at
// every prefix of recovery's own writes are left out (the other crash files have them).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { exhaustive } from './crash_suite.js';

const log = (line: string): void => { console.error(line); };

describe('crash consistency of GC reusing a segment', () => {
  it('a commit that takes the log segment GC frees on a full cache, crashed at every boundary: no violations', async () => {
    const report = await exhaustive({ gcPercent: 0 }, { opsMax: 1, base: 'log-full', workloads: ['TF0'], recoveryCrashes: false, log });
    assert.equal(report.violationsTotal, 0, 'violations were found; the replay commands are printed above');
    // How many states there are depends on how writeback's rounds interleave with the commit
    // (26 since rounds plan from the live index, 43 when they merged every window first); a
    // handful would mean the workload no longer reaches the reuse. Mutant (d) is caught either way.
    assert.ok(report.statesExplored > 20, `explored ${report.statesExplored} crash states`);
  });
});
