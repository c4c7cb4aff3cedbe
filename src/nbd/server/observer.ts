// NbdRequestObserver: an optional hook through which the server reports every request it
// answered, for metrics (request counts, bytes, errors, latency per command). A catalog entry
// may bring its own (export_catalog.ts), which then hears that export's requests instead.
//
// Invariants:
// - Without an observer the server does nothing extra per request: no clock read, no call,
//   no allocation. With one, it reads the monotonic clock when a request is dispatched and
//   makes one call with numbers only when it is answered; the observer must record them
//   without allocating or blocking (src/cli/metrics.ts counts into preallocated arrays).
// - Every request that gets a reply is reported exactly once: requests refused at the
//   boundary (bad range, read-only, shutting down, unknown command) as failed with a duration
//   of 0, requests the Export served with the time from dispatch to the reply being queued.
//   NBD_CMD_DISC gets no reply and is not reported.
// - The NBD layer knows nothing about what observes it; `command` is the wire value
//   (protocol/constants.ts Command), which nbdCommandIndex maps onto a small dense index.

import { Command } from '../protocol/constants.js';

export interface NbdRequestObserver {
  /**
   * One request was answered. `command` is the NBD command type from the wire (possibly one
   * the server does not know), `lengthBytes` the request's length field, `durationMs` the time
   * from dispatch until its reply was queued, `failed` whether the reply carried an error.
   */
  requestAnswered(command: number, lengthBytes: number, durationMs: number, failed: boolean): void;
}

/** Names of the commands that carry data or reach the Export, by nbdCommandIndex; the last is every other type. */
export const nbdCommandNames = ['read', 'write', 'flush', 'trim', 'write_zeroes', 'cache', 'block_status', 'other'] as const;

export type NbdCommandName = (typeof nbdCommandNames)[number];

/** A dense index into nbdCommandNames for a wire command type (unknown types map to 'other'). */
export function nbdCommandIndex(command: number): number {
  switch (command) {
    case Command.read:
      return 0;
    case Command.write:
      return 1;
    case Command.flush:
      return 2;
    case Command.trim:
      return 3;
    case Command.writeZeroes:
      return 4;
    case Command.cache:
      return 5;
    case Command.blockStatus:
      return 6;
    default:
      return nbdCommandNames.length - 1;
  }
}
