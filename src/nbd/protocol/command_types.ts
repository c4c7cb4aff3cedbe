// What commands ask for and answer with above the bytes, shared by the codecs and by both
// sides' APIs: the flags of the write-like commands and the extents BLOCK_STATUS describes.
//
// Types only: no logic and no imports, so that the server's Export (server/export.ts), the
// server's reply encoder (transmission_server.ts) and the client (client/client.ts) can all
// name them without depending on each other. These are the one declaration of the write-like
// commands' flags: the server hands an Export every flag, set or not; a caller of the client
// names only those it wants (Partial: absent means off).

/** WRITE and TRIM: the flag every write-like command may carry. */
export interface WriteOptions {
  /** NBD_CMD_FLAG_FUA (force unit access): the request completes only once its write is durable. */
  readonly fua: boolean;
}

/** WRITE_ZEROES: FUA and the command's own two flags. */
export interface ZeroOptions extends WriteOptions {
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP unless zeroing is faster than writing. */
  readonly fastZero: boolean;
  /**
   * NBD_CMD_FLAG_NO_HOLE: the range must stay allocated rather than become a hole. The server
   * passes it on; the Exports in this project do not look at it.
   */
  readonly noHole: boolean;
}

export interface BlockStatusExtent {
  readonly lengthBytes: number;
  /** The range reads as zeroes (NBD_STATE_ZERO). */
  readonly zero: boolean;
  /** The range is not allocated (NBD_STATE_HOLE). */
  readonly hole: boolean;
}
