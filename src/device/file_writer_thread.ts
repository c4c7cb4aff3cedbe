// The body of a file's writer thread (file_writer.ts starts it): positional writes, done
// synchronously, a batch per message.
//
// A write batch arrives as one SharedArrayBuffer and a list of pieces (where in the buffer, how
// long, where in the file). A copy batch arrives as a list of runs, each a file offset and the
// pieces of other open files (descriptor, offset, length) whose bytes, back to back, make it:
// the thread reads them into its own buffer and writes the run with one pwrite. Either way the
// thread works in order and answers once, with the first failure if there was one (nothing
// after it is written). It owns no descriptor: each belongs to a FileDevice, which never closes
// it while a batch is out (and the caller of a copy keeps its source open and unchanged).

import fs from 'node:fs';
import { parentPort } from 'node:worker_threads';

/** Numbers per piece in WriteBatchRequest.pieces: source offset, length, file offset (bytes). */
export const pieceFields = 3;

/** Numbers per copy run in CopyBatchRequest.runs: file offset, source piece count; then per piece sourceFields. */
export const runFields = 2;
/** Numbers per source piece: descriptor, offset, length. */
export const sourceFields = 3;

export interface WriteBatchRequest {
  readonly kind: 'write';
  readonly id: number;
  readonly fd: number;
  readonly buffer: SharedArrayBuffer;
  /** pieceFields numbers per piece. */
  readonly pieces: Float64Array;
}

export interface CopyBatchRequest {
  readonly kind: 'copy';
  readonly id: number;
  readonly fd: number;
  /** Per run: runFields numbers, then sourceFields per source piece. */
  readonly runs: Float64Array;
  /** The longest run, in bytes (the thread's buffer must hold it). */
  readonly runBytesMax: number;
}

export interface BatchFailure {
  readonly code: string | undefined;
  readonly message: string;
  /** The offset it was at: in the destination file, or with `reading`, in the source. */
  readonly offsetBytes: number;
  /** A copy's read of its source failed, not the write. */
  readonly reading: boolean;
}

export interface WriteBatchReply {
  readonly id: number;
  readonly failure?: BatchFailure;
}

function failureOf(error: unknown, offsetBytes: number, reading: boolean): BatchFailure {
  return { code: (error as NodeJS.ErrnoException).code, message: error instanceof Error ? error.message : String(error), offsetBytes, reading };
}

/** Writes `length` bytes of `data` from `at` to `fd` at `offsetBytes`, however many calls it takes. */
function writeAll(fd: number, data: Uint8Array, at: number, length: number, offsetBytes: number): void {
  let done = 0;
  while (done < length) done += fs.writeSync(fd, data, at + done, length - done, offsetBytes + done);
}

/** The copy buffer, grown to the longest run seen (runs are at most writeback's run size). */
let copyBuffer = new Uint8Array(0);

function writeBatch(request: WriteBatchRequest): WriteBatchReply {
  const data = new Uint8Array(request.buffer);
  const pieces = request.pieces;
  for (let i = 0; i + pieceFields <= pieces.length; i += pieceFields) {
    const offsetBytes = pieces[i + 2] ?? 0;
    try {
      writeAll(request.fd, data, pieces[i] ?? 0, pieces[i + 1] ?? 0, offsetBytes);
    } catch (error) {
      return { id: request.id, failure: failureOf(error, offsetBytes, false) };
    }
  }
  return { id: request.id };
}

function copyBatch(request: CopyBatchRequest): WriteBatchReply {
  if (copyBuffer.length < request.runBytesMax) copyBuffer = new Uint8Array(request.runBytesMax);
  const runs = request.runs;
  for (let i = 0; i + runFields <= runs.length;) {
    const offsetBytes = runs[i] ?? 0;
    const count = runs[i + 1] ?? 0;
    i += runFields;
    let at = 0;
    for (let piece = 0; piece < count; piece++, i += sourceFields) {
      const sourceFd = runs[i] ?? -1;
      const sourceOffset = runs[i + 1] ?? 0;
      const length = runs[i + 2] ?? 0;
      try {
        for (let done = 0; done < length;) {
          const n = fs.readSync(sourceFd, copyBuffer, at + done, length - done, sourceOffset + done);
          if (n === 0) throw Object.assign(new Error(`unexpected end of file at ${sourceOffset + done}`), { code: 'EIO' });
          done += n;
        }
      } catch (error) {
        return { id: request.id, failure: failureOf(error, sourceOffset, true) };
      }
      at += length;
    }
    try {
      writeAll(request.fd, copyBuffer, 0, at, offsetBytes);
    } catch (error) {
      return { id: request.id, failure: failureOf(error, offsetBytes, false) };
    }
  }
  return { id: request.id };
}

const port = parentPort;
if (port !== null) {
  port.on('message', (request: WriteBatchRequest | CopyBatchRequest) => {
    port.postMessage(request.kind === 'write' ? writeBatch(request) : copyBatch(request));
  });
}
