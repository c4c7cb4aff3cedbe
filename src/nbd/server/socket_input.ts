// Reading an accepted connection into one buffer that is reused for every read.
//
// Why: node's stream reads allocate a fresh buffer per read (64 KiB, zero-filled, often on
// fresh pages), and that external memory drives the garbage collector: under 100,000 4 KiB
// writes per second, a V8 major collection ran about every 100 ms and the allocation, zeroing
// and page faults took more of the event loop than decoding the requests (docs/performance.md).
// net.Socket's `onread` option reads into a buffer of ours instead, but net.Server offers no
// way to ask for it. So the accepted socket, created paused (the server's pauseOnConnect),
// hands its handle to a new net.Socket constructed with `onread` — the way net.Server itself
// builds sockets from accepted handles — and the emptied original is destroyed, which also
// settles net.Server's connection count. `_handle` and the `handle` option are not documented
// API: if the handle is not there in the expected shape, the socket is read the documented way
// ('data' events, a fresh buffer per read) and nothing else changes.
//
// Contract with the consumer: `onBytes` gets a view of the reused buffer that is valid only
// until it returns. Anything it keeps must be copied (ByteQueue.own does that for the NBD
// decoder).

import net from 'node:net';

/** Size of each connection's read buffer: up to about 60 requests of 4 KiB per read. */
export const readBufferBytes = 256 * 1024;

interface HandleOwner {
  _handle?: unknown;
}

/** A socket handle able to read into a user buffer (node's LibuvStreamWrap). */
function isStreamHandle(handle: unknown): boolean {
  return typeof handle === 'object' && handle !== null && typeof (handle as { useUserBuffer?: unknown }).useUserBuffer === 'function';
}

/**
 * Starts reading `accepted` (a socket from a server created with pauseOnConnect) and returns
 * the socket to use from now on, which is `accepted` itself only on the fallback path.
 * `reused` tells whether bytes arrive in a reused buffer.
 */
export function startReading(accepted: net.Socket, onBytes: (bytes: Uint8Array) => void): { socket: net.Socket; reused: boolean; buffered: Uint8Array[] } {
  // A socket that was read before (one received from another process, or read for a header
  // first: NbdServer.adopt) may hold bytes in its stream buffer: they come first, in order.
  const buffered: Uint8Array[] = [];
  while (accepted.readableLength > 0) {
    const chunk = accepted.read() as Uint8Array | null;
    if (chunk === null) break;
    buffered.push(chunk);
  }
  const owner = accepted as unknown as HandleOwner;
  const handle = owner._handle;
  if (isStreamHandle(handle)) {
    // A handle that is reading already must stop first: the new socket starts it again, and
    // libuv refuses a second start.
    const reading = handle as { reading?: boolean; readStop?: () => number };
    if (reading.reading === true) {
      reading.readStop?.();
      reading.reading = false;
    }
    const buffer = new Uint8Array(readBufferBytes);
    const onread = {
      buffer,
      callback: (length: number, bytes: Uint8Array): boolean => {
        onBytes(bytes.subarray(0, length));
        return true;
      },
    };
    owner._handle = null;
    accepted.destroy();
    const options = { handle, allowHalfOpen: true, readable: true, writable: true, onread };
    return { socket: new net.Socket(options), reused: true, buffered };
  }
  accepted.on('data', onBytes);
  accepted.resume();
  return { socket: accepted, reused: false, buffered };
}
