// Helpers shared by the operations tests (backing outage, drain): the server's status through
// its control socket, child processes watched while they run (fio, qemu-io, pcache drain) and
// killed after the test if still running, a scratch directory with room for GiBs of data,
// random data files and byte-for-byte file comparison, and the client tools they need.
//
// Tools come from Debian packages (nbdkit, libnbd-bin, qemu-utils, fio); a missing one fails
// the test naming the package, it is never skipped.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { controlRequest } from '../../src/cli/control_client.js';
import { requireTool, runTool } from './nbd_server.js';
import { cliEnv, cliPath, GiB, MiB } from './pcache.js';

/** The fields of `pcache status --json` (and the control socket's status) these tests read. */
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

/** The server's status through its control socket (from memory; answered at once). */
export async function serverStatus(control: string): Promise<ServerStatus> {
  return (await controlRequest(control, 'status')) as ServerStatus;
}

/** Fails, naming the Debian package, unless fio is installed with its nbd engine. */
export async function requireFioNbd(): Promise<void> {
  requireTool('fio', 'fio');
  const engines = await runTool('fio', ['--enghelp']);
  assert.match(engines.stdout, /\bnbd\b/, 'this fio lacks the nbd engine: install the Debian package fio (built with libnbd)');
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

/**
 * A fresh directory with at least `bytesNeeded` free, removed after the test: in /dev/shm
 * (memory: fast, and the tests' timing does not depend on a disk) when it has the room, else
 * under os.tmpdir(); fails when neither has.
 */
export function scratchDir(t: TestContext, bytesNeeded: number, prefix: string): string {
  const candidates = ['/dev/shm', os.tmpdir()];
  const room: string[] = [];
  for (const candidate of candidates) {
    let freeBytes: number;
    try {
      const stats = fs.statfsSync(candidate);
      freeBytes = stats.bavail * stats.bsize;
      fs.accessSync(candidate, fs.constants.W_OK);
    } catch {
      continue;
    }
    room.push(`${candidate}: ${(freeBytes / GiB).toFixed(1)} GiB free`);
    // Keep a margin: other tests and the page cache share the space.
    if (freeBytes < bytesNeeded + 512 * MiB) continue;
    const dir = fs.mkdtempSync(path.join(candidate, prefix));
    t.after(() => { fs.rmSync(dir, { recursive: true, force: true }); });
    return dir;
  }
  return assert.fail(`this test needs ${(bytesNeeded / GiB).toFixed(1)} GiB of free space in /dev/shm or ${os.tmpdir()} (${room.join('; ') || 'neither is usable'})`);
}

const chunkBytes = 16 * MiB;

/** Writes `bytes` of random data to `file` (cryptographic random: no block repeats another). */
export function writeRandomFile(file: string, bytes: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    const chunk = Buffer.alloc(chunkBytes);
    for (let done = 0; done < bytes; done += chunkBytes) {
      const length = Math.min(chunkBytes, bytes - done);
      randomFillSync(chunk, 0, length);
      fs.writeSync(fd, chunk, 0, length, done);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Asserts two files are byte for byte equal, naming the first MiB where they differ. */
export function assertFilesEqual(actual: string, expected: string, what: string): void {
  const size = fs.statSync(expected).size;
  assert.equal(fs.statSync(actual).size, size, `${what}: sizes`);
  const a = fs.openSync(actual, 'r');
  const b = fs.openSync(expected, 'r');
  try {
    const bufA = Buffer.alloc(chunkBytes);
    const bufB = Buffer.alloc(chunkBytes);
    for (let offset = 0; offset < size; offset += chunkBytes) {
      const length = Math.min(chunkBytes, size - offset);
      fs.readSync(a, bufA, 0, length, offset);
      fs.readSync(b, bufB, 0, length, offset);
      if (bufA.subarray(0, length).equals(bufB.subarray(0, length))) continue;
      let at = 0;
      while (bufA[at] === bufB[at]) at++;
      assert.fail(`${what}: the files differ from byte ${offset + at} (MiB ${Math.floor((offset + at) / MiB)}) on`);
    }
  } finally {
    fs.closeSync(a);
    fs.closeSync(b);
  }
}

/** The median of some numbers (the upper one of the middle two). */
export function median(values: readonly number[]): number {
  const sorted = [...values].sort((x, y) => x - y);
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN;
}
