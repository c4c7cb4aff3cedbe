// Every engine benchmark runs here with tiny parameters (PCACHE_BENCH_SMOKE=1), so a change
// that breaks one fails the tests instead of rotting until the next `npm run bench`. Nothing
// here is timed: the test checks that each benchmark runs and reports every figure.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

function runBench(name: string): string[] {
  const file = fileURLToPath(new URL(`../../bench/${name}_bench.js`, import.meta.url));
  const result = spawnSync(process.execPath, ['--expose-gc', file], { env: { ...process.env, PCACHE_BENCH_SMOKE: '1' }, encoding: 'utf8', timeout: 120_000 });
  assert.equal(result.status, 0, `${name} benchmark failed:\n${result.stderr}`);
  return result.stdout.trim().split('\n');
}

describe('benchmarks in smoke mode', () => {
  it('index: memory per key, insert and lookup, each against the Map-of-objects peer', () => {
    const lines = runBench('index');
    for (const metric of ['heap per live key', 'insert', 'lookup']) {
      assert.equal(lines.filter((line) => line.includes(metric) && /ratio \d/.test(line)).length, 2, `${metric}:\n${lines.join('\n')}`);
    }
  });
  it('engine: every workload against the raw memory device', () => {
    const lines = runBench('engine');
    assert.equal(lines.filter((line) => line.startsWith('engine') && line.includes('raw memory device') && /ratio \d/.test(line)).length, 7, lines.join('\n'));
  });
  it('policy: every trace through the engine against the reference policies, and the shifting one through pcache serve too', () => {
    const lines = runBench('policy');
    for (const trace of ['zipf-0.9', 'zipf-0.8', 'zipf-1.0', 'hot+scans', 'shifting']) {
      const reported = lines.filter((line) => line.startsWith('policy') && line.includes(`${trace} hit ratio vs`) && /ratio \d/.test(line));
      assert.equal(reported.length, 2, `${trace}:\n${lines.join('\n')}`);
    }
    const throughNbd = lines.filter((line) => line.startsWith('policy') && line.includes('hit ratio through NBD vs') && /ratio \d/.test(line));
    assert.equal(throughNbd.length, 1, lines.join('\n'));
    assert.ok(throughNbd[0]?.includes('shifting'), lines.join('\n'));
  });
});
