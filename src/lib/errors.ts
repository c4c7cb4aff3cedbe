// Operating errors: the expected-failure half of pcache's two kinds of failure.
//
// Everything that can go wrong while the program is correct (a device I/O error, a request
// out of range, corrupt or foreign metadata, a shutdown in progress) is a PcacheError whose
// code comes from the closed set below. Code that handles failures switches on `code`; the
// NBD server maps codes to NBD error numbers in exactly one function, and the command line
// maps them to exit status and one line of text. Programmer errors are assertions instead
// (assert.ts) and are never turned into a PcacheError.

export type PcacheErrorCode =
  /** A device read, write or sync failed, or data failed its CRC. */
  | 'EIO'
  /** A device (or the filesystem under it) has no space left. */
  | 'ENOSPC'
  /** A device has gone away (removed, disconnected, closed). */
  | 'ENODEV'
  /** A request is malformed: out of range, misaligned, bad flags, bad option value. */
  | 'EINVAL'
  /** A write to something opened read-only. */
  | 'EPERM'
  /** The operation is valid but not offered here (for example a fast zero that is not fast). */
  | 'ENOTSUP'
  /** The cache is stopping and takes no new work. */
  | 'ESHUTDOWN'
  /** A request waited longer than its configured limit (for example for free cache space). */
  | 'ETIMEDOUT'
  /** On-disk metadata failed its CRC or a bounds check. */
  | 'CORRUPT'
  /** A device holds something that is not this backing device's pcache cache. */
  | 'FOREIGN';

/**
 * Why, more precisely than the code, where a caller decides what to do by it. A closed set:
 * callers switch on it, never on the message text, which is for people and may change.
 */
export type PcacheErrorReason =
  /** The cache device is blank and the caller did not ask for it to be formatted. */
  | 'blank-device'
  /** The device holds data that is not a pcache cache. */
  | 'not-pcache'
  /** The cache was formatted for a backing device of another size. */
  | 'other-backing-size'
  /** The cache was formatted for a backing device with another identity (a copy may be accepted). */
  | 'other-backing-identity'
  /** The cache's log is damaged inside, not merely cut short by a crash: serving would drop acknowledged writes. */
  | 'log-damaged'
  /** The backing device changed since the last clean stop while the cache holds dirty data for it. */
  | 'backing-changed'
  /** A volume cannot be removed now: it holds dirty data, or clients are connected to it. */
  | 'volume-busy'
  /** The cache device holds a single-volume cache (served with --backing), not volumes. */
  | 'single-volume';

export class PcacheError extends Error {
  override readonly name = 'PcacheError';
  readonly code: PcacheErrorCode;
  readonly reason: PcacheErrorReason | undefined;

  constructor(code: PcacheErrorCode, message: string, options?: { cause?: unknown; reason?: PcacheErrorReason | undefined }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.reason = options?.reason;
  }
}

export function isPcacheError(value: unknown): value is PcacheError {
  return value instanceof PcacheError;
}
