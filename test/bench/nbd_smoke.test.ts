// The NBD benchmarks in smoke mode, so they cannot rot. bench/nbd_fio_bench.ts must start all
// three servers through the real CLI and nbdkit, run every workload against each, and report a
// figure and a ratio for both peers; bench/remote_backing_bench.ts must serve a delayed nbdkit
// through pcache and report both workloads against the delayed store, the hit rate and the
// drains. Figures are not judged here (tests do not time anything); `npm run bench` reports them.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { cliEnv } from '../helpers/pcache.js';
import { requireTool } from '../helpers/tools.js';

const benchPath = fileURLToPath(new URL('../../bench/nbd_fio_bench.js', import.meta.url));
const remoteBenchPath = fileURLToPath(new URL('../../bench/remote_backing_bench.js', import.meta.url));
const workloads = ['4K random read QD32', '4K random read QD1', '1M sequential read QD4', '4K random write QD32'];

function runSmoke(file: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [file], { env: cliEnv({ PCACHE_BENCH_SMOKE: '1' }), timeout: 120_000, encoding: 'utf8' }, (error, out, err) => {
      resolve({ code: error === null ? 0 : typeof error.code === 'number' ? error.code : -1, stdout: out, stderr: err });
    });
  });
}

describe('nbd_fio benchmark (smoke)', () => {
  it('runs every workload against pcache, nbdkit and pcache --no-cache and reports both ratios', async () => {
    requireTool('fio', 'fio');
    requireTool('nbdkit', 'nbdkit');
    const { code, stdout, stderr } = await runSmoke(benchPath);
    assert.equal(code, 0, stdout + stderr);
    assert.match(stdout, /^machine: \d+ CPUs/m);
    for (const workload of workloads) {
      for (const peer of ['nbdkit file', 'pcache --no-cache']) {
        const line = stdout.split('\n').find((candidate) => candidate.includes(workload) && candidate.includes(`${peer}:`));
        assert.ok(line !== undefined, `a result for ${workload} against ${peer}:\n${stdout}`);
        const match = /\s([\d,.]+) (IOPS|MiB\/s) .*: ([\d,.]+) (IOPS|MiB\/s)\s+ratio (\d+\.\d\d)/.exec(line);
        assert.ok(match !== null, line);
        assert.ok(Number((match[1] ?? '').replaceAll(',', '')) > 0, `pcache moved data: ${line}`);
        assert.ok(Number((match[3] ?? '').replaceAll(',', '')) > 0, `the peer moved data: ${line}`);
      }
      assert.match(stdout, new RegExp(`  ${workload}: ratio \\d+\\.\\d\\d, target >= \\d\\.\\d: (met|MISSED)`));
    }
    assert.match(stdout, /4K random read QD32: .*pcache read hits 100\.0%/, 'the warmed range is served from the cache');
  });
});

describe('remote_backing benchmark (smoke)', () => {
  it('runs both QD1 workloads through pcache and straight against the delayed nbdkit, and reports ratios, hits and drains', async () => {
    requireTool('fio', 'fio');
    requireTool('nbdkit', 'nbdkit');
    const { code, stdout, stderr } = await runSmoke(remoteBenchPath);
    assert.equal(code, 0, stdout + stderr);
    assert.match(stdout, /^machine: \d+ CPUs/m);
    assert.match(stdout, /4\/4 backing connections/, 'pcache is connected to the delayed nbdkit');
    for (const workload of ['4K random read QD1 (cached)', '4K random write QD1']) {
      const line = stdout.split('\n').find((candidate) => candidate.includes(`${workload} vs direct`));
      assert.ok(line !== undefined, `a result for ${workload}:\n${stdout}`);
      const match = /\s([\d,.]+) IOPS {2}nbdkit delay 1ms: ([\d,.]+) IOPS\s+ratio (\d+\.\d\d)/.exec(line);
      assert.ok(match !== null, line);
      assert.ok(Number((match[1] ?? '').replaceAll(',', '')) > 0, `pcache moved data: ${line}`);
      assert.ok(Number((match[2] ?? '').replaceAll(',', '')) > 0, `the delayed store moved data: ${line}`);
      assert.match(stdout, new RegExp(`  ${workload.replace(/[()]/g, '\\$&')}: ratio \\d+\\.\\d\\d, target >= 10\\.0: (met|MISSED)`));
    }
    assert.match(stdout, /4K random read QD1 \(cached\): .*pcache read hits 100\.0%/, 'the warmed range is served from the cache');
    assert.match(stdout, /drain after a write run\s+[\d,.]+ ms/);
    assert.match(stdout, /^ {2}drains \(dirty log bytes, time, writeback rounds\): [\d.]+ MiB in [\d.]+ s \(\d+\)/m);
    assert.match(stdout, /^cache at end: \d+ of \d+ segments in use/m);
  });
});
