// bench/frag_read_bench.ts in smoke mode, so it cannot rot: it must lay the range down both
// ways through the real CLI, read it with and without gathering and rewriting, against nbdkit
// and pcache --no-cache, and report every ratio, the share of reads gathered and the share of
// the range rewritten. Figures are not judged
// here (tests do not time anything); `npm run bench -- frag_read` reports them.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runBenchSmoke } from '../helpers/bench_smoke.js';
import { requireTool } from '../helpers/tools.js';

describe('fragmented read benchmark (smoke)', () => {
  it('reads randomly written data gathered and piece by piece, against nbdkit, no cache and sequentially written data', async () => {
    requireTool('fio', 'fio');
    requireTool('nbdkit', 'nbdkit');
    const { code, stdout, stderr } = await runBenchSmoke('frag_read');
    assert.equal(code, 0, stdout + stderr);
    const metrics = [
      'fragmented vs nbdkit', 'fragmented vs sequential', 'piece by piece vs nbdkit', 'fragmented vs no cache', 'not written back, piece by piece vs nbdkit',
      'not written back, first read vs nbdkit', 'not written back, second read vs nbdkit', 'not written back, read again vs nbdkit',
      'not written back, read again vs sequential',
    ];
    for (const metric of metrics) {
      assert.match(stdout, new RegExp(`^frag_read +1M seq read QD8, ${metric} +[\\d,.]+ IOPS .* ratio \\d+\\.\\d\\d$`, 'm'), metric);
    }
    // The targets are judged on per-round ratios: one per round (smoke mode runs one round).
    for (const what of ['written back', 'not written back, read again', 'not written back, first pass on the thread']) {
      assert.match(stdout, new RegExp(`targets, ${what} \\(medians of per-round ratios\\): /nbdkit \\d+\\.\\d\\d .* /sequential \\d+\\.\\d\\d .*; per round /nbdkit \\d+\\.\\d\\d$`, 'm'), what);
    }
    assert.match(stdout, /^ {2}sequential per round \/nbdkit: \d+\.\d\d$/m);
    // The first pass over data still dirty stored none of it again, the second all of it.
    assert.match(stdout, /stored again as one piece per read: first read 0\.0% of the range, second read 100\.0%/);
    // Every written-back read of the default setting was one backing read; every one was a hit.
    assert.match(stdout, /written-back reads: hits 100\.0%, served by one backing read 100\.0%/);
  });
});
