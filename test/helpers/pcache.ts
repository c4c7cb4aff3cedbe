// The real `pcache` command in tests: run to completion (the package's bin,
// dist/src/cli/pcache.cjs, through node, as users run it), or `pcache serve` driven as a child
// process on temporary files (start, wait until it listens, stop with a signal, or kill its
// whole process group to simulate a crash). A server can also be started the other ways the
// README names: `node dist/src/cli/main.js` and `npx pcache`. Also: the server's log lines,
// its status as JSON, and any child process (a pcache client, fio) watched while it runs.
//
// Children get an environment without UV_THREADPOOL_SIZE unless a test sets it, so the bin
// sizes the thread pool as it does for users. Every server is started in its own process
// group and killed at the end of its test if still running; every watched child is killed
// after its test if still running.

import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import type { TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { controlRequest } from '../../src/cli/control_client.js';
import { sleep, waitUntil } from './wait.js';

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
  private readonly exited: Promise<Exit>;

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

  wait(): Promise<Exit> {
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

/** `pcache args...` (a command that prints JSON, `--json` included in `args`): it must exit 0; returns its output parsed. */
/**
 * The metrics URL a server printed. It prints that line after the `serving` line that
 * startServe waits for, in a write of its own, so it may arrive a moment later.
 */
export async function printedMetricsUrl(server: { readonly stdout: string }): Promise<string> {
  const find = (): string | undefined => /^metrics at (http:\/\/\S+\/metrics)$/m.exec(server.stdout)?.[1];
  await waitUntil(() => find() !== undefined, `the server printed where its metrics are (stdout so far: ${server.stdout})`);
  const url = find();
  assert.ok(url !== undefined);
  return url;
}

export async function pcacheJson(args: readonly string[]): Promise<unknown> {
  const result = await runCli(args);
  assert.equal(result.code, 0, result.stderr);
  return JSON.parse(result.stdout) as unknown;
}

/** The fields of the control socket's status (what `pcache status --json` prints) that tests read through controlStatus. */
export interface ServerStatus {
  readonly backingRemote: {
    readonly connectionsWanted: number;
    readonly connectionsConnected: number;
    readonly offlineSince?: string;
    readonly reconnectAttempts: number;
    readonly lastError?: string;
  } | null;
  readonly cache: {
    readonly state: string;
    readonly stateReason?: string;
    readonly backingOfflineSince?: string;
    readonly dirtyBytes: number;
    readonly dirtyHighWaterBytes: number;
    readonly writeback: { readonly active: boolean; readonly lastError?: string };
    readonly counters: {
      readonly writebackBytes: number;
      readonly readHitRequests: number;
      readonly readMissRequests: number;
      readonly writeRequests: number;
    };
  };
}

/** The server's status through its control socket, asked in this process (no `pcache status` child: answered at once). */
export async function controlStatus(control: string): Promise<ServerStatus> {
  return (await controlRequest(control, 'status')) as ServerStatus;
}

export interface Exit {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
}

/** A child process whose output is collected as it comes; killed (SIGKILL) after the test if still running. */
export class Child {
  readonly child: ChildProcess;
  stdout = '';
  stderr = '';
  private readonly exited: Promise<Exit>;
  private exit: Exit | undefined;

  constructor(t: TestContext, command: string, args: readonly string[], env: NodeJS.ProcessEnv = process.env) {
    this.child = spawn(command, [...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout?.setEncoding('utf8').on('data', (chunk: string) => { this.stdout += chunk; });
    this.child.stderr?.setEncoding('utf8').on('data', (chunk: string) => { this.stderr += chunk; });
    this.exited = new Promise((resolve) => {
      this.child.on('error', (error) => {
        this.stderr += `spawn ${command}: ${error.message}\n`;
        this.exit = { code: -1, signal: null };
        resolve(this.exit);
      });
      // 'close', not 'exit': every byte of its output has been read by then.
      this.child.on('close', (code, signal) => {
        this.exit = { code, signal };
        resolve(this.exit);
      });
    });
    t.after(async () => {
      if (this.exit !== undefined) return;
      this.child.kill('SIGKILL');
      await this.exited;
    });
  }

  get running(): boolean {
    return this.exit === undefined;
  }

  wait(): Promise<Exit> {
    return this.exited;
  }

  /** Waits for the exit, failing if it takes longer than `timeoutMs`. */
  async waitFor(timeoutMs: number, what: string): Promise<Exit> {
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<'timeout'>((resolve) => { timer = setTimeout(() => { resolve('timeout'); }, timeoutMs); });
    const outcome = await Promise.race([this.exited, timedOut]);
    clearTimeout(timer);
    if (outcome === 'timeout') assert.fail(`${what} did not finish within ${timeoutMs / 1000} s; stdout: ${this.stdout.slice(-2000)} stderr: ${this.stderr.slice(-2000)}`);
    return outcome;
  }
}

/** `pcache args...` as a child process watched while it runs. */
export function startCli(t: TestContext, args: readonly string[]): Child {
  return new Child(t, cliPath, args, cliEnv());
}
