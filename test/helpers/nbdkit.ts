// nbdkit as a test server: started in the foreground on a temporary Unix socket, killed and
// restarted on the same socket at will, with its log filter's transaction log parsed.
//
// nbdkit comes from the Debian package nbdkit (plugins memory and file, filters delay, error,
// log, multi-conn, blocksize-policy); when it is missing the test fails and names the package.
// The process gets --exit-with-parent, so a crashed test run leaves no server behind, and is
// killed after each test. nbdkit refuses to bind over an existing socket file, so a restart
// removes the one a killed process left behind.

import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { requireTool } from './tools.js';
import { waitUntil } from './wait.js';

export interface NbdkitSpec {
  readonly plugin: string;
  /** Plugin and filter parameters, e.g. ['64M'] or ['file=/tmp/x', 'delay-read=2']. */
  readonly args: readonly string[];
  readonly filters?: readonly string[];
  /** Server options such as --no-sr or -r. */
  readonly flags?: readonly string[];
  /** Add the log filter (outermost) writing to `logPath`. */
  readonly log?: boolean;
}

export interface LogEntry {
  readonly connection: number;
  readonly action: string;
  readonly id: number;
  readonly offset: number;
  readonly count: number;
  readonly fua: boolean;
  /** The line's position in the log, to order calls against returns. */
  readonly line: number;
}

export class Nbdkit {
  readonly dir: string;
  readonly socketPath: string;
  readonly uri: string;
  readonly logPath: string;
  private spec: NbdkitSpec;
  private child: ChildProcess | undefined;

  private constructor(dir: string, spec: NbdkitSpec) {
    this.dir = dir;
    this.socketPath = path.join(dir, 'nbdkit.sock');
    this.uri = `nbd+unix:///?socket=${this.socketPath}`;
    this.logPath = path.join(dir, 'nbdkit.log');
    this.spec = spec;
  }

  /**
   * Starts nbdkit with `spec` (or the spec a function makes from this server's temporary
   * directory); it is killed and its directory removed after the test.
   */
  static async start(t: TestContext, spec: NbdkitSpec | ((dir: string) => NbdkitSpec)): Promise<Nbdkit> {
    requireTool('nbdkit', 'nbdkit');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-nbdkit-'));
    const server = new Nbdkit(dir, typeof spec === 'function' ? spec(dir) : spec);
    t.after(async () => {
      await server.kill();
      fs.rmSync(dir, { recursive: true, force: true });
    });
    await server.restart();
    return server;
  }

  /** A file in this server's temporary directory. */
  file(name: string): string {
    return path.join(this.dir, name);
  }

  get running(): boolean {
    return this.child !== undefined;
  }

  /** (Re)starts nbdkit on the same socket, optionally with a new spec; resolves once it listens. */
  async restart(spec: NbdkitSpec = this.spec): Promise<void> {
    assert.equal(this.child, undefined, 'nbdkit is already running');
    this.spec = spec;
    const pidPath = path.join(this.dir, 'nbdkit.pid');
    fs.rmSync(this.socketPath, { force: true });
    fs.rmSync(pidPath, { force: true });
    const filters = [...(spec.log === true ? ['log'] : []), ...(spec.filters ?? [])];
    const args = [
      '-f', '--exit-with-parent', '-U', this.socketPath, '-P', pidPath,
      ...(spec.flags ?? []), ...filters.map((filter) => `--filter=${filter}`),
      spec.plugin, ...spec.args, ...(spec.log === true ? [`logfile=${this.logPath}`] : []),
    ];
    const child = spawn('nbdkit', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (text: string) => { stderr += text; });
    const state = { exited: false };
    child.once('exit', () => {
      state.exited = true;
      if (this.child === child) this.child = undefined;
    });
    this.child = child;
    // nbdkit writes its pid file once it is listening.
    await waitUntil(() => state.exited || (fs.existsSync(pidPath) && fs.readFileSync(pidPath, 'utf8').trim() !== ''), 'nbdkit wrote its pid file');
    if (state.exited) assert.fail(`nbdkit ${args.join(' ')} exited: ${stderr.trim()}`);
  }

  /** Kills nbdkit (SIGKILL by default: no goodbye to its clients) and waits for it to exit. */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = this.child;
    if (child === undefined) return;
    const exited = new Promise<void>((resolve) => { child.once('exit', () => { resolve(); }); });
    child.kill(signal);
    await exited;
    this.child = undefined;
  }

  /** Freezes nbdkit with SIGSTOP; resolves once every thread of it has stopped. */
  async freeze(): Promise<void> {
    const pid = this.child?.pid;
    assert.ok(pid !== undefined, 'nbdkit is not running');
    process.kill(pid, 'SIGSTOP');
    // The signal takes effect asynchronously: wait until /proc shows each thread stopped ('T').
    const stopped = (): boolean => fs.readdirSync(`/proc/${pid}/task`).every((task) => {
      const stat = fs.readFileSync(`/proc/${pid}/task/${task}/stat`, 'utf8');
      return /^\d+ \(.*\) T /.test(stat);
    });
    await waitUntil(stopped, 'nbdkit stopped');
  }

  /** Thaws a frozen nbdkit with SIGCONT. */
  thaw(): void {
    const pid = this.child?.pid;
    assert.ok(pid !== undefined, 'nbdkit is not running');
    process.kill(pid, 'SIGCONT');
  }

  /** The log filter's request lines (calls, not returns), in order. */
  log(): LogEntry[] {
    const entries: LogEntry[] = [];
    const lines = fs.existsSync(this.logPath) ? fs.readFileSync(this.logPath, 'utf8').split('\n') : [];
    lines.forEach((text, line) => {
      const match = / connection=(\d+) (Read|Write|Zero|Trim|Flush|Cache|Extents) id=(\d+)(.*)$/.exec(text);
      if (match === null) return;
      const rest = match[4] ?? '';
      entries.push({
        connection: Number(match[1]),
        action: match[2] ?? '',
        id: Number(match[3]),
        offset: Number(/offset=(0x[0-9a-f]+)/.exec(rest)?.[1] ?? 0),
        count: Number(/count=(0x[0-9a-f]+)/.exec(rest)?.[1] ?? 0),
        fua: /fua=1/.test(rest),
        line,
      });
    });
    return entries;
  }

  /** Lines where a call returned ("...Read id=3 return=0"), as connection:action:id. */
  returns(): Map<string, number> {
    const returned = new Map<string, number>();
    const lines = fs.existsSync(this.logPath) ? fs.readFileSync(this.logPath, 'utf8').split('\n') : [];
    lines.forEach((text, line) => {
      const match = / connection=(\d+) \.\.\.(\w+) id=(\d+) return=/.exec(text);
      if (match !== null) returned.set(`${match[1] ?? ''}:${match[2] ?? ''}:${match[3] ?? ''}`, line);
    });
    return returned;
  }
}

/**
 * A spec for nbdkit's file plugin on `disk.img` in the server's directory, created (sparse) with
 * `sizeBytes`, so data outlives the process; `extra` adds filters, flags and parameters. Pass
 * it to Nbdkit.start, or call it with the server's directory to restart with another size.
 */
export function fileSpec(sizeBytes: number, extra: Partial<NbdkitSpec> = {}): (dir: string) => NbdkitSpec {
  return (dir) => {
    const image = path.join(dir, 'disk.img');
    if (!fs.existsSync(image)) fs.writeFileSync(image, Buffer.alloc(0));
    fs.truncateSync(image, sizeBytes);
    return { plugin: 'file', ...extra, args: [`file=${image}`, ...(extra.args ?? [])] };
  };
}
