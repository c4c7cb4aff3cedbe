// The body of a file's writer thread (file_writer.ts starts it): positional writes, done
// synchronously, a batch per message; and batches of reads (a fragmented client read's pieces,
// BlockDevice.readMany), done the same way into the caller's shared buffer.
//
// A write batch arrives as one SharedArrayBuffer and a list of pieces (where in the buffer, how
// long, where in the file). A copy batch arrives as a list of runs, each a file offset and the
// pieces of other open files (descriptor, offset, length) whose bytes, back to back, make it:
// the thread reads every piece first (pieces of one file a few KiB apart with one pread, see
// spanGapBytesMax), then writes each run with one pwrite. Either way the thread works in order
// and answers once, with the first failure if there was one (nothing after it is written; a
// failed read writes nothing of its batch). It owns no descriptor: each belongs to a FileDevice, which never closes
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

/** Reads into `buffer`: pieceFields numbers per piece, as a write batch's (buffer offset, length, file offset). */
export interface ReadBatchRequest {
  readonly kind: 'read';
  readonly id: number;
  readonly fd: number;
  readonly buffer: SharedArrayBuffer;
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

/**
 * Source pieces of one file closer than this to each other are read with one pread, with the
 * gap between them. Why: writeback's pieces are 4 KiB keys that lie in log order in the cache
 * device, half of them superseded, so a batch's live pieces sit a few KiB apart; reading each
 * on its own cost a system call and a trip through node's fs binding apiece, more than
 * copying a gap of a few blocks (a profile of 4 KiB random writes wrapping the cache: the
 * thread's reads were half its time, a third of that outside the kernel's copy).
 */
const spanGapBytesMax = 16 * 1024;
/** One span read is at most this long. */
const spanBytesMax = 1024 * 1024;
/** Gap bytes one batch reads besides its pieces, at most (the span buffer is the batch's bytes plus this). */
const batchGapBytesMax = 4 * 1024 * 1024;
/** Sorting pieces by source takes (offset / sortAlignBytes) * sortPiecesMax + piece as one number... */
const sortAlignBytes = 512;
/** ...which stays exact (below 2^53) for sources up to 2^49 bytes with this many pieces. */
const sortPiecesMax = 8192;

/** What the batch's pieces were read into, grown to the largest batch seen. */
let spanBuffer = new Uint8Array(0);
/** A run gathered from pieces that do not lie back to back in spanBuffer. */
let copyBuffer = new Uint8Array(0);
/** Per piece of the batch (in batch order): where its source fields start in `runs`... */
let pieceFieldsAt = new Int32Array(0);
/** ...and where its bytes were read to in spanBuffer. */
let pieceBufferAt = new Float64Array(0);
/** Sort keys, then the pieces in source order. */
let sortKeys = new Float64Array(0);

function grownInt32(array: Int32Array<ArrayBuffer>, length: number): Int32Array<ArrayBuffer> {
  return array.length >= length ? array : new Int32Array(Math.max(length, array.length * 2));
}

function grownFloat64(array: Float64Array<ArrayBuffer>, length: number): Float64Array<ArrayBuffer> {
  return array.length >= length ? array : new Float64Array(Math.max(length, array.length * 2));
}

/** Reads `length` bytes at `offsetBytes` of `fd` into spanBuffer at `at`; a short file is EIO. */
function readAll(fd: number, offsetBytes: number, length: number, at: number): void {
  for (let done = 0; done < length;) {
    const n = fs.readSync(fd, spanBuffer, at + done, length - done, offsetBytes + done);
    if (n === 0) throw Object.assign(new Error(`unexpected end of file at ${offsetBytes + done}`), { code: 'EIO' });
    done += n;
  }
}

/**
 * Fills sortKeys[0 .. count) with piece numbers in the order to read them: by source offset
 * when every piece comes from one file at sector-aligned offsets (writeback's always do), else
 * in batch order.
 */
function readOrder(runs: Float64Array, count: number): void {
  sortKeys = grownFloat64(sortKeys, count);
  let sortable = count <= sortPiecesMax;
  const fd = count > 0 ? runs[pieceFieldsAt[0] ?? 0] : undefined;
  for (let piece = 0; piece < count && sortable; piece++) {
    const at = pieceFieldsAt[piece] ?? 0;
    const offsetBytes = runs[at + 1] ?? 0;
    sortable = runs[at] === fd && offsetBytes % sortAlignBytes === 0 && offsetBytes / sortAlignBytes < 2 ** 53 / sortPiecesMax;
    sortKeys[piece] = (offsetBytes / sortAlignBytes) * sortPiecesMax + piece;
  }
  if (!sortable) {
    for (let piece = 0; piece < count; piece++) sortKeys[piece] = piece;
    return;
  }
  const keys = sortKeys.subarray(0, count);
  keys.sort();
  for (let i = 0; i < count; i++) keys[i] = (keys[i] ?? 0) % sortPiecesMax;
}

/**
 * Reads every source piece of the batch into spanBuffer (pieceBufferAt says where), pieces of
 * one file a short gap apart with one pread (see spanGapBytesMax); a failure if one fails.
 */
function readSources(runs: Float64Array): BatchFailure | undefined {
  // The pieces, in batch order.
  let total = 0;
  for (let i = 0; i + runFields <= runs.length;) {
    const pieces = runs[i + 1] ?? 0;
    total += pieces;
    i += runFields + pieces * sourceFields;
  }
  pieceFieldsAt = grownInt32(pieceFieldsAt, total);
  let count = 0;
  let piecesBytes = 0;
  for (let i = 0; i + runFields <= runs.length;) {
    const pieces = runs[i + 1] ?? 0;
    i += runFields;
    for (let piece = 0; piece < pieces; piece++, i += sourceFields) {
      pieceFieldsAt[count++] = i;
      piecesBytes += runs[i + 2] ?? 0;
    }
  }
  pieceBufferAt = grownFloat64(pieceBufferAt, count);
  if (spanBuffer.length < piecesBytes + batchGapBytesMax) spanBuffer = new Uint8Array(piecesBytes + batchGapBytesMax);
  readOrder(runs, count);
  // Spans: runs of pieces of one file, in read order, each within spanGapBytesMax of the last.
  let gapBudgetBytes = batchGapBytesMax;
  let at = 0; // next free byte of spanBuffer
  let spanFd = -1;
  let spanStart = 0;
  let spanEnd = 0;
  let spanAt = 0;
  let spanFirst = 0; // the span's first piece in read order
  for (let k = 0; k < count; k++) {
    const piece = sortKeys[k] ?? 0;
    const fields = pieceFieldsAt[piece] ?? 0;
    const fd = runs[fields] ?? -1;
    const offsetBytes = runs[fields + 1] ?? 0;
    const length = runs[fields + 2] ?? 0;
    const gap = offsetBytes - spanEnd;
    if (fd === spanFd && gap >= 0 && gap <= spanGapBytesMax && gap <= gapBudgetBytes && offsetBytes + length - spanStart <= spanBytesMax) {
      gapBudgetBytes -= gap;
      at += gap;
    } else {
      if (spanFd !== -1) {
        const failure = readSpan(runs, spanFd, spanStart, spanEnd, spanAt, spanFirst, k);
        if (failure !== undefined) return failure;
      }
      spanFd = fd;
      spanStart = offsetBytes;
      spanAt = at;
      spanFirst = k;
    }
    pieceBufferAt[piece] = at;
    at += length;
    spanEnd = offsetBytes + length;
  }
  return spanFd === -1 ? undefined : readSpan(runs, spanFd, spanStart, spanEnd, spanAt, spanFirst, count);
}

/**
 * Reads one span, pieces sortKeys[first .. end) of the batch, into spanBuffer at `at`. If the
 * span read fails, its pieces are read one by one, and only a piece's own failure fails the
 * batch: a gap is bytes no run needs (superseded data, say), and a bad block there must not stop
 * writeback of the data around it.
 */
function readSpan(runs: Float64Array, fd: number, start: number, end: number, at: number, first: number, last: number): BatchFailure | undefined {
  try {
    readAll(fd, start, end - start, at);
    return undefined;
  } catch {
    // Read the pieces on their own, below.
  }
  for (let k = first; k < last; k++) {
    const piece = sortKeys[k] ?? 0;
    const fields = pieceFieldsAt[piece] ?? 0;
    const offsetBytes = runs[fields + 1] ?? 0;
    try {
      readAll(fd, offsetBytes, runs[fields + 2] ?? 0, pieceBufferAt[piece] ?? 0);
    } catch (error) {
      return failureOf(error, offsetBytes, true);
    }
  }
  return undefined;
}

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

/** Reads each piece in order; stops at the first failure (the reading flag set). */
function readBatch(request: ReadBatchRequest): WriteBatchReply {
  const data = new Uint8Array(request.buffer);
  const pieces = request.pieces;
  for (let i = 0; i + pieceFields <= pieces.length; i += pieceFields) {
    const at = pieces[i] ?? 0;
    const length = pieces[i + 1] ?? 0;
    const offsetBytes = pieces[i + 2] ?? 0;
    try {
      for (let done = 0; done < length;) {
        const n = fs.readSync(request.fd, data, at + done, length - done, offsetBytes + done);
        if (n === 0) throw Object.assign(new Error(`unexpected end of file at ${offsetBytes + done}`), { code: 'EIO' });
        done += n;
      }
    } catch (error) {
      return { id: request.id, failure: failureOf(error, offsetBytes, true) };
    }
  }
  return { id: request.id };
}

function copyBatch(request: CopyBatchRequest): WriteBatchReply {
  const runs = request.runs;
  const readFailure = readSources(runs);
  if (readFailure !== undefined) return { id: request.id, failure: readFailure };
  if (copyBuffer.length < request.runBytesMax) copyBuffer = new Uint8Array(request.runBytesMax);
  let piece = 0;
  for (let i = 0; i + runFields <= runs.length;) {
    const offsetBytes = runs[i] ?? 0;
    const count = runs[i + 1] ?? 0;
    i += runFields;
    // A run whose pieces were read back to back (one piece, or data that was contiguous in
    // the source) is written from spanBuffer; any other is gathered into copyBuffer first.
    const firstAt = pieceBufferAt[piece] ?? 0;
    let contiguous = true;
    let runBytes = 0;
    for (let p = 0; p < count; p++, i += sourceFields) {
      if ((pieceBufferAt[piece + p] ?? 0) !== firstAt + runBytes) contiguous = false;
      runBytes += runs[i + 2] ?? 0;
    }
    let data = spanBuffer;
    let dataAt = firstAt;
    if (!contiguous) {
      let to = 0;
      for (let p = 0; p < count; p++) {
        const from = pieceBufferAt[piece + p] ?? 0;
        const length = runs[(pieceFieldsAt[piece + p] ?? 0) + 2] ?? 0;
        copyBuffer.set(spanBuffer.subarray(from, from + length), to);
        to += length;
      }
      data = copyBuffer;
      dataAt = 0;
    }
    piece += count;
    try {
      writeAll(request.fd, data, dataAt, runBytes, offsetBytes);
    } catch (error) {
      return { id: request.id, failure: failureOf(error, offsetBytes, false) };
    }
  }
  return { id: request.id };
}

const port = parentPort;
if (port !== null) {
  port.on('message', (request: WriteBatchRequest | CopyBatchRequest | ReadBatchRequest) => {
    port.postMessage(request.kind === 'write' ? writeBatch(request) : request.kind === 'read' ? readBatch(request) : copyBatch(request));
  });
}
