// Crash-harness tests, proved with toy targets. Goal: correct systems (write-through, a small
// log-structured write-back cache) produce zero violations over every short workload and over
// seeded concurrent runs, while each deliberately broken mutant is caught by the check meant
// for its bug, and the command printed with the failure replays exactly that failure.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { PcacheError } from '../../src/lib/errors.js';
import type { BlockDevice } from '../../src/device/block_device.js';
import { runExhaustive, runRandomized, type CrashTarget, type HarnessReport, type OpenTarget, type ViolationKind } from '../../sim/harness.js';
import { replaySpecOf, replayToy, toyExhaustiveShape, toyRandomizedShape, toyTarget, WriteThroughTarget } from './toy_targets.js';

/** Log lines go to a buffer and are shown only when a test fails. */
function collector(): { lines: string[]; log: (line: string) => void; dump: () => string } {
  const lines: string[] = [];
  return { lines, log: (line) => lines.push(line), dump: () => lines.join('\n') };
}

function assertClean(report: HarnessReport, dump: () => string): void {
  assert.equal(report.violationsTotal, 0, dump());
  assert.ok(report.workloads > 0 && report.crashPoints > report.workloads && report.statesExplored > 0, dump());
  assert.ok(report.recoveries >= 2 * report.statesExplored, 'every state is recovered twice at least');
}

describe('exhaustive harness, correct targets', () => {
  for (const name of ['write-through', 'log-cache']) {
    it(`finds nothing wrong with ${name}: every workload of up to 2 operations`, async () => {
      const out = collector();
      const report = await runExhaustive({ ...toyExhaustiveShape, name, target: toyTarget(name), opsMax: 2, log: out.log });
      // 7 kinds over 2 blocks and 2 values: 15 operations, 15 + 15^2 workloads.
      assert.equal(report.workloads, 15 + 15 * 15);
      assertClean(report, out.dump);
      assert.ok(out.lines.some((line) => line.includes('seed=1') && line.includes('0 violations')), out.dump());
    });

    it(`finds nothing wrong with ${name}: a third of the 3-operation workloads`, async () => {
      const out = collector();
      const report = await runExhaustive({ ...toyExhaustiveShape, name, target: toyTarget(name), opsMax: 3, shard: { index: 1, count: 3 }, log: out.log });
      assert.equal(report.workloads, (15 + 15 ** 2 + 15 ** 3) / 3);
      assertClean(report, out.dump);
    });
  }
});

interface MutantCase {
  readonly name: string;
  readonly kind: ViolationKind;
  /** The first workload that exposes it (enumeration order is fixed). */
  readonly workload: string;
}

const mutants: readonly MutantCase[] = [
  { name: 'write-through.flushWithoutSync', kind: 'oracle', workload: 'W0.1,flush' },
  { name: 'write-through.fuaWithoutSync', kind: 'oracle', workload: 'WF0.1' },
  { name: 'write-through.reorderedFlush', kind: 'live-read', workload: 'W0.1,WF0.2' },
  { name: 'log-cache.flushWithoutSync', kind: 'oracle', workload: 'W0.1,flush' },
  { name: 'log-cache.tailBeforeBackingSync', kind: 'oracle', workload: 'WF0.1,wb' },
  { name: 'log-cache.trustRecordData', kind: 'oracle', workload: 'WF0.1,W0.1' },
  { name: 'log-cache.newestFirstWriteback', kind: 'drain', workload: 'W0.1,W0.2' },
  { name: 'log-cache.batchedWriteback', kind: 'epoch-backing', workload: 'W0.1,flush,W1.1' },
  { name: 'log-cache.recoveryResetFirst', kind: 'unstable', workload: 'W0.1' },
];

describe('exhaustive harness, mutants', () => {
  for (const mutant of mutants) {
    it(`catches ${mutant.name} (${mutant.kind}) and replays it from the printed command`, async () => {
      const out = collector();
      const report = await runExhaustive({ ...toyExhaustiveShape, name: mutant.name, target: toyTarget(mutant.name), opsMax: 3, violationsMax: 1, log: out.log });
      const first = report.violations[0];
      assert.ok(first !== undefined, out.dump());
      assert.equal(first.kind, mutant.kind, out.dump());
      assert.equal(first.workload, mutant.workload, out.dump());
      assert.ok(report.stoppedEarly);
      assert.ok(out.lines.some((line) => line.startsWith(`VIOLATION ${mutant.kind}`)), out.dump());
      const replayed = await replayToy(replaySpecOf(first.replay), () => undefined);
      assert.equal(replayed.workloads, 1);
      assert.deepEqual(replayed.violations[0], first);
    });
  }

  it('attributes the cross-epoch writeback bug to the raw-backing check alone', async () => {
    // With the raw-backing check off, the same mutant passes the workload that exposed it:
    // the cache itself serves correct data; only the backing device's order is wrong.
    const name = 'log-cache.batchedWriteback';
    const replay = `target=${name} mode=exhaustive seed=1 workload=W0.1,flush,W1.1`;
    const off = await runExhaustive({ ...toyExhaustiveShape, name, target: toyTarget(name), replay, rawBackingCheck: false, log: () => undefined });
    assert.equal(off.violationsTotal, 0);
    const on = await runExhaustive({ ...toyExhaustiveShape, name, target: toyTarget(name), replay, log: () => undefined });
    assert.ok(on.violations.every((violation) => violation.kind === 'epoch-backing'));
    assert.ok(on.violationsTotal > 0);
    // The workload has no writeback step: the batch goes out in the drain after recovery, so
    // the crash states taken during that drain (checked as sector deltas) are where it shows.
    assert.ok(on.violations.some((violation) => violation.state?.includes('during drain') === true));
  });
});

/** Write-through with a twist, for the harness's reporting of target misbehaviour. */
class QuirkyTarget implements CrashTarget {
  private opens = 0;

  constructor(private readonly quirk: 'checkComplains' | 'checkComplainsBeforeReads' | 'writeThrowsTypeError' | 'refusesToReopen') {}

  async open(cache: BlockDevice, backing: BlockDevice): Promise<OpenTarget> {
    this.opens += 1;
    // Open 1 is the baseline and open 2 the workload; recoveries come after.
    if (this.quirk === 'refusesToReopen' && this.opens > 2) throw new PcacheError('CORRUPT', 'refusing to recover');
    const inner = await new WriteThroughTarget().open(cache, backing);
    const quirk = this.quirk;
    // What recovery left that a read would cover up (a read that fills the cache, say).
    let readSinceOpen = false;
    return {
      ...bind(inner),
      read(target, offsetBytes) {
        readSinceOpen = true;
        return inner.read(target, offsetBytes);
      },
      write(source, offsetBytes, options) {
        if (quirk === 'writeThrowsTypeError') throw new TypeError('engine bug');
        return inner.write(source, offsetBytes, options);
      },
      check: () => {
        if (quirk === 'checkComplains') return Promise.resolve(['key 3 overlaps key 4']);
        return Promise.resolve(quirk === 'checkComplainsBeforeReads' && !readSinceOpen ? ['left behind by recovery'] : []);
      },
    };
  }
}

function bind(target: OpenTarget): OpenTarget {
  return {
    read: (t, o) => target.read(t, o),
    write: (s, o, options) => target.write(s, o, options),
    flush: () => target.flush(),
    trim: (o, l, options) => target.trim(o, l, options),
    writeZeroes: (o, l, options) => target.writeZeroes(o, l, options),
    writebackStep: () => target.writebackStep(),
    gcStep: () => target.gcStep(),
    drain: () => target.drain(),
    check: () => target.check(),
    close: () => target.close(),
    abandon: () => target.abandon(),
  };
}

describe('exhaustive harness, reporting', () => {
  const quirks: [ConstructorParameters<typeof QuirkyTarget>[0], ViolationKind, string][] = [
    ['checkComplains', 'check', 'key 3 overlaps key 4'],
    ['checkComplainsBeforeReads', 'check', 'right after recovery:'],
    ['writeThrowsTypeError', 'error', 'TypeError: engine bug'],
    ['refusesToReopen', 'open', 'CORRUPT: refusing to recover'],
  ];
  for (const [quirk, kind, text] of quirks) {
    it(`reports a target whose ${quirk} as ${kind}`, async () => {
      const report = await runExhaustive({ ...toyExhaustiveShape, name: quirk, target: new QuirkyTarget(quirk), opsMax: 1, violationsMax: 1, log: () => undefined });
      const first = report.violations[0];
      assert.equal(first?.kind, kind);
      assert.ok(first.details.some((line) => line.includes(text)), first.details.join('\n'));
    });
  }

  it('refuses a replay spec meant for another target or seed', async () => {
    const base = { ...toyExhaustiveShape, name: 'write-through', target: toyTarget('write-through'), log: () => undefined };
    const isInvalid = (error: unknown): boolean => error instanceof PcacheError && error.code === 'EINVAL';
    await assert.rejects(runExhaustive({ ...base, replay: 'target=log-cache mode=exhaustive seed=1 workload=W0.1' }), isInvalid);
    await assert.rejects(runExhaustive({ ...base, replay: 'target=write-through mode=exhaustive seed=2 workload=W0.1' }), isInvalid);
    await assert.rejects(runExhaustive({ ...base, replay: 'target=write-through mode=exhaustive seed=1 workload=X9' }), isInvalid);
  });
});

describe('randomized harness', () => {
  for (const name of ['write-through', 'log-cache']) {
    it(`finds nothing wrong with ${name} over concurrent seeded runs, and repeats itself exactly`, async () => {
      const out = collector();
      const options = { ...toyRandomizedShape, name, target: toyTarget(name), runs: 2, seed: 7, log: out.log };
      const report = await runRandomized(options);
      assertClean(report, out.dump);
      assert.equal(report.workloads, 2 * toyRandomizedShape.segmentsPerRun);
      const again = await runRandomized({ ...options, target: toyTarget(name), log: () => undefined });
      assert.deepEqual(again, report);
    });
  }

  for (const name of ['log-cache.flushWithoutSync', 'log-cache.batchedWriteback', 'write-through.reorderedFlush']) {
    it(`catches ${name} and replays the failing run from its printed seed`, async () => {
      const out = collector();
      const report = await runRandomized({ ...toyRandomizedShape, name, target: toyTarget(name), runs: 2, violationsMax: 1, log: out.log });
      const first = report.violations[0];
      assert.ok(first !== undefined, out.dump());
      const replayed = await replayToy(replaySpecOf(first.replay), () => undefined);
      assert.equal(replayed.violations[0]?.details.join('\n'), first.details.join('\n'));
    });
  }
});
