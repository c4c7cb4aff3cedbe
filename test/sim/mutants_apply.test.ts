// The simulator's net stays cast: every mutant of scripts/mutants.mjs (the bugs the crash
// simulator and the tests must catch, run outside `npm test`) still applies to the tree, its
// text found exactly once in its file and its test files present. Without this, a refactor of
// the code a mutant patches leaves `npm run test:mutants` failing on it, or testing nothing,
// and nobody notices until the next time someone runs it. The check's own failure path is
// tried on a copy of the tree with one mutant's line changed.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repoRoot = fileURLToPath(new URL('../../../', import.meta.url));
const script = path.join(repoRoot, 'scripts/mutants.mjs');

function check(args: string[]): { status: number | null; output: string } {
  const result = spawnSync(process.execPath, [script, '--check', ...args], { cwd: repoRoot, encoding: 'utf8' });
  return { status: result.status, output: `${result.stdout}${result.stderr}` };
}

describe('scripts/mutants.mjs', () => {
  it('every mutant still applies to this tree', () => {
    const { status, output } = check([]);
    assert.equal(status, 0, output);
    assert.match(output, /^10 mutants apply: a, b, c, d, e, f, g, h, i, j$/m);
  });

  it('a mutant whose text is gone from its file fails the check, by name', () => {
    const copy = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-mutants-check-'));
    try {
      fs.cpSync(path.join(repoRoot, 'src'), path.join(copy, 'src'), { recursive: true });
      fs.cpSync(path.join(repoRoot, 'test'), path.join(copy, 'test'), { recursive: true });
      const file = path.join(copy, 'src/cache/cache_read_gather.ts');
      const text = fs.readFileSync(file, 'utf8');
      const line = '(ctx.segments.dirtySeq[segment] ?? 0) < ctx.dirtyTail.seq;';
      assert.equal(text.split(line).length - 1, 1, 'the line mutant h patches is in the source');
      fs.writeFileSync(file, text.replace(line, '(ctx.segments.dirtySeq[segment] ?? 0) < ctx.dirtyTail.seq ;'));
      const { status, output } = check(['--root', copy]);
      assert.equal(status, 1, output);
      assert.match(output, /^mutant h \(.*\): its text occurs 0 times in src\/cache\/cache_read_gather\.ts/m);
      assert.doesNotMatch(output, /^mutant [a-gi-j] /m, 'only the changed mutant is reported');
    } finally {
      fs.rmSync(copy, { recursive: true, force: true });
    }
  });
});
