// `pcache checkpoint`: a crash-consistent state of the client's disk on the backing device, held
// there while a command (a snapshot of it) runs, without pausing the clients.
//
// The server (POST /checkpoint, control.ts; Cache.checkpoint) writes back everything its log held
// durably when the request came — every write whose flush or FUA had completed — and holds
// writeback there for as long as this command's connection stays open. CMD runs meanwhile with
// {name}, {time} and {epoch} replaced and PCACHE_CHECKPOINT_NAME, PCACHE_CHECKPOINT_TIME and
// PCACHE_CHECKPOINT_EPOCH (the log seq the backing device holds everything before) in its
// environment; its output goes to standard error, so that --json output stays one object.
// Closing the connection releases the hold: when CMD exits, and also when this process dies.
// --timeout bounds the whole command: a CMD still running then is stopped (SIGTERM) before the
// hold is released, and the command fails.

import { spawn } from 'node:child_process';
import { PcacheError } from '../lib/errors.js';
import { exitFailure, exitOk, type CheckpointArgs } from './args.js';
import { controlCheckpoint, type HeldPoint } from './control_client.js';
import type { Terminal } from './terminal.js';

interface Outcome {
  readonly name: string;
  readonly point: HeldPoint;
  /** From the request to the hold: the writeback the checkpoint waited for. */
  readonly writebackMs: number;
  /** How long the backing device was held (the command's run). */
  readonly heldMs: number;
  /** The command's exit status (null: killed by a signal); undefined without --exec. */
  readonly exitCode: number | null | undefined;
  readonly signal: NodeJS.Signals | null;
}

export async function checkpointCommand(args: CheckpointArgs, terminal: Terminal): Promise<number> {
  const startedMs = performance.now();
  const deadlineMs = args.timeoutMs === undefined ? undefined : startedMs + args.timeoutMs;
  const outcome = await controlCheckpoint(args.controlPath, async (point): Promise<Outcome> => {
    const heldMs = performance.now();
    const name = args.name ?? defaultName(point.time);
    const writebackMs = heldMs - startedMs;
    if (args.exec === undefined) return { name, point, writebackMs, heldMs: 0, exitCode: undefined, signal: null };
    const exit = await runHeld(args.exec, name, point, deadlineMs === undefined ? undefined : deadlineMs - heldMs);
    return { name, point, writebackMs, heldMs: performance.now() - heldMs, ...exit };
  }, args.timeoutMs, args.volume);
  const failed = outcome.exitCode !== undefined && outcome.exitCode !== 0;
  if (args.json) {
    terminal.out(JSON.stringify({
      name: outcome.name, time: outcome.point.time, epoch: outcome.point.seq, writebackMs: Math.round(outcome.writebackMs),
      heldMs: Math.round(outcome.heldMs), exitCode: outcome.exitCode ?? null, signal: outcome.signal,
    }));
  } else {
    const held = `checkpoint ${outcome.name}: the backing device held every write flushed before ${outcome.point.time} (epoch ${outcome.point.seq})`;
    const ran = outcome.exitCode === undefined ? '' : `; the command ran for ${(outcome.heldMs / 1000).toFixed(1)} s`;
    terminal.out(`${held}${ran}`);
  }
  if (outcome.signal !== null) throw new PcacheError('ETIMEDOUT', `checkpoint ${outcome.name}: the command was stopped (${outcome.signal}) after --timeout; what it made may be incomplete`);
  if (failed) {
    terminal.err(`pcache: checkpoint ${outcome.name}: the command exited with status ${String(outcome.exitCode)}`);
    return exitFailure;
  }
  return exitOk;
}

/** pcache-20261206T075012Z from 2026-12-06T07:50:12.345Z. */
function defaultName(time: string): string {
  return `pcache-${time.replace(/\.\d+Z$/, 'Z').replace(/[-:]/g, '')}`;
}

/** Runs `command` with sh -c while the hold lasts; stops it with SIGTERM after `timeoutMs`. */
function runHeld(command: string, name: string, point: HeldPoint, timeoutMs: number | undefined): Promise<{ exitCode: number | null; signal: NodeJS.Signals | null }> {
  const epoch = String(point.seq);
  const text = command.replaceAll('{name}', name).replaceAll('{time}', point.time).replaceAll('{epoch}', epoch);
  return new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', text], {
      stdio: ['ignore', 2, 2],
      env: { ...process.env, PCACHE_CHECKPOINT_NAME: name, PCACHE_CHECKPOINT_TIME: point.time, PCACHE_CHECKPOINT_EPOCH: epoch },
    });
    let stopped = false;
    const timer = timeoutMs === undefined ? undefined : setTimeout(() => {
      stopped = true;
      child.kill('SIGTERM');
    }, Math.max(0, timeoutMs));
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(new PcacheError('EIO', `checkpoint: cannot run sh -c: ${error.message}`));
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ exitCode: code, signal: stopped ? signal ?? 'SIGTERM' : null });
    });
  });
}
