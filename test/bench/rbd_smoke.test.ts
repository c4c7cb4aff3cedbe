// bench/rbd_bench.ts in smoke mode, so it cannot rot: it must start a Ceph cluster (bluestore,
// the benchmark's default) through scripts/ceph_cluster.sh, serve one image through pcache, report
// both QD1 workloads against another image straight through qemu-nbd, and run the sustained
// writes past a cache small enough to wrap within the run: per-second IOPS through pcache against
// the image, latency, and bytes written back; with PCACHE_BENCH_RBD_FILE_PEER=1, the cached reads
// also through pcache in front of a tmpfs file (the control). Figures are not judged here (`npm run bench` reports them).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runBenchSmoke } from '../helpers/bench_smoke.js';
import { requireTool } from '../helpers/tools.js';

describe('rbd benchmark (smoke)', () => {
  it('reports cached reads and writes through pcache against the RBD image, a drain, and sustained writes past the cache', async () => {
    for (const [tool, debianPackage] of [['fio', 'fio'], ['ceph-mon', 'ceph-mon'], ['ceph-osd', 'ceph-osd'], ['rbd', 'ceph-common'], ['qemu-nbd', 'qemu-utils']]) requireTool(tool ?? '', debianPackage ?? '');
    const { code, stdout, stderr } = await runBenchSmoke('rbd', { PCACHE_BENCH_RBD_FILE_PEER: '1' }, 180_000);
    assert.equal(code, 0, stdout + stderr);
    for (const workload of ['4K random read QD1 (cached)', '4K random write QD1']) {
      const line = stdout.split('\n').find((candidate) => candidate.includes(`${workload} vs direct`));
      assert.ok(line !== undefined, `a result for ${workload}:\n${stdout}`);
      const match = /\s([\d,.]+) IOPS .*: ([\d,.]+) IOPS\s+ratio (\d+\.\d\d)/.exec(line);
      assert.ok(match !== null, line);
      assert.ok(Number((match[1] ?? '').replaceAll(',', '')) > 0 && Number((match[2] ?? '').replaceAll(',', '')) > 0, `both sides moved data: ${line}`);
    }
    assert.match(stdout, /pcache read hits 100\.0%/);
    assert.match(stdout, /the same through pcache in front of a tmpfs file \(control\): median [1-9]\d* IOPS, [\d.]+x the RBD-backed pcache; read hits 100\.0%/);
    assert.match(stdout, /drains after the write runs: [\d.]+ s/);
    const sustained = stdout.split('\n').find((candidate) => candidate.includes('4K random write QD16 past the cache'));
    assert.ok(sustained !== undefined, `a sustained result:\n${stdout}`);
    const match = /\s([\d,.]+) IOPS .*: ([\d,.]+) IOPS\s+ratio (\d+\.\d\d)/.exec(sustained);
    assert.ok(match !== null && Number((match[1] ?? '').replaceAll(',', '')) > 0 && Number((match[2] ?? '').replaceAll(',', '')) > 0, `both sides wrote: ${sustained}`);
    // The smoke cache (8 MiB in 1 MiB segments) wraps within the run, so a steady part exists.
    assert.match(stdout, /steady part: from second \d+ \(the log wrapped\)/);
    assert.match(stdout, /latency, steady part: pcache p50 [\d.]+ ms, p99 [\d.]+ ms, p99\.9 [\d.]+ ms, max [\d.]+ ms \| image p50/);
    assert.match(stdout, /in the steady part written back \d+ MiB in \d+ writes \([\d.]+ KiB each\) of \d+ MiB client bytes = [\d.]+%; drain after the run [\d.]+ s/);
  });
});
