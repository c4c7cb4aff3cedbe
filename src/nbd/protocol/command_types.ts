// What commands ask for and answer with above the bytes, shared by the codecs and by both
// sides' APIs: the flags of the write-like commands and the extents BLOCK_STATUS describes.
//
// Types only: no logic and no imports, so that the server's Export (server/export.ts), the
// server's reply encoder (transmission_server.ts) and the client can all name them without
// depending on each other.

export interface WriteOptions {
  /** Force unit access: the reply must wait until this write is durable. */
  readonly fua: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP unless zeroing is faster than writing. */
  readonly fastZero: boolean;
}

export interface BlockStatusExtent {
  readonly lengthBytes: number;
  /** The range reads as zeroes (NBD_STATE_ZERO). */
  readonly zero: boolean;
  /** The range is not allocated (NBD_STATE_HOLE). */
  readonly hole: boolean;
}
