// Starting a listener: the one place that turns a failure to listen (an address in use, a
// directory that does not exist) into a PcacheError, for the control socket and the metrics
// endpoint.

import type net from 'node:net';
import { PcacheError } from '../lib/errors.js';

/**
 * Calls `listen` (which starts `server` listening and calls its argument once bound) and
 * resolves then; a failure rejects with a PcacheError EINVAL, `<what>: <why>`. Once bound,
 * the server's errors (a failed accept) concern one client only and are ignored.
 */
export function listenOn(server: net.Server, what: string, listen: (bound: () => void) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (error: Error): void => { reject(new PcacheError('EINVAL', `${what}: ${error.message}`, { cause: error })); };
    server.once('error', onError);
    listen(() => {
      server.off('error', onError);
      server.on('error', () => undefined);
      resolve();
    });
  });
}
