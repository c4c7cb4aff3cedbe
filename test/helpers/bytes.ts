// Byte streams in tests: deterministic pseudo-random bytes, so a failure reproduces byte for
// byte; and a decoder fed one stream in every way it can arrive.

import assert from 'node:assert/strict';

/** `length` pseudo-random bytes from `seed` (xorshift32); the same seed gives the same bytes. */
export function patternBytes(length: number, seed: number): Buffer {
  const bytes = Buffer.alloc(length);
  let state = seed >>> 0 || 1;
  for (let i = 0; i < length; i += 1) {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    bytes[i] = state & 0xff;
  }
  return bytes;
}

/**
 * Feeds `bytes` to `run` whole, split in two at every offset, and one byte at a time: every
 * feed must give the same result (deepEqual), which is returned.
 */
export function assertChunkingInvariant<T>(bytes: Buffer, run: (chunks: Uint8Array[]) => T): T {
  const whole = run([bytes]);
  for (let cut = 1; cut < bytes.length; cut += 1) {
    assert.deepEqual(run([bytes.subarray(0, cut), bytes.subarray(cut)]), whole, `split at byte ${cut} differs`);
  }
  const singles: Uint8Array[] = [];
  for (let i = 0; i < bytes.length; i += 1) singles.push(bytes.subarray(i, i + 1));
  assert.deepEqual(run(singles), whole, 'byte-by-byte feed differs');
  return whole;
}
