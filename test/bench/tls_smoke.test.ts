// bench/nbd_tls_bench.ts in smoke mode, so it cannot rot: it must start pcache serve --tls on
// and nbdkit --tls=on, reach both over TLS and in plaintext with fio, report the three ratios
// for both workloads, and name the cipher each server negotiated with libnbd. Figures are not
// judged here (tests do not time anything); `npm run bench -- nbd_tls` reports them.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runBenchSmoke } from '../helpers/bench_smoke.js';
import { requireTool } from '../helpers/tools.js';

describe('nbd_tls benchmark (smoke)', () => {
  it('runs both workloads against pcache and nbdkit, over TLS and in plaintext, and reports every ratio', async () => {
    requireTool('fio', 'fio');
    requireTool('nbdkit', 'nbdkit');
    requireTool('nbdinfo', 'libnbd-bin');
    const { code, stdout, stderr } = await runBenchSmoke('nbd_tls', {}, 180_000);
    assert.equal(code, 0, stdout + stderr);
    assert.match(stdout, /^machine: \d+ CPUs/m);
    assert.match(stdout, /^TLS with libnbd: pcache cipher \S+ .* nbdkit cipher \S+/m, 'both servers negotiated TLS with libnbd');
    for (const workload of ['4K random read QD32', '1M sequential read QD4']) {
      for (const [metric, peer] of [['TLS vs nbdkit TLS', 'nbdkit TLS'], ['TLS vs plain', 'pcache plain'], ['nbdkit TLS vs plain', 'nbdkit plain']]) {
        const line = stdout.split('\n').find((candidate) => candidate.includes(`${workload} ${metric}`) && candidate.includes(`${peer}:`));
        assert.ok(line !== undefined, `a result for ${workload} ${metric}:\n${stdout}`);
        const match = /\s([\d,.]+) (IOPS|MiB\/s) .*: ([\d,.]+) (IOPS|MiB\/s)\s+ratio (\d+\.\d\d)/.exec(line);
        assert.ok(match !== null, line);
        assert.ok(Number((match[1] ?? '').replaceAll(',', '')) > 0, `moved data: ${line}`);
        assert.ok(Number((match[3] ?? '').replaceAll(',', '')) > 0, `the peer moved data: ${line}`);
      }
      assert.match(stdout, new RegExp(`  ${workload}: pcache TLS / nbdkit TLS \\d+\\.\\d\\d, goal >= 1\\.0: (met|MISSED); pcache TLS / plain \\d+\\.\\d\\d`));
    }
  });
});
