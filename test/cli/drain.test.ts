// `pcache drain` on a real server holding a large dirty set:
// - status answers in under 100 ms throughout the drain of 1 GiB, says 'draining', and shows
//   dirty bytes going down; `--progress` prints bar lines with a percentage, bytes left, a rate
//   and the time left; the drain returns "drained in ..." and the backing file then holds
//   exactly what was written. A drain with an answer of 100 ms or more is measured again, once,
//   on 1 GiB of new data: on a machine busy with other work the scheduler alone can hold a
//   process that long now and then, while a status that waits for the drain is slow every time;
// - Ctrl-C (SIGINT) stops the waiting client with status 130 and harms nothing: the server's
//   drain goes on and finishes, and the backing file holds exactly what was written.
//
// Everything is kept dirty until the drain (writeback watermarks at 100%, idle and age rules
// off). The backing file sits behind nbdkit's rate filter, so that a drain takes seconds on any
// machine, as it would to a real disk. The data sets live in /dev/shm when it has room
// (memory; this needs about 4 GiB). Tools (Debian packages): libnbd-bin (nbdcopy), nbdkit.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { GiB, MiB } from '../../src/lib/units.js';
import { assertFilesEqual, scratchDir, writeRandomFile } from '../helpers/files.js';
import { Nbdkit } from '../helpers/nbdkit.js';
import { type Child, controlStatus, logLines, type ServeProcess, startCli, startServe } from '../helpers/pcache.js';
import { nbdcopy, requireTool, uriFor } from '../helpers/tools.js';
import { sleep, waitUntil } from '../helpers/wait.js';

/** Writeback only when asked: everything written stays dirty until the drain. */
const keepDirty = 'writeback_start_percent=100,writeback_stop_percent=100,writeback_idle_ms=2147483647,writeback_max_age_ms=2147483647,sequential_cutoff_bytes=0';
const statusLatencyLimitMs = 100;

/** The median of some numbers (the upper one of the middle two). */
function median(values: readonly number[]): number {
  const sorted = [...values].sort((x, y) => x - y);
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN;
}

interface Rig {
  readonly dir: string;
  readonly socket: string;
  readonly control: string;
  readonly server: ServeProcess;
  /** The data written through pcache (from offset 0). */
  readonly source: string;
}

/** Serves `backing` (a file, or an NBD URI) through a cache of `cacheSize`, and writes `dataBytes` of random data through it. */
async function dirtyRig(t: TestContext, dir: string, backing: string, cacheSize: string, dataBytes: number): Promise<Rig> {
  const socket = path.join(dir, 'nbd.sock');
  const control = path.join(dir, 'control.sock');
  const server = await startServe(t, ['--cache', path.join(dir, 'cache.img'), '--cache-size', cacheSize, '--backing', backing, '--socket', socket, '--control', control, '--tuning', keepDirty], dir);
  const rig = { dir, socket, control, server, source: path.join(dir, 'source.bin') };
  await fill(rig, dataBytes);
  return rig;
}

/** Writes `dataBytes` of new random data through pcache from offset 0 (rig.source holds it); all of it stays dirty. */
async function fill(rig: Rig, dataBytes: number): Promise<void> {
  writeRandomFile(rig.source, dataBytes);
  // 256 KiB requests: a kset (128 keys) covers 32 MiB, a writeback round (16 ksets) 512 MiB,
  // and dirty bytes go down round by round.
  await nbdcopy(['-C', '4', '--request-size=262144', rig.source, uriFor(rig.socket)], 180_000);
  const status = await controlStatus(rig.control);
  assert.equal(status.cache.state, 'running');
  assert.ok(status.cache.dirtyBytes >= dataBytes, `everything written is dirty: ${status.cache.dirtyBytes} of ${dataBytes} bytes`);
}

interface DrainRun {
  readonly drain: Child;
  readonly samples: readonly { readonly latencyMs: number; readonly state: string; readonly dirtyBytes: number }[];
  readonly maxMs: number;
  /** Count, duration, max and median latency, and the machine's load, for messages. */
  readonly facts: string;
}

/** Runs `pcache drain --progress` and asks for the status over the control socket, again and again, until it returns. */
async function drainWhileAsking(t: TestContext, control: string): Promise<DrainRun> {
  const drain = startCli(t, ['drain', '--control', control, '--progress']);
  const startedMs = performance.now();
  const samples: { latencyMs: number; state: string; dirtyBytes: number }[] = [];
  while (drain.running) {
    const sentMs = performance.now();
    const status = await controlStatus(control);
    samples.push({ latencyMs: performance.now() - sentMs, state: status.cache.state, dirtyBytes: status.cache.dirtyBytes });
    await sleep(10);
  }
  const drainMs = performance.now() - startedMs;
  const exit = await drain.wait();
  assert.equal(exit.code, 0, drain.stderr);
  assert.match(drain.stdout, /^drained in [\d.]+ s: the backing device holds everything written before the drain, synced$/m);
  const latencies = samples.map((sample) => sample.latencyMs);
  const maxMs = Math.max(...latencies);
  const facts = `${samples.length} status answers during a ${(drainMs / 1000).toFixed(1)} s drain: max ${maxMs.toFixed(1)} ms, ` +
    `median ${median(latencies).toFixed(1)} ms (load average ${os.loadavg()[0]?.toFixed(1) ?? '?'} on ${os.availableParallelism()} CPUs)`;
  t.diagnostic(facts);
  return { drain, samples, maxMs, facts };
}

/** A sparse backing file of `bytes` in `dir`, served by nbdkit through its rate filter at `rate` bits/s. */
async function rateLimitedBacking(t: TestContext, dir: string, bytes: number, rate: string): Promise<{ backing: string; kit: Nbdkit }> {
  const backing = path.join(dir, 'backing.img');
  fs.writeFileSync(backing, '');
  fs.truncateSync(backing, bytes);
  const kit = await Nbdkit.start(t, { plugin: 'file', args: [`file=${backing}`, `rate=${rate}`], filters: ['rate'] });
  return { backing, kit };
}

describe('drain of a large dirty set', () => {
  it('status answers in under 100 ms throughout the drain of 1 GiB; --progress shows bytes left, rate and time left', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    requireTool('nbdkit', 'nbdkit');
    const dataBytes = 1 * GiB;
    // The data, the backing file and the cache (written up to a little over the data).
    const dir = scratchDir(t, 3.5 * GiB, 'pcache-drain-');
    // The backing file behind a server at 200 MB/s (1600 Mbit/s, after the rate filter's 2 s
    // burst), as a real disk would be: a drain to a file in memory can take under a second.
    const { backing, kit } = await rateLimitedBacking(t, dir, dataBytes, '1600M');
    const rig = await dirtyRig(t, dir, kit.uri, '2G', dataBytes);

    let run = await drainWhileAsking(t, rig.control);
    if (run.maxMs >= statusLatencyLimitMs) {
      // One slow answer can be the scheduler on a machine busy with other work (the server
      // waits for a CPU like everyone else). A pcache that makes status wait for the drain
      // is slow every time: fill 1 GiB again and measure a second drain; that one decides.
      t.diagnostic(`the first drain had an answer at or over ${statusLatencyLimitMs} ms; measuring a second drain of 1 GiB`);
      await fill(rig, dataBytes);
      run = await drainWhileAsking(t, rig.control);
    }
    const { drain, samples, maxMs, facts } = run;
    assert.ok(samples.length >= 20, `the drain lasted long enough to ask many times: ${facts}`);
    assert.ok(maxMs < statusLatencyLimitMs, `every status answer came in under ${statusLatencyLimitMs} ms: ${facts}`);
    assert.ok(samples.some((sample) => sample.state === 'draining'), `status said 'draining': ${[...new Set(samples.map((s) => s.state))].join(', ')}`);
    const dirty = samples.map((sample) => sample.dirtyBytes);
    for (let i = 1; i < dirty.length; i++) assert.ok((dirty[i] ?? 0) <= (dirty[i - 1] ?? 0), `dirty bytes never grow during the drain: ${dirty.join(' ')}`);
    assert.ok(dirty.some((bytes) => bytes > 0 && bytes < dataBytes), `status showed the drain part done (dirty bytes between 0 and 1 GiB): ${[...new Set(dirty)].join(' ')}`);

    // --progress on a standard error that is not a terminal: one line per update.
    const lines = drain.stderr.split('\n').filter((line) => line !== '');
    const bar = /^\[[#.]{24}\] +\d{1,3}% {2}[\d.]+ (?:B|KiB|MiB|GiB) left(?: {2}[\d.]+ (?:B|KiB|MiB|GiB)\/s {2}(?:\d.* left|done|waiting for the backing device))?$/;
    for (const line of lines) assert.match(line, bar, `every line on standard error is a progress line: ${drain.stderr}`);
    assert.ok(lines.length >= 2, `progress was drawn while waiting: ${drain.stderr}`);
    // The bar measures against the first dirty count seen (on a busy machine the first status
    // can come after the first round): it starts at 0%.
    assert.match(lines[0] ?? '', /^\[\.{24}\] +0% {2}[\d.]+ (?:MiB|GiB) left/, 'it starts at 0%');
    assert.ok(lines.some((line) => /\d+% {2}[\d.]+ (?:KiB|MiB|GiB) left {2}[\d.]+ (?:KiB|MiB|GiB)\/s {2}\d+ (?:s|min \d+ s) left$/.test(line)),
      `a line with bytes left, a rate and the time left: ${drain.stderr}`);
    assert.doesNotMatch(drain.stderr, /waiting for the backing device/, 'the backing device never failed, so it was never waited for');
    assert.match(lines[lines.length - 1] ?? '', /^\[#{24}\] {2}100% {2}0 B left(?: {2}[\d.]+ \w+\/s {2}done)?$/, 'it ends at 100%');

    const after = await controlStatus(rig.control);
    assert.equal(after.cache.dirtyBytes, 0, 'nothing dirty after the drain');
    assert.equal(after.cache.state, 'running');
    assertFilesEqual(backing, rig.source, 'the backing file after the drain and the data written');
    assert.equal(await rig.server.stop(), 0, 'the server stops cleanly');
    await kit.kill('SIGTERM');
  });

  it('Ctrl-C stops waiting (status 130) and harms nothing: the server finishes the drain', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    requireTool('nbdkit', 'nbdkit');
    const dataBytes = 256 * MiB;
    const dir = scratchDir(t, 1 * GiB, 'pcache-drain-int-');
    // A backing server at 50 MB/s (400 Mbit/s; plus the rate filter's 2 s burst): the drain
    // takes a few seconds, whatever the speed of this machine.
    const { backing, kit } = await rateLimitedBacking(t, dir, dataBytes, '400M');
    const rig = await dirtyRig(t, dir, kit.uri, '512M', dataBytes);

    const drain = startCli(t, ['drain', '--control', rig.control, '--progress']);
    const startedMs = Date.now();
    await waitUntil(() => drain.stderr.includes('% '), 'the first progress line');
    await sleep(Math.max(0, startedMs + 1000 - Date.now()));
    assert.ok(drain.running, `the drain is still running after a second: ${drain.stdout} ${drain.stderr}`);
    drain.child.kill('SIGINT');
    const exit = await drain.waitFor(10_000, 'pcache drain after SIGINT');
    assert.equal(exit.code, 130, `exit status 130 after Ctrl-C: ${drain.stderr}`);
    assert.match(drain.stderr, /^pcache: stopped waiting; the server goes on writing back, and nothing was lost or undone$/m);
    assert.doesNotMatch(drain.stdout, /drained in/);

    // The server's drain goes on without its client...
    const right = await controlStatus(rig.control);
    assert.equal(right.cache.state, 'draining', 'the server is still draining after the client stopped waiting');
    assert.ok(right.cache.dirtyBytes > 0, 'the drain had not finished when the client stopped waiting');
    // ...and finishes.
    const deadline = Date.now() + 60_000;
    for (;;) {
      const status = await controlStatus(rig.control);
      if (status.cache.dirtyBytes === 0 && status.cache.state === 'running') break;
      assert.ok(Date.now() < deadline, `the server's drain finishes (state ${status.cache.state}, ${status.cache.dirtyBytes} bytes dirty)`);
      await sleep(100);
    }
    await waitUntil(() => logLines(rig.server.stderr).some((line) => line.msg === 'drain finished'), "the server logs 'drain finished'");
    assert.ok(rig.server.running, 'the server is unharmed');
    assertFilesEqual(backing, rig.source, 'the backing file after the drain and the data written');
    assert.equal(await rig.server.stop(), 0, 'the server stops cleanly');
    await kit.kill('SIGTERM');
  });
});
