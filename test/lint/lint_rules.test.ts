// The lint rules catch what they promise (eslint.config.js): an import cycle, type-only imports
// included (pcache/no-import-cycle, scripts/eslint_import_cycles.mjs), and a layer of src/
// importing one it must not (no-restricted-imports: src/nbd never imports the cache); and a
// clean file gets no message at all, so the rules do not fire on everything either.
//
// ESLint's Node API lints files written for the test under src/ (unique names, removed in a
// finally), so the repository's own configuration applies to them as to any source file.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ESLint } from 'eslint';

const repoRoot = fileURLToPath(new URL('../../../', import.meta.url));
const unique = `lint_probe_${process.pid}_${Date.now().toString(36)}`;

/** Writes `files` (path under the repository -> text), lints them all at once, and removes them whatever happens. */
async function lintProbes(files: Readonly<Record<string, string>>): Promise<Map<string, ESLint.LintResult>> {
  const paths = Object.keys(files).map((file) => path.join(repoRoot, file));
  try {
    for (const [file, text] of Object.entries(files)) fs.writeFileSync(path.join(repoRoot, file), text, { flag: 'wx' });
    const eslint = new ESLint({ cwd: repoRoot });
    const results = await eslint.lintFiles(paths);
    return new Map(results.map((result) => [path.relative(repoRoot, result.filePath), result]));
  } finally {
    for (const file of paths) fs.rmSync(file, { force: true });
  }
}

/** The rule ids of the errors in one file's result, with their messages for a failure. */
function errorsOf(results: Map<string, ESLint.LintResult>, file: string): { rules: string[]; text: string } {
  const result = results.get(file);
  assert.ok(result !== undefined, `${file} was linted`);
  const errors = result.messages.filter((message) => message.severity === 2);
  return { rules: errors.map((message) => message.ruleId ?? 'fatal'), text: errors.map((message) => `${message.ruleId ?? 'fatal'}: ${message.message}`).join('\n') };
}

describe('lint rules', () => {
  it('pcache/no-import-cycle: two modules importing each other\'s types are an error in both', async () => {
    const a = `src/lib/${unique}_a.ts`;
    const b = `src/lib/${unique}_b.ts`;
    const results = await lintProbes({
      [a]: `import type { ProbeB } from './${unique}_b.js';\n\nexport interface ProbeA {\n  readonly b?: ProbeB;\n}\n`,
      [b]: `import type { ProbeA } from './${unique}_a.js';\n\nexport interface ProbeB {\n  readonly a?: ProbeA;\n}\n`,
    });
    for (const file of [a, b]) {
      const { rules, text } = errorsOf(results, file);
      assert.deepEqual(rules, ['pcache/no-import-cycle'], `${file}:\n${text}`);
      assert.match(text, new RegExp(`import cycle: ${file.replace(/[.]/g, '\\.')} -> `), text);
    }
  });

  it('no-restricted-imports: a module of src/nbd importing the cache is an error', async () => {
    const probe = `src/nbd/server/${unique}.ts`;
    const results = await lintProbes({
      [probe]: `import type { Cache } from '../../cache/cache.js';\n\nexport type ProbeCache = Cache;\n`,
    });
    const { rules, text } = errorsOf(results, probe);
    assert.deepEqual(rules, ['no-restricted-imports'], text);
    assert.match(text, /'\.\.\/\.\.\/cache\/cache\.js' import is restricted/, text);
  });

  it('a clean module gets no message', async () => {
    const probe = `src/lib/${unique}_clean.ts`;
    const results = await lintProbes({
      [probe]: `import { KiB } from './units.js';\n\n/** Two KiB. */\nexport const probeBytes = 2 * KiB;\n`,
    });
    const result = results.get(probe);
    assert.ok(result !== undefined, `${probe} was linted`);
    assert.deepEqual(result.messages.map((message) => `${message.ruleId ?? 'fatal'}: ${message.message}`), []);
  });
});
