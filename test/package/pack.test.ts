// The package as npm publishes it: `npm pack --dry-run` must list the bin package.json names
// (dist/src/cli/pcache.cjs) and the main module, and nothing of what `npm run build` also
// compiles into dist/ but is not the product: the simulator (dist/sim), the tests (dist/test)
// and the benchmarks (dist/bench).
//
// --ignore-scripts: packing would otherwise run `prepare` (npm run build), which empties dist/
// under the tests running beside this one.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { requireTool, runTool } from '../helpers/tools.js';

const repoRoot = fileURLToPath(new URL('../../../', import.meta.url));

interface PackReport {
  readonly name: string;
  readonly files: readonly { readonly path: string }[];
}

describe('the published package', () => {
  it('holds the pcache bin and the main module, and nothing of the simulator, the tests or the benchmarks', async () => {
    requireTool('npm', 'npm');
    const manifest = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as { bin: Record<string, string>; main: string };
    assert.equal(manifest.bin.pcache, 'dist/src/cli/pcache.cjs', 'package.json names the bin');
    // What the package must leave out is there to leave out: the build compiled it.
    for (const folder of ['dist/sim', 'dist/test', 'dist/bench']) {
      assert.ok(fs.existsSync(path.join(repoRoot, folder)), `${folder} exists (npm run build compiles it)`);
    }

    const result = await runTool('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], 120_000, repoRoot);
    assert.equal(result.code, 0, result.stderr);
    const reports = JSON.parse(result.stdout) as PackReport[];
    assert.equal(reports.length, 1);
    const files = (reports[0]?.files ?? []).map((file) => file.path);
    assert.ok(files.includes('dist/src/cli/pcache.cjs'), `the bin is packed: ${files.join(', ')}`);
    assert.ok(files.includes(manifest.main), `the main module ${manifest.main} is packed`);
    const strays = files.filter((file) => /^dist\/(sim|test|bench)\//.test(file));
    assert.deepEqual(strays, [], 'nothing under dist/sim, dist/test or dist/bench is packed');
  });
});
