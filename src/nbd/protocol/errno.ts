// NBD error numbers and pcache's error codes: the two mappings between them, one for each
// direction, and the names of the numbers for messages. Pure, and kept together so that a code
// added to PcacheErrorCode (a closed set: the switch below will not compile without it) and an
// error number added to NbdErrno are looked at in one place.
//
// Invariants:
// - nbdErrnoOf is the only place where an operating error becomes an NBD error number (the
//   server's replies); pcacheCodeOfNbdErrno is the only place where an NBD error number from a
//   server becomes a PcacheError code (the client's requests).
// - Both are total: every PcacheError code has an error number, and every u32 a server may send
//   (including values the protocol does not define) has a code.

import { unreachable } from '../../lib/assert.js';
import type { PcacheErrorCode } from '../../lib/errors.js';
import { NbdErrno } from './constants.js';

/**
 * The one place where operating errors become NBD error numbers. Codes without an NBD
 * counterpart (a vanished device, a timeout, corrupt or foreign metadata) are I/O errors to
 * the client; the message stays in the ERROR chunk when structured replies are on.
 */
export function nbdErrnoOf(code: PcacheErrorCode): number {
  switch (code) {
    case 'EIO':
      return NbdErrno.eio;
    case 'ENOSPC':
      return NbdErrno.enospc;
    case 'EINVAL':
      return NbdErrno.einval;
    case 'EPERM':
      return NbdErrno.eperm;
    case 'ENOTSUP':
      return NbdErrno.enotsup;
    case 'ESHUTDOWN':
      return NbdErrno.eshutdown;
    case 'ENODEV':
    case 'ETIMEDOUT':
    case 'CORRUPT':
    case 'FOREIGN':
      return NbdErrno.eio;
    default:
      return unreachable(code);
  }
}

/**
 * The one place where NBD error numbers from a server become PcacheError codes. ESHUTDOWN
 * means the server is going away, which to a device user is the device going away. Unknown
 * values are EINVAL, as proto.md "Error values" tells clients.
 */
export function pcacheCodeOfNbdErrno(errno: number): PcacheErrorCode {
  switch (errno) {
    case NbdErrno.eperm:
      return 'EPERM';
    case NbdErrno.eio:
    case NbdErrno.enomem:
      return 'EIO';
    case NbdErrno.enospc:
      return 'ENOSPC';
    case NbdErrno.enotsup:
      return 'ENOTSUP';
    case NbdErrno.eshutdown:
      return 'ENODEV';
    case NbdErrno.einval:
    case NbdErrno.eoverflow:
    default:
      return 'EINVAL';
  }
}

/** The name of an NBD error number, for messages. */
export function nbdErrnoName(errno: number): string {
  for (const [name, value] of Object.entries(NbdErrno)) {
    if (value === errno) return name.toUpperCase();
  }
  return `error ${errno}`;
}
