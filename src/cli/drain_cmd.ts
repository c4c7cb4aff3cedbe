// `pcache drain`: asks a running server, through its control socket, to write back all dirty
// data; returns once everything written before the request is on the backing device, synced.

import { exitOk, type DrainArgs } from './args.js';
import { controlRequest } from './control.js';
import type { Terminal } from './terminal.js';

export async function drainCommand(args: DrainArgs, terminal: Terminal): Promise<number> {
  const startedMs = performance.now();
  await controlRequest(args.controlPath, 'drain', args.timeoutMs);
  const seconds = (performance.now() - startedMs) / 1000;
  terminal.out(`drained in ${seconds.toFixed(1)} s: the backing device holds everything written before the drain, synced`);
  return exitOk;
}
