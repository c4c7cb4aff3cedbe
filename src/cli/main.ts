#!/usr/bin/env node
// The `pcache` program: reads argv, runs one command, and turns its outcome into an exit status.
//
// This file and the rest of src/cli are the only code that touches argv, standard output,
// standard error and exit codes. Exit status (also in `pcache --help` and docs/cli.md):
//   0  success
//   1  an operating error: the operation failed or was refused (PcacheError), or `check`
//      found problems; one line `pcache: <message>` on standard error
//   2  a usage error: unknown or repeated flag, missing required flag, bad value
//   70 an internal error (a broken invariant, i.e. a bug): the stack trace is printed
//   130 `drain` stopped waiting on Ctrl-C (nothing was undone)
//
// The package's bin is pcache.cts (compiled to pcache.cjs), which sizes libuv's thread pool
// and then loads this module; `node dist/src/cli/main.js` runs it too, but then the pool has
// libuv's default size unless UV_THREADPOOL_SIZE is set (docs/cli.md). Either way everything,
// `serve` included, runs in this one process: signals reach the server directly.

import { isPcacheError } from '../lib/errors.js';
import { exitFailure, exitInternal, exitOk, exitUsage, parseCommandLine, UsageError, type Invocation } from './args.js';
import { processTerminal, type Terminal } from './terminal.js';
import { packageVersion } from './version.js';

// Command modules are imported when their command runs, so `--help`, `--version` and usage
// errors answer without loading the engine.
async function run(invocation: Invocation, terminal: Terminal): Promise<number> {
  switch (invocation.command) {
    case 'help':
      terminal.out(invocation.text);
      return exitOk;
    case 'version':
      terminal.out(`pcache ${packageVersion()}`);
      return exitOk;
    case 'format':
      return (await import('./format_cmd.js')).formatCommand(invocation.args, terminal);
    case 'serve':
      return (await import('./serve_cmd.js')).serveCommand(invocation.args, terminal);
    case 'status':
      return (await import('./status_cmd.js')).statusCommand(invocation.args, terminal);
    case 'check':
      return (await import('./check_cmd.js')).checkCommand(invocation.args, terminal);
    case 'drain':
      return (await import('./drain_cmd.js')).drainCommand(invocation.args, terminal);
    case 'set':
      return (await import('./set_cmd.js')).setCommand(invocation.args, terminal);
    case 'invalidate':
      return (await import('./invalidate_cmd.js')).invalidateCommand(invocation.args, terminal);
    case 'detach':
      return (await import('./invalidate_cmd.js')).detachCommand(invocation.args, terminal);
    case 'checkpoint':
      return (await import('./checkpoint_cmd.js')).checkpointCommand(invocation.args, terminal);
    case 'volume':
      return (await import('./volume_cmd.js')).volumeCommand(invocation.args, terminal);
  }
}

function internalError(error: unknown): never {
  const detail = error instanceof Error ? error.stack ?? error.message : String(error);
  process.stderr.write(`pcache: internal error (a bug; please report it): ${detail}\n`);
  process.exit(exitInternal);
}

async function main(): Promise<void> {
  process.on('uncaughtException', internalError);
  process.on('unhandledRejection', internalError);
  let status: number;
  try {
    const invocation = parseCommandLine(process.argv.slice(2));
    status = await run(invocation, processTerminal);
  } catch (error) {
    if (error instanceof UsageError) {
      processTerminal.err(`pcache: ${error.message}`);
      status = exitUsage;
    } else if (isPcacheError(error)) {
      processTerminal.err(`pcache: ${error.message}`);
      status = exitFailure;
    } else {
      internalError(error);
    }
  }
  // Exit explicitly: a server's sockets and timers must not keep it alive after it has
  // stopped. Standard output and error are synchronous for files and pipes on Linux.
  process.exit(status);
}

await main();
