// The sequential cutoff's stream table (cache_streams.ts) against a plain model of its rule: a
// request continues the first slot (in slot order) whose stream ended where the request starts,
// or starts a stream in the least recently used slot (unused slots first, lowest first). The
// table keeps its slots in use order with a ring instead of scanning last-use times, so the
// ring must pick exactly the slot the model picks, on any mix of streams and random requests.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { StreamTable, streamsPerClientMax } from '../../src/cache/cache_streams.js';

/** The rule written the obvious way: a last-use time per slot, scanned for the oldest. */
class StreamModel {
  private readonly clients = new Map<number, { ends: number[]; runs: number[]; usedAt: number[] }>();
  private now = 0;

  note(client: number, offsetBytes: number, lengthBytes: number): number {
    let streams = this.clients.get(client);
    if (streams === undefined) {
      streams = { ends: new Array<number>(streamsPerClientMax).fill(-1), runs: new Array<number>(streamsPerClientMax).fill(0), usedAt: new Array<number>(streamsPerClientMax).fill(0) };
      this.clients.set(client, streams);
    }
    const now = ++this.now;
    let slot = streams.ends.indexOf(offsetBytes);
    let run = lengthBytes;
    if (slot >= 0) {
      run += streams.runs[slot] ?? 0;
    } else {
      slot = 0;
      for (let other = 1; other < streamsPerClientMax; other++) if ((streams.usedAt[other] ?? 0) < (streams.usedAt[slot] ?? 0)) slot = other;
    }
    streams.ends[slot] = offsetBytes + lengthBytes;
    streams.runs[slot] = run;
    streams.usedAt[slot] = now;
    return run;
  }
}

describe('stream table', () => {
  it('picks the same stream as the model on interleaved streams, repeats and random requests', () => {
    const table = new StreamTable();
    const model = new StreamModel();
    let seed = 7;
    const random = (n: number): number => {
      seed = (Math.imul(seed, 1103515245) + 12345) & 0x7fffffff;
      return seed % n;
    };
    // A few clients, each with up to 12 stream heads (more than a client keeps), stepping one of
    // them, restarting one at an earlier place (so two streams can end at the same offset), or
    // sending a random request.
    const heads = new Map<number, number[]>();
    let continued = 0;
    for (let request = 0; request < 200_000; request++) {
      const client = random(3);
      let streams = heads.get(client);
      if (streams === undefined) {
        streams = Array.from({ length: 12 }, (_, index) => index * 1024 * 1024);
        heads.set(client, streams);
      }
      const choice = random(10);
      const length = (1 + random(4)) * 4096;
      let offset: number;
      if (choice < 6) {
        const which = random(choice < 3 ? 3 : streams.length);
        offset = streams[which] ?? 0;
        streams[which] = offset + length;
      } else if (choice < 8) {
        const which = random(streams.length);
        offset = Math.max(0, (streams[which] ?? 0) - 4096 * random(8));
        streams[which] = offset + length;
      } else {
        offset = random(1 << 20) * 4096;
      }
      const expected = model.note(client, offset, length);
      assert.equal(table.note(client, offset, length), expected, `request ${request}`);
      if (expected > length) continued++;
    }
    assert.ok(continued > 50_000, `streams were continued (${continued})`);
  });
});
