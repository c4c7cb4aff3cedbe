// The client tools the interoperability tests drive, from Debian packages: nbdinfo and nbdcopy
// (libnbd-bin), qemu-io (qemu-utils), fio with its nbd engine (fio), curl, nbdkit. A missing
// tool fails the test naming the package to install; it is never skipped.
//
// Tools run asynchronously: a server under test may live in this process, and a blocking spawn
// would stall the server the tool talks to.

import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { MiB } from '../../src/lib/units.js';

/** Fails (never skips) when a client tool is missing, naming the Debian package to install. */
export function requireTool(command: string, debianPackage: string): void {
  const found = spawnSync('sh', ['-c', `command -v ${command}`], { encoding: 'utf8' });
  if (found.status !== 0) assert.fail(`${command} is not installed: install the Debian package ${debianPackage} (apt-get install ${debianPackage})`);
}

/** Fails, naming the Debian package, unless fio is installed with its nbd engine. */
export async function requireFioNbd(): Promise<void> {
  requireTool('fio', 'fio');
  const engines = await runTool('fio', ['--enghelp']);
  assert.match(engines.stdout, /\bnbd\b/, 'this fio lacks the nbd engine: install the Debian package fio (built with libnbd)');
}

export interface ToolResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a tool to completion (in `cwd`, when given) without blocking the event loop. */
export function runTool(command: string, args: string[], timeoutMs = 60_000, cwd?: string): Promise<ToolResult> {
  return new Promise((resolve) => {
    execFile(command, args, { cwd, timeout: timeoutMs, maxBuffer: 64 * MiB, encoding: 'utf8' }, (error, stdout, stderr) => {
      const code = error === null ? 0 : typeof error.code === 'number' ? error.code : 1;
      resolve({ code, stdout, stderr });
    });
  });
}

/** The NBD URI of an export on a Unix socket, as libnbd's tools take it. */
export function uriFor(socketPath: string, exportName = ''): string {
  return `nbd+unix:///${exportName}?socket=${socketPath}`;
}

/** `nbdcopy args...`, which must succeed (a failure shows its stderr). */
export async function nbdcopy(args: string[], timeoutMs?: number): Promise<ToolResult> {
  const result = await runTool('nbdcopy', args, timeoutMs);
  assert.equal(result.code, 0, result.stderr);
  return result;
}

/**
 * `qemu-io -f raw` on `uri`, each of `commands` one -c, in order; qemu-io must be installed, exit
 * 0 and report no failure, error, mismatch or failed pattern verification.
 */
export async function qemuIo(uri: string, commands: readonly string[]): Promise<ToolResult> {
  requireTool('qemu-io', 'qemu-utils');
  const result = await runTool('qemu-io', ['-f', 'raw', uri, ...commands.flatMap((command) => ['-c', command])]);
  const output = result.stdout + result.stderr;
  assert.equal(result.code, 0, `qemu-io ${commands.join('; ')}: ${output}`);
  assert.doesNotMatch(output, /fail|error|mismatch|pattern verification/i, `qemu-io ${commands.join('; ')}: ${output}`);
  return result;
}

export interface FioJobReport {
  jobname: string;
  error: number;
  write: { io_bytes: number };
  read: { io_bytes: number };
}

/**
 * fio's nbd engine on `uri`: `jobs` jobs, each writing 8 MiB of random 4 KiB blocks (the n-th
 * job from n * 8 MiB) at depth 16 and reading every block back against its crc32c. Asserts
 * that fio exited 0 and that every job wrote and verified its 8 MiB without one error.
 */
export async function fioVerifyJobs(uri: string, jobs: number, name: string): Promise<FioJobReport[]> {
  const result = await runTool('fio', [
    `--name=${name}`, '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k',
    '--size=8m', '--offset_increment=8m', `--numjobs=${jobs}`, '--iodepth=16', '--verify=crc32c',
    '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json',
  ], 120_000);
  assert.equal(result.code, 0, result.stderr);
  const report = JSON.parse(result.stdout.slice(result.stdout.indexOf('{'))) as { jobs: FioJobReport[] };
  assert.equal(report.jobs.length, jobs);
  for (const job of report.jobs) {
    assert.equal(job.error, 0);
    assert.equal(job.write.io_bytes, 8 * MiB);
    assert.equal(job.read.io_bytes, 8 * MiB, 'every written block was read back and verified');
  }
  return report.jobs;
}

/** Whether a process with this pid exists (signal 0 checks without sending anything). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
