// Crash consistency of fragmented reads stored again as one piece (cache_read_rewrite.ts),
// under both writeback orderings. With fragmented_rewrite_pieces=2 a read over two or more
// blocks not yet written back is rewritten the second time it comes at an offset, so the
// read-heavy workloads (reads of up to 16 blocks over 64, scattered writes, trims, flushes,
// writeback and GC steps, several requests in flight, crashes everywhere, recoveries crashed
// too) interleave rewrites with everything else. With a cache device that completes its I/O
// later, a rewrite's data write is outstanding while other requests run, so writes and trims
// land between the read and the rewrite's publishing. The checks are the usual ones: what a
// recovered cache reads, alone and with the backing device, stability across recoveries, and
// under strict ordering the backing device alone holding a prefix of the flush epochs. A
// rewrite that published stale data over a newer write, or that came back after a crash
// without the keys it copies, shows as a violation.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomized } from './crash_suite.js';

const log = (line: string): void => { console.error(line); };
const seed = Number(process.env.PCACHE_CRASH_SEED ?? 1);
const run = { seed, runs: 2, segmentsPerRun: 3, opsPerSegment: 300, log };

describe('crash consistency of rewritten fragmented reads', () => {
  const cases = [
    { ordering: 'strict', asyncCache: false },
    { ordering: 'strict', asyncCache: true },
    { ordering: 'relaxed', asyncCache: true },
  ] as const;
  for (const { ordering, asyncCache } of cases) {
    it(`${ordering} ordering, ${asyncCache ? 'a cache device completing later' : 'a blocking cache device'}: no violations, and the workloads did rewrite`, async () => {
      let rewrites = 0;
      const onCounters = (counters: { fragmentRewrites: number }): void => { rewrites += counters.fragmentRewrites; };
      const report = await randomized({ gcPercent: 0, ordering, rewritePieces: 2, asyncCache, onCounters }, { ...run, profile: 'reads' });
      assert.equal(report.violationsTotal, 0, 'violations were found; the replay commands are printed above');
      assert.ok(report.statesExplored > 50);
      assert.ok(rewrites > 20, `only ${rewrites} rewrites: the workload must exercise them`);
    });
  }
});
