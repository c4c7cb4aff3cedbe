// The deep crash run, outside `npm test`: `npm run test:crash:deep -- [--states N] [--minutes M] [--jobs J]`.
// Runs the randomized crash simulator in chunks of --chunk states (default 20,000), each chunk a
// `run_crash.js` process with its own seeds and one of the configurations below in turn (the
// default and pressure profiles, the aged bases, data CRC and gc_percent 70), J processes at
// once, until N crash states (default 10^7) or M minutes (default: no limit). Prints one line
// per chunk and a summary (states, violations, wall time, states per second); every violation
// line of a chunk is printed with its replay command. Exits 1 if any chunk found a violation.
// A chunk cut short by --minutes is stopped and its states are not counted.
import { spawn } from 'node:child_process';
import { clearTimeout, setTimeout } from 'node:timers';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    states: { type: 'string', default: '10000000' },
    minutes: { type: 'string' },
    jobs: { type: 'string', default: '2' },
    chunk: { type: 'string', default: '20000' },
    'first-seed': { type: 'string', default: '100000' },
  },
});
const statesWanted = Number(values.states);
const deadlineMs = values.minutes === undefined ? Number.POSITIVE_INFINITY : Date.now() + Number(values.minutes) * 60_000;
const jobs = Number(values.jobs);
const chunkStates = Number(values.chunk);

/** The configurations chunks cycle through (run_crash.js options). */
const configurations = [
  [],
  ['--profile', 'pressure'],
  ['--base', 'stranded'],
  ['--data-crc', '--gc-percent', '70'],
  ['--base', 'log-end'],
  ['--profile', 'pressure', '--data-crc'],
  ['--base', 'divergent-tails'],
];

const started = Date.now();
let nextChunk = 0;
let states = 0;
let violations = 0;
let chunksDone = 0;
const running = new Set();

function runChunk(index) {
  const options = configurations[index % configurations.length];
  const seed = Number(values['first-seed']) + index * 1000;
  const args = ['dist/test/cache/crash/run_crash.js', '--states', String(chunkStates), '--seed', String(seed), ...options];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (data) => { output += data; });
  child.stderr.on('data', (data) => { output += data; });
  const timer = Number.isFinite(deadlineMs) ? setTimeout(() => child.kill('SIGTERM'), Math.max(0, deadlineMs - Date.now())) : undefined;
  const done = new Promise((resolve) => {
    child.on('close', (code, signal) => {
      if (timer !== undefined) clearTimeout(timer);
      const summary = /crash run: (\d+) crash states explored, (\d+) violations/.exec(output);
      const label = `chunk ${index} (seed ${seed}${options.length > 0 ? ` ${options.join(' ')}` : ''})`;
      if (signal !== null || summary === null) {
        console.log(`${label}: stopped (${signal ?? `exit ${code}`}), not counted`);
      } else {
        states += Number(summary[1]);
        violations += Number(summary[2]);
        chunksDone += 1;
        console.log(`${label}: ${summary[1]} states, ${summary[2]} violations; total ${states} states (${Math.round((Date.now() - started) / 1000)} s)`);
        if (Number(summary[2]) > 0) for (const line of output.split('\n')) if (line.startsWith('VIOLATION') || line.includes('replay:')) console.log(`  ${line.trim()}`);
      }
      resolve();
    });
  });
  running.add(done);
  void done.then(() => running.delete(done));
}

while (states < statesWanted && Date.now() < deadlineMs) {
  while (running.size < jobs && states + running.size * chunkStates < statesWanted && Date.now() < deadlineMs) runChunk(nextChunk++);
  if (running.size === 0) break;
  await Promise.race(running);
}
await Promise.all(running);
const seconds = (Date.now() - started) / 1000;
console.log(`deep crash run: ${states} crash states in ${chunksDone} chunks, ${violations} violations, ${Math.round(seconds)} s, ${Math.round(states / seconds)} states/s with ${jobs} jobs`);
process.exit(violations > 0 ? 1 : 0);
