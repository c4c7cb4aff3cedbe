// The deep crash run, outside `npm test`:
//   npm run test:crash:deep -- [--states N] [--minutes M] [--jobs J] [--ops K] [--shards S] [--chunk C]
//                              [--first-seed S0] [--first-chunk F] [--skip-chunks I,J,...]
// Runs the crash simulator in chunks, each a `run_crash.js` process, J at once, until N crash
// states (default 10^7) or M minutes (default: no limit). Most chunks are slices of the
// exhaustive enumeration of every workload of up to K operations (default 5: about 814,000
// workloads, some 60 million crash states per target), `--shard i/S` of it, for the default
// target, data CRC with gc_percent 70, and the aged bases; the rest are randomized chunks of
// C states (default 2,000; the default and pressure profiles, data CRC), and the full-cache
// base's two-operation workloads. Exhaustive states of a fresh cache cost about 3.5 ms of CPU
// each (docs/testing.md, "What a crash state costs"); randomized ones (long histories,
// megabytes read after each recovery) four to twenty times more, so a run made of randomized
// chunks alone (as this script used to be) cannot reach 10^7 states in a day.
// Prints one line per chunk and a summary (states, violations, wall time, states per second, and
// states per CPU second, which on a shared machine is the figure that says what a state costs);
// every violation line of a chunk is printed with its replay command. Exits 1 if any chunk
// found a violation. A chunk cut short by --minutes is stopped and its states are not counted.
// Chunk k of the cycle is a function of k and the options alone (its slice of its
// configuration's enumeration, or seeds first-seed + 1000 k on), so a run with the same options
// explores the same states, and --first-chunk F with --skip-chunks LIST (the chunks at or above
// F that an earlier run completed) resumes one without counting a chunk twice. The summary
// prints that resume command; SIGINT or SIGTERM stops the chunks running (not counted) and
// prints the summary too, so a run may be stopped at any time and resumed.
import { spawn } from 'node:child_process';
import { clearTimeout, setTimeout } from 'node:timers';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    states: { type: 'string', default: '10000000' },
    minutes: { type: 'string' },
    jobs: { type: 'string', default: '2' },
    ops: { type: 'string', default: '5' },
    shards: { type: 'string', default: '3000' },
    chunk: { type: 'string', default: '2000' },
    'first-seed': { type: 'string', default: '100000' },
    'first-chunk': { type: 'string', default: '0' },
    'skip-chunks': { type: 'string', default: '' },
  },
});
const skipChunks = new Set(values['skip-chunks'] === '' ? [] : values['skip-chunks'].split(',').map(Number));
for (const index of skipChunks) {
  if (!Number.isSafeInteger(index) || index < 0) {
    console.error('--skip-chunks takes chunk numbers separated by commas');
    process.exit(2);
  }
}
const statesWanted = Number(values.states);
const deadlineMs = values.minutes === undefined ? Number.POSITIVE_INFINITY : Date.now() + Number(values.minutes) * 60_000;
const jobs = Number(values.jobs);
const ops = Number(values.ops);
const shards = Number(values.shards);
const chunkStates = Number(values.chunk);
for (const [name, value] of [['states', statesWanted], ['jobs', jobs], ['ops', ops], ['shards', shards], ['chunk', chunkStates]]) {
  if (!Number.isSafeInteger(value) || value < 1) {
    console.error(`--${name} takes a positive integer`);
    process.exit(2);
  }
}

/**
 * What chunks cycle through: each configuration `times` times per cycle (spread over it), so
 * the cheap exhaustive slices of small systems (about 300 states per CPU second) carry most
 * of the states, and the costly ones (the `stranded` and `log-end` bases, about 120; randomized
 * chunks, 15 to 90; the full-cache base, a few) get a share without setting the pace.
 * `exhaustive` configurations take the next slice of their enumeration, `randomized` ones the
 * next seeds. The full-cache base (every recovery replays two segments of ksets) enumerates
 * workloads of up to two operations, in 64 slices.
 */
const weighted = [
  { times: 12, kind: 'exhaustive', args: [] },
  { times: 5, kind: 'exhaustive', args: ['--data-crc', '--gc-percent', '70'] },
  { times: 2, kind: 'exhaustive', args: ['--base', 'divergent-tails'] },
  { times: 1, kind: 'exhaustive', args: ['--base', 'stranded'] },
  { times: 1, kind: 'exhaustive', args: ['--base', 'log-end'] },
  { times: 1, kind: 'randomized', args: [] },
  { times: 1, kind: 'randomized', args: ['--profile', 'pressure'] },
  { times: 1, kind: 'randomized', args: ['--data-crc', '--gc-percent', '70'] },
  { times: 1, kind: 'exhaustive', args: ['--base', 'log-full', '--no-recovery-crashes'], ops: 2, shards: 64 },
];
/** The cycle: round-robin over the configurations until each has had its `times`. */
const configurations = [];
for (let turn = 0; configurations.length < weighted.reduce((sum, c) => sum + c.times, 0); turn += 1) {
  for (const configuration of weighted) if (turn < configuration.times) configurations.push(configuration);
}

const started = Date.now();
let nextChunk = Number(values['first-chunk']);
let states = 0;
let violations = 0;
let chunksDone = 0;
let cpuSeconds = 0;
const running = new Set();
/** Chunks completed in this run (counted), and those started but stopped (not counted). */
const completed = new Set();
const stopped = new Set();
const children = new Set();
let stopping = false;

/** The run_crash.js arguments of chunk `index`, or undefined once its configuration's enumeration is used up. */
function chunkArgs(index) {
  const configuration = configurations[index % configurations.length];
  const round = Math.floor(index / configurations.length);
  if (configuration.kind === 'randomized') {
    return ['--states', String(chunkStates), '--seed', String(Number(values['first-seed']) + index * 1000), ...configuration.args];
  }
  // A configuration that appears several times in the cycle takes its slices in turn.
  const turn = configurations.slice(0, index % configurations.length).filter((c) => c === configuration).length;
  const shardCount = configuration.shards ?? shards;
  const shard = round * configuration.times + turn;
  if (shard >= shardCount) return undefined;
  return ['--mode', 'exhaustive', '--ops', String(configuration.ops ?? ops), '--shard', `${shard}/${shardCount}`, ...configuration.args];
}

function runChunk(index, args) {
  const child = spawn(process.execPath, ['dist/test/cache/crash/run_crash.js', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  let output = '';
  child.stdout.on('data', (data) => { output += data; });
  child.stderr.on('data', (data) => { output += data; });
  const timer = Number.isFinite(deadlineMs) ? setTimeout(() => child.kill('SIGTERM'), Math.max(0, deadlineMs - Date.now())) : undefined;
  const done = new Promise((resolve) => {
    child.on('close', (code, signal) => {
      if (timer !== undefined) clearTimeout(timer);
      children.delete(child);
      const summary = /crash run: (\d+) crash states explored, (\d+) violations, \d+ s, ([\d.]+) s of CPU/.exec(output);
      const label = `chunk ${index} (${args.join(' ')})`;
      if (signal !== null || summary === null) {
        stopped.add(index);
        console.log(`${label}: stopped (${signal ?? `exit ${code}`}), not counted`);
      } else {
        completed.add(index);
        states += Number(summary[1]);
        violations += Number(summary[2]);
        chunksDone += 1;
        cpuSeconds += Number(summary[3]);
        const seconds = (Date.now() - started) / 1000;
        console.log(`${label}: ${summary[1]} states in ${summary[3]} s of CPU, ${summary[2]} violations; total ${states} states (${Math.round(seconds)} s, ${Math.round(states / seconds)} states/s)`);
        if (Number(summary[2]) > 0) for (const line of output.split('\n')) if (line.startsWith('VIOLATION') || line.includes('replay:')) console.log(`  ${line.trim()}`);
      }
      resolve();
    });
  });
  running.add(done);
  void done.then(() => running.delete(done));
}

// Chunks whose enumeration is used up are skipped; the cycle ends when every configuration is.
let exhaustedInARow = 0;
// A stop signal ends the chunks running (they are not counted) and then the run, with its summary.
for (const name of ['SIGINT', 'SIGTERM']) {
  process.on(name, () => {
    stopping = true;
    for (const child of children) child.kill('SIGTERM');
  });
}
while (!stopping && states < statesWanted && Date.now() < deadlineMs && exhaustedInARow < configurations.length) {
  while (!stopping && running.size < jobs && Date.now() < deadlineMs && exhaustedInARow < configurations.length) {
    const index = nextChunk++;
    if (skipChunks.has(index)) continue;
    const args = chunkArgs(index);
    if (args === undefined) {
      exhaustedInARow += 1;
      continue;
    }
    exhaustedInARow = 0;
    runChunk(index, args);
  }
  if (running.size === 0) break;
  await Promise.race(running);
}
await Promise.all(running);
const seconds = (Date.now() - started) / 1000;
// States per CPU second: what the run would reach on a machine of its own (times the jobs, up to the cores).
const perCpuSecond = cpuSeconds > 0 ? states / cpuSeconds : 0;
console.log(`deep crash run: ${states} crash states in ${chunksDone} chunks, ${violations} violations, ${Math.round(seconds)} s, ${Math.round(states / seconds)} states/s with ${jobs} jobs; ` +
  `${Math.round(cpuSeconds)} s of CPU in the chunks counted, ${Math.round(perCpuSecond)} states per CPU second; next chunk ${nextChunk}`);
// Where a later run picks up: the first chunk not completed, skipping those above it that were.
let resumeAt = Number(values['first-chunk']);
while (completed.has(resumeAt) || skipChunks.has(resumeAt)) resumeAt += 1;
const resumeSkips = [...new Set([...completed, ...skipChunks])].filter((index) => index > resumeAt).sort((a, b) => a - b);
const options = ['--jobs', values.jobs, '--ops', values.ops, '--shards', values.shards, '--chunk', values.chunk, '--first-seed', values['first-seed']];
console.log(`chunks completed: ${[...completed].sort((a, b) => a - b).join(',') || 'none'}; stopped, not counted: ${[...stopped].sort((a, b) => a - b).join(',') || 'none'}`);
console.log(`resume: node scripts/crash_deep.mjs ${options.join(' ')} --states ${Math.max(1, statesWanted - states)} --first-chunk ${resumeAt}` +
  `${resumeSkips.length > 0 ? ` --skip-chunks ${resumeSkips.join(',')}` : ''} [--minutes M]`);
process.exit(violations > 0 ? 1 : 0);
