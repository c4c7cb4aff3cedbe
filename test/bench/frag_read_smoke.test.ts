// bench/frag_read_bench.ts in smoke mode, so it cannot rot: it must lay the range down both
// ways through the real CLI, read it with and without gathering, against nbdkit and pcache
// --no-cache, and report every ratio and the share of reads gathered. Figures are not judged
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
    for (const metric of ['fragmented vs nbdkit', 'fragmented vs sequential', 'piece by piece vs nbdkit', 'fragmented vs no cache', 'not written back vs nbdkit']) {
      assert.match(stdout, new RegExp(`^frag_read +1M seq read QD8, ${metric} +[\\d,.]+ IOPS .* ratio \\d+\\.\\d\\d$`, 'm'), metric);
    }
    assert.match(stdout, /targets: fragmented\/nbdkit \d+\.\d\d .* fragmented\/sequential \d+\.\d\d/);
    // Every written-back read of the default setting was one backing read; every one was a hit.
    assert.match(stdout, /written-back reads: hits 100\.0%, served by one backing read 100\.0%/);
  });
});
