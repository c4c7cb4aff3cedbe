// The server's structured log: JSON lines on standard error through pino, one logger per
// process, with the level chosen by `serve --log-level`.
//
// What is logged at info: start (devices, addresses), stop, drains, settings changed, state
// changes of the cache and of a remote backing device (offline, back online), control-socket
// refusals. Never anything per request: the request path has no logger in reach (the engine
// and the NBD layer do not import this module). Writes are synchronous, so the last lines
// before an exit are not lost, and they are rare enough that this costs nothing.

import { pino, type Logger } from 'pino';
import type { LogLevel } from './args.js';

export type { Logger } from 'pino';

export function createLogger(level: LogLevel): Logger {
  return pino(
    { level, base: { pid: process.pid }, timestamp: pino.stdTimeFunctions.isoTime },
    pino.destination({ fd: 2, sync: true }),
  );
}
