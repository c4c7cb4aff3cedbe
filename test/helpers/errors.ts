// Matching PcacheErrors in assert.throws / assert.rejects, or on an error caught by hand.

import assert from 'node:assert/strict';
import { PcacheError, type PcacheErrorCode } from '../../src/lib/errors.js';

/**
 * A validator for assert.throws and assert.rejects: the error must be a PcacheError with `code`
 * (and a message matching `message`, when given). It asserts, so a mismatch names what came.
 */
export function isCode(code: PcacheErrorCode, message?: RegExp): (error: unknown) => boolean {
  return (error: unknown) => {
    assert.ok(error instanceof PcacheError, `expected a PcacheError, got ${String(error)}`);
    assert.equal(error.code, code, error.message);
    if (message !== undefined) assert.match(error.message, message);
    return true;
  };
}
