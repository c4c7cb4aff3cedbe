// bench/steady_write_bench.ts in smoke mode, so it cannot rot: it must run 4 KiB random writes
// through a new sparse cache and through nbdkit on the same medium, and report the ratio, how
// often the cache was filled and the share written back. Figures are not judged here (tests do
// not time anything); `npm run bench -- steady_write` reports them. With PCACHE_BENCH_PREWRITTEN=1
// the cache file is written full first (processes.ts, newCacheArgs), and the header says so.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runBenchSmoke } from '../helpers/bench_smoke.js';
import { requireTool } from '../helpers/tools.js';

describe('steady-state write benchmark (smoke)', () => {
  it('writes through pcache and nbdkit and reports the ratio and what was written back', async () => {
    requireTool('fio', 'fio');
    requireTool('nbdkit', 'nbdkit');
    const { code, stdout, stderr } = await runBenchSmoke('steady_write');
    assert.equal(code, 0, stdout + stderr);
    assert.match(stdout, /^steady_write +4K rand write QD32, cache wrapped +[\d,]+ IOPS +nbdkit file: [\d,]+ IOPS +ratio \d+\.\d\d$/m);
    assert.match(stdout, /the client wrote the cache's size \d+\.\d times over, \d+\.\d% of it written back/);
    assert.match(stdout, /per-round ratios (\d+\.\d\d ?)+, median \d+\.\d\d/);
    assert.match(stdout, /cache \d+ MiB \(sparse, new\)/);
  });

  it('runs on a pre-written cache file when asked', async () => {
    requireTool('fio', 'fio');
    requireTool('nbdkit', 'nbdkit');
    const { code, stdout, stderr } = await runBenchSmoke('steady_write', { PCACHE_BENCH_PREWRITTEN: '1' });
    assert.equal(code, 0, stdout + stderr);
    assert.match(stdout, /cache \d+ MiB \(pre-written \(full of zeroes\)\)/);
    assert.match(stdout, /^steady_write +4K rand write QD32, cache wrapped +[\d,]+ IOPS +nbdkit file: [\d,]+ IOPS +ratio \d+\.\d\d$/m);
  });
});
