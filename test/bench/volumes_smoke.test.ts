// bench/volumes_bench.ts in smoke mode, so it cannot rot: for both of A's backing stores it must
// serve the two volumes through the real CLI, in one pool with a volume process each, in one
// pool in one process (--volume-processes off) and (the peer) in two servers, measure B's
// read hits alone and with A writing (every read a hit; the benchmark itself waits until A's
// writeback and GC run before measuring), report p50 and p99 side by side with their ratios,
// and (with PCACHE_BENCH_LOOP_PROBE=1) the event loop's delay in B's server per phase. Figures are not judged here (tests do not time anything); `npm run
// bench` reports them.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runBenchSmoke } from '../helpers/bench_smoke.js';
import { requireTool } from '../helpers/tools.js';

describe('volumes isolation benchmark (smoke)', () => {
  it('measures B\'s read hits alone and beside A\'s writes, in volume processes, in one process and in two servers, for both stores, and reports p50 and p99 with ratios', async () => {
    requireTool('fio', 'fio');
    requireTool('nbdkit', 'nbdkit');
    const { code, stdout, stderr } = await runBenchSmoke('volumes', { PCACHE_BENCH_LOOP_PROBE: '1' }, 180_000);
    assert.equal(code, 0, stdout + stderr);
    assert.match(stdout, /^machine: \d+ CPUs/m);
    for (const store of ['delay', 'file']) {
      const section = stdout.slice(stdout.indexOf(`store ${store}: `));
      assert.match(section, new RegExp(`^store ${store}: A's backing `, 'm'), stdout);
      for (const layout of ['shared', 'in-process', 'split']) {
        for (const phase of ['alone', 'together']) {
          const line = section.split('\n').find((candidate) => new RegExp(`^ {2}round 1 ${layout} ${phase} *: `).test(candidate));
          assert.ok(line !== undefined, `a ${layout} ${phase} phase for ${store}:\n${stdout}`);
          assert.match(line, /B p50 +[\d.]+ us, p99 +[\d.]+ us, \d+ IOPS, hits 100\.0%/, `every read of B is a hit: ${line}`);
          assert.match(line, /B's server waited for a CPU \d+ ms\/s; its loop's ticks p50 [\d.]+ ms, p99 [\d.]+ ms, max [\d.]+ ms$/, `the loop probe in B's server answered: ${line}`);
          if (phase === 'together') {
            const match = /A (\d+) writes\/s, written back ([\d.]+) MiB\/s, GC freed (\d+) segments/.exec(line);
            assert.ok(match !== null, line);
            assert.ok(Number(match[1]) > 0, `A writes while B reads: ${line}`);
          } else {
            assert.match(line, /A 0 writes\/s/, `A is idle while B runs alone: ${line}`);
          }
        }
        for (const quantile of ['p50', 'p99']) {
          assert.match(section, new RegExp(`B 4K read hit QD1 ${quantile} ${store} ${layout}\\s+[\\d,.]+ us {2}B alone: [\\d,.]+ us {2}ratio \\d+\\.\\d\\d`));
        }
        assert.match(section, new RegExp(`^ {2}${store} ${layout}: B's QD1 read hits, alone vs with A writing: p50 [\\d.]+ vs [\\d.]+ us = [\\d.]+x \\(goal <= 2: (met|MISSED)\\); p99 .*x \\(goal <= 2: (met|MISSED)\\); A \\d+ writes/s`, 'm'));
      }
      assert.match(section, new RegExp(`^ {2}${store}: against two servers, with A writing: volume processes B's p50 [\\d.]+x, p99 [\\d.]+x; one process B's p50 [\\d.]+x, p99 [\\d.]+x$`, 'm'));
    }
  });
});
