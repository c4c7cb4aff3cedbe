// BusyPoll on a hand-driven clock: when a window opens (short busy periods only), how it ends
// (input: a hit; the deadline: a miss), how an idle moment inside a window restarts it, the
// back-off after misses, and stop(). The server test
// below it checks the wiring: a QD1 client is polled for, a deep batch and a zero window are not.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { BusyPoll, type BusyPollClock, busyRequestsMax, missSkipMax } from '../../../src/nbd/server/busy_poll.js';
import { PcacheError } from '../../../src/lib/errors.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import { MiB } from '../../../src/lib/units.js';
import { connectAndGo } from '../../helpers/nbd_raw_client.js';
import { ControlledExport, startServer } from '../../helpers/nbd_server.js';
import { CMD, ERR } from '../../helpers/nbd_wire.js';
import { sleep } from '../../helpers/wait.js';

/** Time moves only when the test says so; scheduled steps run when the test says so. */
class HandClock implements BusyPollClock {
  now = 0;
  readonly queued: (() => void)[] = [];
  nowMs(): number {
    return this.now;
  }
  schedule(callback: () => void): void {
    this.queued.push(callback);
  }
  /** Runs the steps queued now (each may queue the next). */
  runQueued(): void {
    const steps = this.queued.splice(0);
    for (const step of steps) step();
  }
}

/** A window of 100 us on a hand clock. */
function setup(windowUs = 100): { poll: BusyPoll; clock: HandClock } {
  const clock = new HandClock();
  return { poll: new BusyPoll(windowUs, clock), clock };
}

/** Lets the open window run past its deadline: a miss. */
function expire(poll: BusyPoll, clock: HandClock): void {
  assert.ok(poll.active);
  clock.runQueued();
  assert.ok(poll.active, 'a window closed before its deadline');
  clock.now += 100;
  clock.runQueued();
  assert.ok(!poll.active, 'a window outlived its deadline');
}

describe('busy poll window', () => {
  it('polls after a short busy period until input arrives, and counts a hit', () => {
    const { poll, clock } = setup();
    poll.idle(1);
    assert.ok(poll.active);
    for (let step = 0; step < 5; step += 1) {
      clock.now += 0.01;
      clock.runQueued();
      assert.ok(poll.active, 'the window closed early');
      assert.equal(clock.queued.length, 1, 'each step queues exactly one more');
    }
    poll.noteInput();
    clock.runQueued();
    assert.ok(!poll.active);
    assert.equal(clock.queued.length, 0);
    assert.deepEqual(poll.counters, { busyPollHitsTotal: 1, busyPollMissesTotal: 0 });
  });

  it('opens no window after a long busy period, with a zero window, or while one is open', () => {
    const { poll, clock } = setup();
    poll.idle(busyRequestsMax + 1);
    assert.ok(!poll.active);
    assert.equal(clock.queued.length, 0);
    poll.idle(busyRequestsMax);
    assert.ok(poll.active);
    poll.idle(1);
    assert.equal(clock.queued.length, 1, 'a second window opened beside the first');

    const off = setup(0);
    off.poll.idle(1);
    assert.ok(!off.poll.active);
    assert.equal(off.clock.queued.length, 0);
  });

  it('a connection going idle while the window is open (a reply sent at once) counts the hit and polls on from now', () => {
    const { poll, clock } = setup();
    poll.idle(1);
    clock.now += 0.05;
    clock.runQueued();
    // The next request arrives and is answered within the same turn, before the next step.
    poll.noteInput();
    clock.now += 0.01;
    poll.idle(1);
    assert.deepEqual(poll.counters, { busyPollHitsTotal: 1, busyPollMissesTotal: 0 });
    assert.equal(clock.queued.length, 1, 'the queued step carries on; no second chain');
    // The old deadline (0.1 ms) passes: the window, restarted at 0.06 ms, is still open.
    clock.now = 0.12;
    clock.runQueued();
    assert.ok(poll.active, 'the window closed on the input that came before the restart');
    clock.now = 0.16;
    clock.runQueued();
    assert.ok(!poll.active);
    assert.deepEqual(poll.counters, { busyPollHitsTotal: 1, busyPollMissesTotal: 1 });
    // Without input before it, an idle moment during a window extends it and counts nothing.
    poll.idle(1);
    assert.ok(!poll.active, 'the idle moment after one miss is skipped');
    poll.idle(1);
    assert.ok(poll.active);
    poll.idle(1);
    assert.deepEqual(poll.counters, { busyPollHitsTotal: 1, busyPollMissesTotal: 1 });
  });

  it('input that came before the window opened does not count as a hit', () => {
    const { poll, clock } = setup();
    poll.noteInput();
    poll.idle(1);
    clock.runQueued();
    assert.ok(poll.active);
    expire(poll, clock);
    assert.deepEqual(poll.counters, { busyPollHitsTotal: 0, busyPollMissesTotal: 1 });
  });

  it('skips 2^misses - 1 idle moments after consecutive misses, at most missSkipMax, and a hit resets that', () => {
    const { poll, clock } = setup(1000);
    poll.idle(1);
    expire(poll, clock);
    const skippedAfterMiss: number[] = [];
    for (let round = 0; round < 8; round += 1) {
      let skipped = 0;
      for (poll.idle(1); !poll.active; poll.idle(1)) skipped += 1;
      skippedAfterMiss.push(skipped);
      expire(poll, clock);
    }
    assert.deepEqual(skippedAfterMiss, [1, 3, 7, 15, 31, missSkipMax, missSkipMax, missSkipMax]);
    assert.equal(poll.counters.busyPollMissesTotal, 9);
    for (let skipped = 0; skipped < missSkipMax; skipped += 1) poll.idle(1);
    poll.idle(1);
    assert.ok(poll.active);
    poll.noteInput();
    clock.runQueued();
    // The hit reset the count: the next idle moment is polled at once.
    poll.idle(1);
    assert.ok(poll.active);
  });

  it('stop() closes an open window at its next step and opens no more', () => {
    const { poll, clock } = setup();
    poll.idle(1);
    poll.stop();
    clock.runQueued();
    assert.ok(!poll.active);
    assert.equal(clock.queued.length, 0);
    poll.idle(1);
    assert.ok(!poll.active);
    assert.deepEqual(poll.counters, { busyPollHitsTotal: 0, busyPollMissesTotal: 0 });
  });

  it('refuses a window outside [0, busyPollWindowMaxUs] when a server is built', () => {
    const exp = new ControlledExport(MiB);
    for (const busyPollUs of [-1, 10_001, 1.5]) {
      assert.throws(() => new NbdServer({ export: exp, exportName: 'x', readOnly: false, busyPollUs }),
        (error: unknown) => error instanceof PcacheError && error.code === 'EINVAL' && /busy poll window/.test(error.message));
    }
  });
});

describe('busy polling in the server', () => {
  async function sequentialReads(busyPollUs: number, count: number): Promise<{ hits: number; misses: number }> {
    const exp = new ControlledExport(MiB);
    const srv = await startServer({ export: exp, busyPollUs });
    try {
      const { client } = await connectAndGo(srv.path);
      for (let index = 0; index < count; index += 1) {
        client.send({ type: CMD.read, cookie: BigInt(index), offset: index * 512, length: 512 });
        assert.equal((await client.simpleReply(512)).error, ERR.ok);
      }
      client.disconnect();
      const stats = srv.server.stats();
      return { hits: stats.busyPollHitsTotal, misses: stats.busyPollMissesTotal };
    } finally {
      await srv.stop();
    }
  }

  it('polls for a queue-depth-1 client and catches its next request', async () => {
    // A window far longer than this process needs to send the next request.
    const { hits } = await sequentialReads(10_000, 50);
    assert.ok(hits >= 40, `only ${hits} of 50 requests arrived during a window`);
  });

  it('never polls with a zero window', async () => {
    assert.deepEqual(await sequentialReads(0, 20), { hits: 0, misses: 0 });
  });

  it('does not poll after a deep batch', async () => {
    const exp = new ControlledExport(MiB);
    const srv = await startServer({ export: exp, busyPollUs: 10_000 });
    try {
      const { client } = await connectAndGo(srv.path);
      // The end of negotiation may open a window of its own (the first request is due).
      await sleep(20);
      const before = srv.server.stats();
      const count = 64;
      for (let index = 0; index < count; index += 1) client.send({ type: CMD.read, cookie: BigInt(index), offset: index * 512, length: 512 });
      for (let index = 0; index < count; index += 1) assert.equal((await client.simpleReply(512)).error, ERR.ok);
      const stats = srv.server.stats();
      const windows = stats.busyPollHitsTotal + stats.busyPollMissesTotal - before.busyPollHitsTotal - before.busyPollMissesTotal;
      assert.equal(windows, 0, 'a window opened after a 64-request batch');
      client.disconnect();
    } finally {
      await srv.stop();
    }
  });
});
