// Runs the compiled test files under dist/test with node's built-in test runner.
// Usage: node scripts/run_tests.mjs [--exclude PATH ...] [PATH under test/ ...]   (default: every folder)
// A PATH is a folder (its subfolders included: `nbd` runs nbd/protocol, nbd/server and
// nbd/client) or one test file (`cache/cache_model.test.ts`, or its compiled .js name).
// `--exclude PATH` leaves out a folder or file below the ones given. Each test file runs in its
// own process; files run one after another or in parallel as node decides for this machine.
// The exit status is the runner's.
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';

const root = 'dist/test';
/** A path under test/ as it is under dist/test (sources end in .ts, compiled files in .js). */
const compiled = (path) => join(root, path.replace(/\.ts$/, '.js'));

const folders = [];
const excluded = [];
const args = process.argv.slice(2);
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--exclude') {
    const path = args[++i];
    if (path === undefined) {
      console.error('--exclude needs a folder or file under test/');
      process.exit(2);
    }
    excluded.push(compiled(path));
  } else {
    folders.push(args[i]);
  }
}
const starts = folders.length > 0 ? folders.map(compiled) : [root];
for (const path of [...starts, ...excluded]) {
  if (!existsSync(path)) {
    console.error(`${path} does not exist (run npm run build first; paths are relative to test/)`);
    process.exit(2);
  }
}

const isExcluded = (path) => excluded.some((skip) => path === skip || path.startsWith(`${skip}/`));

function collect(path, out) {
  if (isExcluded(path)) return out;
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
