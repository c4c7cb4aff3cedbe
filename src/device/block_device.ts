// BlockDevice: the one interface through which pcache reaches storage.
//
// The cache engine talks to its cache device and its backing device only through this
// interface, so a file, a block device, memory, a remote NBD export or the crash simulator
// can stand in for either. Contract for every implementation:
// - offsets and lengths are byte counts; a request never extends past `sizeBytes`;
// - a write is visible to later reads as soon as it completes, but it is durable (survives
//   power loss) only after a later `sync()` has completed;
// - failures are PcacheErrors ('EIO', 'ENOSPC', 'ENODEV'), never raw system errors;
// - `discard`, where offered, leaves the range reading as zeroes.
//
// Devices that can complete reads and writes without waiting (memory; a file on persistent
// memory or in the page cache) expose them through `blocking`. The engine uses it for the
// fast cache device, where a synchronous pread/pwrite of a few KiB costs about a microsecond
// and the thread-pool round trip of the asynchronous calls would cost more than the I/O.

export interface BlockDevice {
  readonly sizeBytes: number;
  /**
   * A stable identity for the storage behind this device (for example a file's inode or a
   * disk's serial number), or undefined when it has none. pcache records it in the cache's
   * superblock and refuses to pair the cache with a different backing device.
   */
  readonly identity: string | undefined;
  /** Synchronous positional I/O, when this device offers it. */
  readonly blocking: BlockingIo | undefined;

  read(target: Uint8Array, offsetBytes: number): Promise<void>;
  write(source: Uint8Array, offsetBytes: number): Promise<void>;
  /**
   * Several writes at unrelated offsets as one request, where the device does that more
   * cheaply than one write() each (a file hands them to its writer thread in one message
   * instead of one thread-pool request per write). Resolves when every write has completed;
   * rejects on the first failure, and then any subset of them may have happened. The writes
   * must not overlap. Sources that are views of one SharedArrayBuffer reach a writer thread
   * without a copy.
   */
  writeMany?(writes: readonly DeviceWrite[]): Promise<void>;
  /**
   * Like writeMany, but each write's bytes are gathered by the device itself from open files
   * (FileExtents another device located), so they never pass through the caller's thread. The
   * caller guarantees the source bytes do not change until the promise settles.
   */
  copyMany?(copies: readonly DeviceCopy[]): Promise<void>;
  /**
   * Several reads at unrelated offsets as one request, done off the caller's thread (a file:
   * by its own thread, one message for the whole batch, even when the device is blocking).
   * For a caller that has other work to do meanwhile: the reads of one request then overlap
   * that work. Resolves when every read has completed; rejects on the first failure, and then
   * the targets hold any subset of the bytes. Targets that are views of one SharedArrayBuffer
   * are filled in place; any others are read into a shared buffer and copied over.
   */
  readMany?: ((reads: readonly DeviceRead[]) => Promise<void>) | undefined;
  /** Makes every write that completed before this call durable. */
  sync(): Promise<void>;
  /** Drops the range's contents; afterwards it reads as zeroes. */
  discard?(offsetBytes: number, lengthBytes: number): Promise<void>;
  /**
   * A cheap description of the device's present state that any write changes (a file: its
   * size, device, inode and change times), where the device can give one; pcache compares
   * it across a stop to notice writes made by others. Absent, or undefined, when the device
   * cannot: pcache then samples blocks (src/cache/cache_backing.ts).
   */
  fingerprint?(): Promise<string | undefined>;
  close(): Promise<void>;
}

export interface DeviceWrite {
  readonly source: Uint8Array;
  readonly offsetBytes: number;
}

export interface DeviceRead {
  readonly target: Uint8Array;
  readonly offsetBytes: number;
}

/** Bytes of an open file: where a device keeps a range (BlockingIo.locate). */
export interface FileExtent {
  /** Open for as long as the device that located it is. */
  readonly fd: number;
  readonly offsetBytes: number;
}

/** One write for copyMany: the sources' bytes, back to back, go to `offsetBytes`. */
export interface DeviceCopy {
  readonly offsetBytes: number;
  readonly sources: readonly { readonly from: FileExtent; readonly lengthBytes: number }[];
}

export interface BlockingIo {
  readSync(target: Uint8Array, offsetBytes: number): void;
  writeSync(source: Uint8Array, offsetBytes: number): void;
  /** Writes `sources` back to back from `offsetBytes` in one call, where the device can. */
  writevSync?(sources: readonly Uint8Array[], offsetBytes: number): void;
  /**
   * Where the range lives in an open file, when it lies in one piece of one (a file device, or
   * a volume of one): another device's writer thread can then copy it without this thread.
   */
  locate?(offsetBytes: number, lengthBytes: number): FileExtent | undefined;
}

/** Asserts nothing; returns a message when a request does not fit the device. */
export function rangeProblem(device: { sizeBytes: number }, offsetBytes: number, lengthBytes: number): string | undefined {
  if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0) return `bad offset ${offsetBytes}`;
  if (!Number.isSafeInteger(lengthBytes) || lengthBytes < 0) return `bad length ${lengthBytes}`;
  if (offsetBytes + lengthBytes > device.sizeBytes) {
    return `range ${offsetBytes}+${lengthBytes} ends past the device end ${device.sizeBytes}`;
  }
  return undefined;
}
