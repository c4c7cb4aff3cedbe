// `pcache invalidate` and `pcache detach`: a running server's cache lets go of what it holds for
// its backing device, through the control socket. invalidate drops the clean cached copies
// (dirty data stays); detach writes everything back, drops the clean copies, marks the cache
// detached and stops the server, leaving the backing device to be used without pcache.

import { PcacheError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { exitOk, type ControlArgs } from './args.js';
import { controlRequest } from './control_client.js';
import type { Terminal } from './terminal.js';

export async function invalidateCommand(args: ControlArgs, terminal: Terminal): Promise<number> {
  const result = await controlRequest(args.controlPath, 'invalidate', { volume: args.volume });
  const droppedBytes = (result as { droppedBytes?: unknown } | null)?.droppedBytes;
  if (typeof droppedBytes !== 'number') throw new PcacheError('EIO', `${args.controlPath} answered invalidate with something unexpected`);
  terminal.out(args.json ? JSON.stringify({ droppedBytes }) : `dropped ${droppedBytes} bytes (${formatSize(droppedBytes)}) of clean cached copies; dirty data stays`);
  return exitOk;
}

export async function detachCommand(args: ControlArgs, terminal: Terminal): Promise<number> {
  await controlRequest(args.controlPath, 'detach');
  terminal.out(args.json ? JSON.stringify({ detached: true }) : 'detached: everything is written back; the server has stopped and the backing device may be used without pcache');
  return exitOk;
}
