// The body of a file's writer thread (file_writer.ts starts it): positional writes, done
// synchronously, a batch per message.
//
// A batch arrives as one SharedArrayBuffer and a list of pieces (where in the buffer, how
// long, where in the file); the thread writes them in order and answers once, with the first
// failure if there was one (the pieces after it are not written). It owns nothing: the file
// descriptor belongs to the FileDevice, which never closes it while a batch is out.

import fs from 'node:fs';
import { parentPort } from 'node:worker_threads';

/** Numbers per piece in WriteBatchRequest.pieces: source offset, length, file offset (bytes). */
export const pieceFields = 3;

export interface WriteBatchRequest {
  readonly id: number;
  readonly fd: number;
  readonly buffer: SharedArrayBuffer;
  /** pieceFields numbers per piece. */
  readonly pieces: Float64Array;
}

export interface WriteBatchReply {
  readonly id: number;
  /** Present when a write failed: the errno code, the message, and the file offset it was at. */
  readonly failure?: { readonly code: string | undefined; readonly message: string; readonly offsetBytes: number };
}

function writeBatch(request: WriteBatchRequest): WriteBatchReply {
  const data = new Uint8Array(request.buffer);
  const pieces = request.pieces;
  for (let i = 0; i + pieceFields <= pieces.length; i += pieceFields) {
    let at = pieces[i] ?? 0;
    let left = pieces[i + 1] ?? 0;
    let offsetBytes = pieces[i + 2] ?? 0;
    try {
      while (left > 0) {
        const n = fs.writeSync(request.fd, data, at, left, offsetBytes);
        at += n;
        left -= n;
        offsetBytes += n;
      }
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      return { id: request.id, failure: { code, message: error instanceof Error ? error.message : String(error), offsetBytes } };
    }
  }
  return { id: request.id };
}

const port = parentPort;
if (port !== null) {
  port.on('message', (request: WriteBatchRequest) => {
    port.postMessage(writeBatch(request));
  });
}
