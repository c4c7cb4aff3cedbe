// Export: what the NBD server serves.
//
// The NBD layer knows nothing about caches, keys or devices. It validates every request at
// the boundary (range, alignment, flags, read-only) and then calls one of these methods, which
// may therefore assume a valid, in-range, 512-byte-aligned request. Methods may complete
// synchronously (return undefined) or return a promise; the server treats both alike and
// avoids a promise round trip for synchronous completions. Failures are PcacheErrors; the
// server maps their codes to NBD error numbers in one place. The pcache engine implements
// this interface structurally; a plain BlockDevice can be served through DeviceExport. The
// option and extent types its methods name live in protocol/command_types.ts, beside the codec
// that encodes them.

import type { BlockStatusExtent, WriteOptions, ZeroOptions } from '../protocol/command_types.js';

type MaybePromise<T> = T | Promise<T>;

export interface Export {
  readonly sizeBytes: number;
  /**
   * `client` numbers the connection the request came on (unique while the process runs), for an
   * Export that treats clients' request streams apart (pcache's sequential cutoff).
   */
  read(target: Uint8Array, offsetBytes: number, client: number): MaybePromise<void>;
  /**
   * `source` is the server's until the call was made and again once it completes
   * successfully: the server reuses it for a later request, so an Export must not keep a
   * reference to it past a successful completion (copy what must outlive the call).
   */
  write(source: Uint8Array, offsetBytes: number, options: WriteOptions, client: number): MaybePromise<void>;
  /** Every write completed before this call is durable when it completes. */
  flush(): MaybePromise<void>;
  /** The range's contents become unspecified (pcache: zeroes). */
  trim(offsetBytes: number, lengthBytes: number, options: WriteOptions): MaybePromise<void>;
  writeZeroes(offsetBytes: number, lengthBytes: number, options: ZeroOptions): MaybePromise<void>;
  /** Prefetch the range (NBD_CMD_CACHE); completes when the data is cached. */
  cache(offsetBytes: number, lengthBytes: number): MaybePromise<void>;
  /**
   * Describes the range from `offsetBytes` onwards as consecutive extents. The first extent
   * starts at `offsetBytes`; together they cover at least one byte and at most `lengthBytes`.
   */
  blockStatus(offsetBytes: number, lengthBytes: number): MaybePromise<BlockStatusExtent[]>;
}
