// Calling the Export for a request that passed validation, and waiting for the result.
//
// The Export may complete synchronously (returns anything that is not a thenable) or later (a
// PromiseLike); the connection replies without a promise round trip in the first case. A
// rejection that is a PcacheError becomes the request's NBD error; anything else is a programmer
// error, rethrown on the next tick outside every promise chain so that the process stops instead
// of turning a bug into an I/O error.

import { assert } from '../../lib/assert.js';
import { PcacheError } from '../../lib/errors.js';
import { Command, CommandFlag } from '../protocol/constants.js';
import type { NbdRequest } from '../protocol/transmission_server.js';
import type { Export } from './export.js';

/** Calls the Export method for a validated request from connection `client`; READ data goes into the end of `readBuffer`. */
export function invokeExport(exp: Export, request: NbdRequest, readBuffer: Uint8Array | undefined, client: number): unknown {
  const offset = request.offsetBytes;
  const length = request.lengthBytes;
  const fua = request.hasFlag(CommandFlag.fua);
  switch (request.type) {
    case Command.read:
      assert(readBuffer !== undefined, 'READ without a buffer');
      return exp.read(readBuffer.subarray(readBuffer.length - length), offset, client);
    case Command.write:
      assert(request.payload !== undefined && request.payload.length === length, 'WRITE without its payload');
      return exp.write(request.payload, offset, { fua }, client);
    case Command.flush:
      return exp.flush();
    case Command.trim:
      return exp.trim(offset, length, { fua });
    case Command.writeZeroes:
      return exp.writeZeroes(offset, length, {
        fua, fastZero: request.hasFlag(CommandFlag.fastZero), noHole: request.hasFlag(CommandFlag.noHole),
      });
    case Command.cache:
      return exp.cache(offset, length);
    case Command.blockStatus:
      return exp.blockStatus(offset, length);
    default:
      // validateRequest refuses every other type, so none reaches here.
      assert(false, `unexpected command ${request.type}`);
  }
}

/** A promise, or anything else that settles later (an Export may return any PromiseLike). */
export function isThenable(value: unknown): value is PromiseLike<unknown> {
  return typeof value === 'object' && value !== null && typeof (value as { then?: unknown }).then === 'function';
}

/** Bytes a request holds while in flight: its READ buffer or its WRITE payload. */
export function costBytes(request: NbdRequest): number {
  return request.type === Command.read || request.type === Command.write ? request.lengthBytes : 0;
}

/** Whoever completes requests (the connection). */
export interface RequestCompleter {
  complete(request: NbdRequest, value: unknown, error: PcacheError | undefined, readBuffer: Uint8Array | undefined): void;
}

/** Waits for an asynchronous Export call and completes its request (see the file comment for errors). */
export async function settle(completer: RequestCompleter, request: NbdRequest, pending: PromiseLike<unknown>, readBuffer: Uint8Array | undefined): Promise<void> {
  let value: unknown;
  try {
    value = await pending;
  } catch (error) {
    if (error instanceof PcacheError) {
      completer.complete(request, undefined, error, readBuffer);
    } else {
      process.nextTick(rethrow, error);
    }
    return;
  }
  completer.complete(request, value, undefined, readBuffer);
}

function rethrow(error: unknown): never {
  throw error;
}
