// Test harness for the command line: runs the real dist/src/cli/main.js as a child process,
// on temporary files, and drives `pcache serve` (start, wait until it listens, stop with a
// signal, or kill its whole process group to simulate a crash).
//
// Children get an environment without UV_THREADPOOL_SIZE, so `serve` takes the production
// path (a supervising parent re-running the server with the variable set). Every server is
// started in its own process group and killed at the end of its test if still running.

import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** The compiled command line, as `npm run build` leaves it (dist/test/cli -> dist/src/cli). */
export const cliPath = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));

export function cliEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env = { ...process.env, ...extra };
  if (extra.UV_THREADPOOL_SIZE === undefined) delete env.UV_THREADPOOL_SIZE;
  delete env.NODE_TEST_CONTEXT; // the child is a program, not a test file
  return env;
}

export interface CliResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs `pcache args...` to completion (asynchronously: a server under test may share this process's loop). */
export function runCli(args: readonly string[], options: { cwd?: string; timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolve) => {
    execFile(cliPath, [...args], { cwd: options.cwd, env: cliEnv(), timeout: options.timeoutMs ?? 60_000, encoding: 'utf8' }, (error, stdout, stderr) => {
      const code = error === null ? 0 : typeof error.code === 'number' ? error.code : -1;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Asserts a failure: the exit code, and exactly one line on stderr starting "pcache: " that matches `pattern`. */
export function assertOneLineError(result: CliResult, code: number, pattern: RegExp): void {
  assert.equal(result.code, code, `exit code (stderr: ${result.stderr})`);
  const text = result.stderr.trimEnd();
  assert.equal(text.split('\n').length, 1, `one line on stderr, got: ${result.stderr}`);
  assert.match(text, /^pcache: /);
  assert.match(text, pattern);
}

export interface LogLine {
  readonly level: number;
  readonly msg: string;
  readonly [field: string]: unknown;
}

/** The server's stderr as log lines: every line must be one JSON object with a level and a message. */
export function logLines(stderr: string): LogLine[] {
  return stderr.split('\n').filter((line) => line !== '').map((line) => {
    const parsed = JSON.parse(line) as LogLine;
    assert.equal(typeof parsed.level, 'number', `a log line with a level: ${line}`);
    assert.equal(typeof parsed.msg, 'string', `a log line with a message: ${line}`);
    return parsed;
  });
}

/** stderr of a server that ran without trouble: log lines at info (30) and below only. */
export function assertQuietLogs(stderr: string): LogLine[] {
  const lines = logLines(stderr);
  for (const line of lines) assert.ok(line.level <= 30, `nothing above info: ${JSON.stringify(line)}`);
  return lines;
}

/** A fresh temporary directory, removed after the test. */
export function tempDir(t: TestContext, prefix = 'pcache-cli-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.after(() => { fs.rmSync(dir, { recursive: true, force: true }); });
  return dir;
}

export class ServeProcess {
  readonly child: ChildProcess;
  stdout = '';
  stderr = '';
  private readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  constructor(args: readonly string[], cwd: string) {
    this.child = spawn(cliPath, ['serve', ...args], { cwd, env: cliEnv(), detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout?.setEncoding('utf8').on('data', (chunk: string) => { this.stdout += chunk; });
    this.child.stderr?.setEncoding('utf8').on('data', (chunk: string) => { this.stderr += chunk; });
    this.exited = new Promise((resolve) => {
      this.child.on('exit', (code, signal) => { resolve({ code, signal }); });
    });
  }

  get pid(): number {
    assert.ok(this.child.pid !== undefined, 'the server process did not start');
    return this.child.pid;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Waits until the server prints its "serving ..." line (it listens then); fails if it exits first. */
  async ready(timeoutMs = 20_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const line = this.stdout.split('\n').find((candidate) => candidate.startsWith('serving '));
      if (line !== undefined) return line;
      if (!this.running) assert.fail(`pcache serve exited (${String(this.child.exitCode)}) before listening: ${this.stderr}`);
      if (Date.now() > deadline) assert.fail(`pcache serve did not start listening: ${this.stdout} ${this.stderr}`);
      await sleep(20);
    }
  }

  /** Sends `signal` to the supervising process and returns the exit status. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    this.child.kill(signal);
    return (await this.exited).code;
  }

  /** SIGKILL to the whole process group: the supervisor and the server die at once, as in a crash. */
  async crash(): Promise<void> {
    try {
      process.kill(-this.pid, 'SIGKILL');
    } catch {
      // already gone
    }
    await this.exited;
  }

  wait(): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    return this.exited;
  }
}

/** Starts `pcache serve args...` in `cwd`, waits until it listens, and kills it after the test if it is still up. */
export async function startServe(t: TestContext, args: readonly string[], cwd: string): Promise<ServeProcess> {
  const server = new ServeProcess(args, cwd);
  t.after(() => server.crash());
  await server.ready();
  return server;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `condition` until it holds; fails naming `what` after the time limit. */
export async function waitUntil(condition: () => boolean, what: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting until ${what}`);
    await sleep(20);
  }
}

export function uriFor(socketPath: string, exportName = ''): string {
  return `nbd+unix:///${exportName}?socket=${socketPath}`;
}

/**
 * Sends raw bytes to a control socket and collects reply lines until `count` have arrived or
 * the server closes the connection.
 */
export function controlExchange(socketPath: string, payload: string, count: number): Promise<{ replies: Record<string, unknown>[]; closed: boolean }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    let buffered = '';
    const replies: Record<string, unknown>[] = [];
    const timer = setTimeout(() => { socket.destroy(); reject(new Error(`no ${count} replies from ${socketPath}: ${buffered}`)); }, 30_000);
    const done = (closed: boolean): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve({ replies, closed });
    };
    socket.setEncoding('utf8');
    socket.on('connect', () => { socket.write(payload); });
    socket.on('error', () => undefined);
    socket.on('close', () => { done(true); });
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      let newline = buffered.indexOf('\n');
      while (newline >= 0) {
        replies.push(JSON.parse(buffered.slice(0, newline)) as Record<string, unknown>);
        buffered = buffered.slice(newline + 1);
        newline = buffered.indexOf('\n');
      }
      if (replies.length >= count) done(false);
    });
  });
}
