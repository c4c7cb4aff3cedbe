// Crash consistency of the write modes and the sequential cutoff (cache_policy.ts,
// cache_direct.ts) under the crash simulator: every 1-2 operation workload (write, FUA write,
// flush, trim, write-zeroes, writeback step, GC step over two blocks) crashed at every device
// operation, for
// - writethrough, writearound and passthrough: the oracle, stability, the structural checker,
//   the backing device after a drain, and the raw backing device a prefix of the flush epochs;
// - the same three with the cache device lost at the crash: the backing device alone must hold
//   every write acknowledged before a FLUSH or with FUA (their guarantee, docs/operations.md);
// - writeback with a 4 KiB sequential cutoff (a write to the next block continues a stream and
//   goes to the backing device when nothing is dirty; the raw backing device stays a prefix of
//   the flush epochs under strict ordering);
// - every switch: each writeback step first switches to the next mode, with dirty data left
//   (the raw backing device is then no prefix of the epochs: a direct write may land while
//   older dirty data waits in the cache; what is served stays right);
// and seeded randomized runs of the switching target with requests in flight.
// The tier runs a share of each set of workloads (a different share per mode); PCACHE_CRASH_FULL=1
// runs them all (about 30 000 crash states per set; the cache-lost sets skip crashes during
// recovery, which there is only a format).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runExhaustive, runRandomized, type HarnessReport } from '../../../sim/harness.js';
import { exhaustiveShape, randomizedShape } from './crash_suite.js';
import { modesTarget, modesTargetName, type ModesTargetOptions } from './modes_target.js';

const log = (line: string): void => { console.error(line); };

const full = process.env.PCACHE_CRASH_FULL === '1';

function exhaustiveModes(options: ModesTargetOptions, rawBackingCheck: boolean, shard: { index: number; count: number }): Promise<HarnessReport> {
  return runExhaustive({
    ...(full ? {} : { shard }),
    recoveryCrashes: options.loseCacheDevice !== true,
    name: modesTargetName(options),
    target: modesTarget(options),
    ...exhaustiveShape,
    opsMax: 2,
    rawBackingCheck,
    log,
    replayCommand: (spec) => `PCACHE_CRASH_REPLAY='${spec}' node --test dist/test/cache/crash/crash_modes.test.js`,
    ...(process.env.PCACHE_CRASH_REPLAY !== undefined ? { replay: process.env.PCACHE_CRASH_REPLAY } : {}),
  });
}

function assertClean(report: HarnessReport, statesMin: number): void {
  assert.equal(report.violationsTotal, 0, 'violations were found; the replay commands are printed above');
  assert.ok(report.statesExplored > statesMin, `${report.statesExplored} states explored`);
  console.error(`crash tier (${report.target}): ${report.statesExplored} crash states explored, ${report.violationsTotal} violations`);
}

describe('crash consistency of the write modes', () => {
  const modes = ['writethrough', 'writearound', 'passthrough'] as const;
  modes.forEach((mode, index) => {
    it(`${mode}: 1-2 operation workloads, no violations`, async () => {
      assertClean(await exhaustiveModes({ mode }, true, { index, count: 4 }), 1000);
    });
    it(`${mode}, cache device lost at the crash: the backing device alone holds every flushed write`, async () => {
      assertClean(await exhaustiveModes({ mode, loseCacheDevice: true }, true, { index: 7 - index, count: 8 }), 500);
    });
  });

  it('writeback with a 4 KiB sequential cutoff: 1-2 operation workloads, no violations, and the raw backing device a prefix of the flush epochs (strict ordering)', async () => {
    assertClean(await exhaustiveModes({ sequentialCutoffBytes: 4096 }, true, { index: 0, count: 2 }), 1000);
  });

  it('switching modes at every writeback step: 1-2 operation workloads, no violations', async () => {
    assertClean(await exhaustiveModes({ switchModes: true, sequentialCutoffBytes: 4096 }, false, { index: 1, count: 2 }), 1000);
  });

  it('switching modes, randomized runs with requests in flight: no violations', async () => {
    const seed = Number(process.env.PCACHE_CRASH_SEED ?? 21);
    const options: ModesTargetOptions = { switchModes: true, sequentialCutoffBytes: 16 * 1024 };
    const report = await runRandomized({
      name: modesTargetName(options),
      target: modesTarget(options),
      ...randomizedShape,
      seed,
      runs: full ? 4 : 1,
      segmentsPerRun: 2,
      opsPerSegment: 200,
      rawBackingCheck: false,
      log,
      replayCommand: (spec) => `PCACHE_CRASH_SEED=${seed} node --test dist/test/cache/crash/crash_modes.test.js # ${spec}`,
    });
    assertClean(report, 100);
  });
});
