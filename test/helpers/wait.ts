// Waiting in tests: a plain sleep, and polling a condition with a time limit that fails the
// test naming what it waited for.

import assert from 'node:assert/strict';

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Polls `condition` (every `intervalMs`) until it holds; fails naming `what` after `timeoutMs`.
 * The condition may be asynchronous (a status asked of a server, say).
 */
export async function waitUntil(condition: () => boolean | Promise<boolean>, what: string, timeoutMs = 15_000, intervalMs = 5): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) assert.fail(`timed out waiting until ${what}`);
    await sleep(intervalMs);
  }
}
