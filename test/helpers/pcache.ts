// Test harness for the command line: runs the real `pcache` (the package's bin,
// dist/src/cli/pcache.cjs, through node) as a child process, on temporary files, and drives
// `pcache serve` (start, wait until it listens, stop with a signal, or kill its whole process
// group to simulate a crash). A server can also be started the other ways the README names:
// `node dist/src/cli/main.js` and `npx pcache`.
//
// Children get an environment without UV_THREADPOOL_SIZE unless a test sets it, so the bin
// sizes the thread pool as it does for users. Every server is started in its own process
// group and killed at the end of its test if still running.

import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** The package's bin, as `npm run build` leaves it (dist/test/helpers -> dist/src/cli). */
export const cliPath = fileURLToPath(new URL('../../src/cli/pcache.cjs', import.meta.url));
/** The command line's ES module, which also runs as a program (with libuv's default thread pool). */
export const mainPath = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));
/** The repository, where `npx pcache` finds the package. */
export const packageRoot = fileURLToPath(new URL('../../../', import.meta.url));

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
    execFile(process.execPath, [cliPath, ...args], { cwd: options.cwd, env: cliEnv(), timeout: options.timeoutMs ?? 60_000, encoding: 'utf8' }, (error, stdout, stderr) => {
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

/** How a server is started: `node pcache.cjs` (the bin), `node main.js`, or `npx pcache` in the repository. */
export type Launcher = 'bin' | 'main' | 'npx';

export interface ServeOptions {
  readonly launcher?: Launcher;
  /** Extra environment (UV_THREADPOOL_SIZE). */
  readonly env?: Record<string, string>;
}

export class ServeProcess {
  readonly child: ChildProcess;
  stdout = '';
  stderr = '';
  private readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  /** With the npx launcher the process runs in the repository (`cwd` is not used): give it absolute paths. */
  constructor(args: readonly string[], cwd: string, options: ServeOptions = {}) {
    const launcher = options.launcher ?? 'bin';
    const [command, prefix] = launcher === 'npx' ? ['npx', ['pcache']] : [process.execPath, [launcher === 'bin' ? cliPath : mainPath]];
    this.child = spawn(command, [...prefix, 'serve', ...args], {
      cwd: launcher === 'npx' ? packageRoot : cwd,
      env: cliEnv(options.env),
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
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

  /** Sends `signal` to the process started and returns its exit status. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    this.child.kill(signal);
    return (await this.exited).code;
  }

  /** Sends `signal` to the process group, as Ctrl-C in a terminal does, and returns the exit status of the process started. */
  async stopGroup(signal: NodeJS.Signals = 'SIGINT'): Promise<number | null> {
    process.kill(-this.pid, signal);
    return (await this.exited).code;
  }

  /** SIGKILL to the whole process group (with npx: npm, its shell and the server), as in a crash. */
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
export async function startServe(t: TestContext, args: readonly string[], cwd: string, options: ServeOptions = {}): Promise<ServeProcess> {
  const server = new ServeProcess(args, cwd, options);
  t.after(() => server.crash());
  await server.ready();
  return server;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `condition` until it holds; fails naming `what` after the time limit. */
export async function waitUntil(condition: () => boolean | Promise<boolean>, what: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) assert.fail(`timed out waiting until ${what}`);
    await sleep(20);
  }
}

export function uriFor(socketPath: string, exportName = ''): string {
  return `nbd+unix:///${exportName}?socket=${socketPath}`;
}

export interface HttpAnswer {
  readonly status: number;
  readonly headers: Readonly<Record<string, string>>;
  /** The body parsed as JSON (undefined when empty). */
  readonly json: unknown;
}

/** One HTTP request to a control socket, on its own connection. */
export function httpRequest(socketPath: string, method: string, urlPath: string, body?: string): Promise<HttpAnswer> {
  return new Promise((resolve, reject) => {
    const request = http.request({ socketPath, method, path: urlPath, agent: false }, (response) => {
      let text = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => { text += chunk; });
      response.on('end', () => {
        const headers = Object.fromEntries(Object.entries(response.headers).map(([name, value]) => [name, String(value)]));
        resolve({ status: response.statusCode ?? 0, headers, json: text === '' ? undefined : JSON.parse(text) as unknown });
      });
    });
    request.on('error', reject);
    request.end(body);
  });
}

/** The `error` of a failure answer, checked to have the documented shape. */
export function errorOf(answer: HttpAnswer): { code: string; message: string } {
  const error = (answer.json as { error?: { code?: unknown; message?: unknown } } | undefined)?.error;
  assert.equal(typeof error?.code, 'string', `an error body: ${JSON.stringify(answer.json)}`);
  assert.equal(typeof error?.message, 'string');
  return error as { code: string; message: string };
}

/**
 * Sends raw bytes on one connection (pipelined requests, broken ones) and parses the HTTP
 * answers that come back until `count` have arrived or the server closes the connection.
 */
export function httpExchange(socketPath: string, payload: string | Buffer, count: number, timeoutMs = 30_000): Promise<{ answers: HttpAnswer[]; closed: boolean }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    let buffered = Buffer.alloc(0);
    const answers: HttpAnswer[] = [];
    const timer = setTimeout(() => { socket.destroy(); reject(new Error(`no ${count} answers from ${socketPath}: ${buffered.toString()}`)); }, timeoutMs);
    const done = (closed: boolean): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve({ answers, closed });
    };
    socket.on('connect', () => { socket.write(payload); });
    socket.on('error', () => undefined);
    socket.on('close', () => { done(true); });
    socket.on('data', (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      for (;;) {
        const end = buffered.indexOf('\r\n\r\n');
        if (end < 0) break;
        const [statusLine = '', ...lines] = buffered.subarray(0, end).toString('latin1').split('\r\n');
        const headers = Object.fromEntries(lines.map((line) => [line.slice(0, line.indexOf(':')).toLowerCase(), line.slice(line.indexOf(':') + 1).trim()]));
        const length = Number(headers['content-length'] ?? 0);
        if (buffered.length < end + 4 + length) break;
        const text = buffered.subarray(end + 4, end + 4 + length).toString('utf8');
        buffered = buffered.subarray(end + 4 + length);
        answers.push({ status: Number(statusLine.split(' ')[1]), headers, json: text === '' ? undefined : JSON.parse(text) as unknown });
      }
      if (answers.length >= count) done(false);
    });
  });
}
