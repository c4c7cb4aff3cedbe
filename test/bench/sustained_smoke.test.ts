// bench/sustained_bench.ts in smoke mode, so it cannot rot: it must measure the delayed store,
// run pcache under both writeback orderings with a per-second series, report the ratio, the
// share written back and the CPU per write, and draw its chart. Figures are not judged here
// (tests do not time anything); `npm run bench` reports them.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir } from '../helpers/files.js';
import { cliEnv } from '../helpers/pcache.js';
import { requireTool } from '../helpers/tools.js';

const benchPath = fileURLToPath(new URL('../../bench/sustained_bench.js', import.meta.url));

describe('sustained benchmark (smoke)', () => {
  it('measures the store, runs pcache under both orderings second by second, and draws the chart', async (t) => {
    requireTool('fio', 'fio');
    requireTool('nbdkit', 'nbdkit');
    const svg = path.join(tempDir(t, 'pcache-sustained-'), 'chart.svg');
    const { code, stdout, stderr } = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      execFile(process.execPath, [benchPath], { env: cliEnv({ PCACHE_BENCH_SMOKE: '1', PCACHE_BENCH_SVG: svg }), timeout: 120_000, encoding: 'utf8' }, (error, out, err) => {
        resolve({ code: error === null ? 0 : typeof error.code === 'number' ? error.code : -1, stdout: out, stderr: err });
      });
    });
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
