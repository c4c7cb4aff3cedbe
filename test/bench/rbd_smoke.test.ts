// bench/rbd_bench.ts in smoke mode, so it cannot rot: it must start a Ceph cluster through
// scripts/ceph_cluster.sh, serve one image through pcache, and report both workloads against
// the other image straight through qemu-nbd. Figures are not judged here (`npm run bench` reports them).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runBenchSmoke } from '../helpers/bench_smoke.js';
import { requireTool } from '../helpers/tools.js';

describe('rbd benchmark (smoke)', () => {
  it('reports cached reads and writes through pcache against the RBD image, and a drain', async () => {
    for (const [tool, debianPackage] of [['fio', 'fio'], ['ceph-mon', 'ceph-mon'], ['ceph-osd', 'ceph-osd'], ['rbd', 'ceph-common'], ['qemu-nbd', 'qemu-utils']]) requireTool(tool ?? '', debianPackage ?? '');
    const { code, stdout, stderr } = await runBenchSmoke('rbd', {}, 180_000);
    assert.equal(code, 0, stdout + stderr);
    for (const workload of ['4K random read QD1 (cached)', '4K random write QD1']) {
      const line = stdout.split('\n').find((candidate) => candidate.includes(`${workload} vs direct`));
      assert.ok(line !== undefined, `a result for ${workload}:\n${stdout}`);
      const match = /\s([\d,.]+) IOPS .*: ([\d,.]+) IOPS\s+ratio (\d+\.\d\d)/.exec(line);
      assert.ok(match !== null, line);
      assert.ok(Number((match[1] ?? '').replaceAll(',', '')) > 0 && Number((match[2] ?? '').replaceAll(',', '')) > 0, `both sides moved data: ${line}`);
    }
    assert.match(stdout, /pcache read hits 100\.0%/);
    assert.match(stdout, /drains after the write runs: [\d.]+ s/);
  });
});
