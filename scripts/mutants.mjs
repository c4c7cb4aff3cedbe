// Is the crash simulator a net? Puts small, plausible bugs into crash-critical code, one at a
// time, each in its own copy of the tree, builds the copy, runs the crash simulator's test
// files there (the ones `npm test` runs; for a mutant that names its own files, those) and
// reports each bug as caught (a test failed) or survived (every one passed). Not part of `npm
// test` (only --check is): each survivor costs a whole crash tier (about ten minutes); a caught
// bug usually fails within seconds.
//
// Usage: node scripts/mutants.mjs [--only a,b,...] [--tests file,file,...] [--keep] [--control] [--check] [--root DIR]
//   --only     the mutants to run (ids below; default all)
//   --tests    test files under test/ to run in each copy (default: the mutant's own list if it
//              has one, else the crash tier, kill test excluded)
//   --control  also run the unmutated copy first, on every file the chosen mutants run (it must
//              pass, or the verdicts mean nothing)
//   --keep     keep the copies (under $TMPDIR/pcache-mutants-*) to look at afterwards
//   --check    only check that every chosen mutant still applies (its text occurs once in its
//              file, its test files exist) and exit: 0 if all do, 1 if not (`npm test` runs this)
//   --root     the tree to mutate (default: this repository)
// Prints one line per mutant and a summary; exits 1 if any mutant survived.
//
// Each mutant is a text substitution that must match exactly once in its file, so a change to
// the code it patches fails loudly here instead of silently testing nothing.
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

/** The five bugs of issue 19 that the crash simulator used to miss (a-e), and issue 16's (f-j). */
const mutants = [
  {
    id: 'a',
    name: 'CacheDev.writeGen writes the generation record over its newest copy',
    file: 'src/cache/cache_dev.ts',
    find: 'target: (): { index: 0 | 1; seq: number } => ({ index: this.genLatestIndex[segment] === 0 ? 1 : 0,',
    replace: 'target: (): { index: 0 | 1; seq: number } => ({ index: this.genLatestIndex[segment] === 1 ? 1 : 0,',
  },
  {
    id: 'b',
    name: 'SegmentTable.allocate hands out a free segment without bumping its generation',
    file: 'src/cache/cache_segment.ts',
    // (The hit count reset after it came with the second chance's skipping of unread segments.)
    find: '    this.kind[segment] = kind;\n    this.gen[segment] = (this.gen[segment] ?? 0) + 1;\n    this.hit[segment] = 0;',
    replace: '    this.kind[segment] = kind;\n    this.hit[segment] = 0;',
  },
  {
    id: 'c',
    name: 'a kset with a wrong CRC is accepted',
    file: 'src/ondisk/kset.ts',
    // (crcCheckedKsetSize: the CRC check decodeKset and the checker's generation scan share.)
    find: '  if (stored !== computed) return `kset CRC mismatch',
    replace: '  if (stored !== computed && stored === 0) return `kset CRC mismatch',
  },
  {
    id: 'd',
    name: 'GC frees segments before key_tail is durable',
    file: 'src/cache/cache_gc.ts',
    // The log segments GC passed are freed before the key_tail that leaves them is durable.
    // (Since GC re-logs data read since it was stored, the data segments' references go
    // later, in relogAndPut; freeing the log segments early is the bug a crash exposes.)
    find: [
      '      await ctx.dev.writeKeyTail({ segment: pos.segment, offsetBytes: pos.offsetBytes, seq: pos.seq, durableSeq: ctx.logDurableSeq });',
      '      await ctx.dev.sync();',
      '      if (ctx.stopped()) return \'nothing\';',
      '      ctx.keyTail = pos;',
      '      let freed = 0;',
      '      for (const segment of leftLogSegments) {',
      '        ctx.segments.free(segment);',
      '        freed++;',
      '      }',
    ].join('\n'),
    replace: [
      '      let freed = 0;',
      '      for (const segment of leftLogSegments) {',
      '        ctx.segments.free(segment);',
      '        freed++;',
      '      }',
      '      await ctx.dev.writeKeyTail({ segment: pos.segment, offsetBytes: pos.offsetBytes, seq: pos.seq, durableSeq: ctx.logDurableSeq });',
      '      await ctx.dev.sync();',
      '      if (ctx.stopped()) return \'nothing\';',
      '      ctx.keyTail = pos;',
    ].join('\n'),
  },
  {
    id: 'e',
    name: 'an EMPTY placeholder is served as a hit (its range read from the cache device)',
    file: 'src/cache/cache_read.ts',
    find: '      if ((flags & keyFlagEmpty) !== 0) {\n        this.addMiss(walk, target, request, position, pieceEnd, false);\n      } else if ((flags & keyFlagZero) !== 0) {',
    replace: '      if ((flags & keyFlagZero) !== 0) {',
  },
  // Issue 16's writeback and read shortcuts: each trades work for an argument about ordering
  // or durability, and a bug in one would lose data only in some crash or some interleaving.
  {
    id: 'f',
    name: 'strict writeback skips superseded data across an EPOCH_END',
    file: 'src/cache/cache_writeback.ts',
    tests: ['cache/crash/crash_absorb.test.ts', 'cache/crash/crash_rewrite.test.ts'],
    find: "    return this.ctx.tuning.writebackOrdering === 'relaxed' || this.log.lastEpochEndSeq < start.seq;",
    replace: "    return this.ctx.tuning.writebackOrdering === 'relaxed' || this.log.lastEpochEndSeq < start.seq || start.seq >= 0;",
  },
  {
    id: 'g',
    name: 'writeback skips superseded data without first making the newer keys durable',
    file: 'src/cache/cache_writeback.ts',
    tests: ['cache/crash/crash_absorb.test.ts', 'cache/crash/crash_rewrite.test.ts'],
    find: '      const committed = plan.skippedBytes > 0 ? this.log.commitAppended() : undefined;',
    replace: '      const committed = plan.skippedBytes < 0 ? this.log.commitAppended() : undefined;',
  },
  {
    id: 'h',
    name: 'a fragmented read takes a piece in the kset at dirty_tail for written back (gathers stale backing data)',
    file: 'src/cache/cache_read_gather.ts',
    // A read bug, not a crash bug: the tests of the gather rule and the engine's model test.
    tests: ['cache/cache_read_gather.test.ts', 'cache/cache_model.test.ts'],
    find: '  return (flags & keyFlagClean) !== 0 || (ctx.segments.dirtySeq[segment] ?? 0) < ctx.dirtyTail.seq;',
    replace: '  return (flags & keyFlagClean) !== 0 || (ctx.segments.dirtySeq[segment] ?? 0) <= ctx.dirtyTail.seq;',
  },
  {
    id: 'i',
    name: 'a strict writeback round runs past an EPOCH_END',
    file: 'src/cache/cache_writeback.ts',
    tests: ['cache/crash/crash_absorb.test.ts', 'cache/crash/crash_rewrite.test.ts'],
    find: "stopAtEpochEnd: ctx.tuning.writebackOrdering === 'strict'",
    replace: 'stopAtEpochEnd: false',
  },
  {
    id: 'j',
    name: 'a gathered read copies an overlay piece from its segment after GC freed it',
    file: 'src/cache/cache_read_gather.ts',
    tests: ['cache/cache_read_gather.test.ts', 'cache/cache_model.test.ts', 'cache/crash/crash_more.test.ts'],
    find: '    else if (ctx.segments.genLow32(piece.segment) !== piece.genLow32) (reads ??= []).push(ctx.backing.read(part, piece.offsetBytes));',
    replace: '    else if (ctx.segments.genLow32(piece.segment) !== piece.genLow32 && piece.zero) (reads ??= []).push(ctx.backing.read(part, piece.offsetBytes));',
  },
];

/** The crash tier, the quickest files first (a caught mutant stops at the first failing file). */
const defaultTests = ['cache/crash/crash_gc.test.ts', 'cache/crash/crash_aged.test.ts', 'cache/crash/crash_more.test.ts', 'cache/crash/crash_exhaustive.test.ts'];

const { values } = parseArgs({
  options: {
    only: { type: 'string' },
    tests: { type: 'string' },
    keep: { type: 'boolean', default: false },
    control: { type: 'boolean', default: false },
    check: { type: 'boolean', default: false },
    root: { type: 'string' },
  },
});
const root = resolve(values.root ?? join(import.meta.dirname, '..'));
const chosen = values.only === undefined ? mutants : values.only.split(',').map((id) => {
  const mutant = mutants.find((m) => m.id === id);
  if (mutant === undefined) {
    console.error(`no mutant "${id}" (known: ${mutants.map((m) => m.id).join(', ')})`);
    process.exit(2);
  }
  return mutant;
});
/** The test files a mutant runs against: --tests, else its own list, else the crash tier. */
const testsFor = (mutant) => values.tests?.split(',') ?? mutant?.tests ?? defaultTests;
/** Every file some chosen mutant runs, in first-use order (what the control copy runs). */
const allTests = [...new Set(chosen.flatMap((mutant) => testsFor(mutant)))];

/** How many times `mutant`'s text occurs in its file under `tree` (it applies when exactly once). */
function occurrences(mutant, tree) {
  const path = join(tree, mutant.file);
  return existsSync(path) ? readFileSync(path, 'utf8').split(mutant.find).length - 1 : 0;
}

if (values.check) {
  const problems = [];
  for (const mutant of chosen) {
    const count = occurrences(mutant, root);
    if (count !== 1) problems.push(`mutant ${mutant.id} (${mutant.name}): its text occurs ${count} times in ${mutant.file} (must be once)`);
    for (const test of testsFor(mutant)) if (!existsSync(join(root, 'test', test))) problems.push(`mutant ${mutant.id}: no test file test/${test}`);
  }
  for (const problem of problems) console.log(problem);
  console.log(problems.length === 0 ? `${chosen.length} mutants apply: ${chosen.map((m) => m.id).join(', ')}` : 'update scripts/mutants.mjs');
  process.exit(problems.length === 0 ? 0 : 1);
}

for (const test of allTests) {
  if (!existsSync(join(root, 'test', test))) {
    console.error(`no test file test/${test}`);
    process.exit(2);
  }
}

/** A copy of the tree's sources with node_modules linked, `mutant` applied (if any). */
function makeCopy(mutant) {
  const dir = mkdtempSync(join(tmpdir(), `pcache-mutants-${mutant?.id ?? 'control'}-`));
  for (const entry of ['src', 'sim', 'test', 'bench', 'scripts', 'tsconfig.json', 'package.json']) cpSync(join(root, entry), join(dir, entry), { recursive: true });
  symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'));
  if (mutant !== undefined) {
    const count = occurrences(mutant, dir);
    if (count !== 1) throw new Error(`mutant ${mutant.id}: the text to replace occurs ${count} times in ${mutant.file} (must be once); update scripts/mutants.mjs`);
    const path = join(dir, mutant.file);
    writeFileSync(path, readFileSync(path, 'utf8').replace(mutant.find, mutant.replace));
  }
  return dir;
}

function build(dir) {
  const result = spawnSync(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.json'], { cwd: dir, encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`build failed in ${dir}:\n${result.stdout}${result.stderr}`);
}

/** Runs the test files one after another; stops at the first that fails. */
function runTests(dir, label, tests) {
  for (const test of tests) {
    const started = performance.now();
    const file = join('dist/test', test.replace(/\.ts$/, '.js'));
    // TAP: the suites' log lines (VIOLATION ...) come through as comments.
    const result = spawnSync(process.execPath, ['--test', '--test-reporter=tap', file], { cwd: dir, encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 });
    const seconds = Math.round((performance.now() - started) / 1000);
    const output = `${result.stdout}${result.stderr}`;
    if (result.status !== 0) {
      const first = output.split('\n').find((line) => line.includes('VIOLATION')) ?? output.split('\n').find((line) => /not ok|Error/.test(line)) ?? '(no violation line)';
      return { caught: true, by: test, seconds, first: first.replace(/^#\s*/, '').trim() };
    }
    console.log(`  ${label}: ${test} passed (${seconds} s)`);
  }
  return { caught: false };
}

const results = [];
if (values.control) {
  const dir = makeCopy(undefined);
  try {
    build(dir);
    const outcome = runTests(dir, 'control', allTests);
    if (outcome.caught) {
      console.log(`control: FAILED in ${outcome.by}: ${outcome.first}`);
      process.exit(1);
    }
    console.log('control: passed');
  } finally {
    if (!values.keep) rmSync(dir, { recursive: true, force: true });
  }
}
for (const mutant of chosen) {
  const started = performance.now();
  const dir = makeCopy(mutant);
  try {
    build(dir);
    const outcome = runTests(dir, mutant.id, testsFor(mutant));
    const seconds = Math.round((performance.now() - started) / 1000);
    const verdict = outcome.caught ? `caught by ${outcome.by} in ${seconds} s: ${outcome.first}` : `SURVIVED (${seconds} s)`;
    console.log(`mutant ${mutant.id} (${mutant.name}): ${verdict}`);
    results.push({ ...mutant, ...outcome });
  } finally {
    if (!values.keep) rmSync(dir, { recursive: true, force: true });
  }
}
const survived = results.filter((r) => !r.caught);
console.log(`${results.length - survived.length} of ${results.length} mutants caught${survived.length > 0 ? `; survived: ${survived.map((r) => r.id).join(', ')}` : ''}`);
process.exit(survived.length > 0 ? 1 : 0);
