// Runs the compiled test files under dist/test with node's built-in test runner.
// Usage: node scripts/run_tests.mjs [folder under test/ ...]   (default: every folder)
// Each test file runs in its own process; files run one after another or in parallel as
// node decides for this machine. The exit status is the runner's.
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';

const root = 'dist/test';
const folders = process.argv.slice(2);
const starts = folders.length > 0 ? folders.map((f) => join(root, f)) : [root];

function collect(path, out) {
  if (statSync(path).isDirectory()) {
    for (const entry of readdirSync(path).sort()) collect(join(path, entry), out);
  } else if (path.endsWith('.test.js')) {
    out.push(path);
  }
  return out;
}

const files = starts.flatMap((start) => collect(start, []));
if (files.length === 0) {
  console.error(`no test files under ${starts.join(', ')}`);
  process.exit(1);
}
const result = spawnSync(process.execPath, ['--test', '--test-reporter=spec', ...files], { stdio: 'inherit' });
process.exit(result.status ?? 1);
