// bench/sustained_bench.ts in smoke mode, so it cannot rot: it must measure the delayed store,
// run pcache under both writeback orderings with a per-second series, report the ratio, the
// share written back and the CPU per write, and draw its chart. Figures are not judged here
// (tests do not time anything); `npm run bench` reports them.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { tempDir } from '../helpers/files.js';
import { runBenchSmoke } from '../helpers/bench_smoke.js';
import { requireTool } from '../helpers/tools.js';

describe('sustained benchmark (smoke)', () => {
  it('measures the store, runs pcache under both orderings second by second, and draws the chart', async (t) => {
    requireTool('fio', 'fio');
    requireTool('nbdkit', 'nbdkit');
    const svg = path.join(tempDir(t, 'pcache-sustained-'), 'chart.svg');
    const { code, stdout, stderr } = await runBenchSmoke('sustained', { PCACHE_BENCH_SVG: svg });
    assert.equal(code, 0, stdout + stderr);
    assert.match(stdout, /^machine: \d+ CPUs/m);
    assert.match(stdout, /^ {2}store alone: \d+ IOPS at QD16/m);
    for (const ordering of ['strict', 'relaxed']) {
      assert.match(stdout, new RegExp(`^ {2}pcache, writeback_ordering=${ordering}, per second:$`, 'm'));
      assert.match(stdout, new RegExp(`4K rand write QD16 ${ordering}\\s+[\\d,]+ IOPS {2}store QD16: [\\d,]+ IOPS\\s+ratio \\d+\\.\\d\\d`));
      assert.match(stdout, new RegExp(`^ {2}${ordering}: \\d+ IOPS = [\\d.]+x the store .* written back [\\d.]+ MiB in \\d+ writes = [\\d.]+% .*server CPU [\\d.]+ us per write`, 'm'));
    }
    // Per-second rows: second, IOPS, three latencies, dirty, three rates, CPU.
    assert.ok(stdout.split('\n').filter((line) => /^ +\d+ +\d+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +\d+$/.test(line)).length >= 2, stdout);
    const chart = fs.readFileSync(svg, 'utf8');
    assert.match(chart, /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
    assert.match(chart, /<polyline fill="none" stroke="#1f77b4"/, 'the IOPS line is drawn');
    assert.match(chart, /<\/svg>\n$/);
  });
});
