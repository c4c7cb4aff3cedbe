// Oracle tests. Goal: payload sectors identify exactly one (write, sector) or are caught as
// garbage or misplaced; floor and allowed follow docs/testing.md ("The oracle") for flush, FUA, TRIM,
// WRITE_ZEROES, failures and overlapping requests; the epoch-prefix check accepts prefixes
// (last epoch partial) and rejects anything out of order.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { crc32c } from '../../src/lib/crc32c.js';
import {
  compareReads,
  decodeSector,
  describeValue,
  fillPayload,
  payloadValue,
  RequestHistory,
  sectorValues,
  writePayloadSector,
  zeroValue,
  type OracleView,
} from '../../sim/oracle.js';

const blockBytes = 4096;
const deviceBytes = 8 * blockBytes;

/** A history whose device clock the test advances by hand (one tick per "device event"). */
function history(): { history: RequestHistory; tick: () => void } {
  let clock = 0;
  return {
    history: new RequestHistory({ sizeBytes: deviceBytes, clock: () => clock }),
    tick: () => {
      clock += 1;
    },
  };
}

function values(view: OracleView, sector: number): string[] {
  return [...view.allowed(sector)].map(describeValue).sort();
}

/** Sector values of an image where block `block` holds payload `payloadId` (0: zeroes). */
function image(blocks: readonly number[]): Float64Array {
  const bytes = new Uint8Array(deviceBytes);
  blocks.forEach((payloadId, block) => {
    if (payloadId > 0) fillPayload(bytes.subarray(block * blockBytes, (block + 1) * blockBytes), block * blockBytes, payloadId);
  });
  return sectorValues(bytes, 0);
}

describe('payload sectors', () => {
  it('decode to the write and sector that produced them', () => {
    const bytes = new Uint8Array(2 * blockBytes);
    fillPayload(bytes, 8192, 77);
    assert.deepEqual(decodeSector(bytes.subarray(512 * 3, 512 * 4), 16 + 3), { kind: 'payload', payloadId: 77, sectorIndex: 3 });
    assert.deepEqual(decodeSector(new Uint8Array(512), 5), { kind: 'zero' });
  });

  it('are caught when found at another lba, or damaged anywhere', () => {
    const sector = new Uint8Array(512);
    writePayloadSector(sector, 40, 3, 0);
    assert.equal(decodeSector(sector, 41).kind, 'misplaced');
    for (const offset of [0, 5, 13, 300, 511]) {
      const damaged = sector.slice();
      damaged[offset] = (damaged[offset] ?? 0) ^ 0x10;
      assert.equal(decodeSector(damaged, 40).kind, 'garbage', `flip at byte ${offset}`);
    }
    assert.equal(decodeSector(new Uint8Array(512).fill(0xaa), 0).kind, 'garbage');
  });

  it('do not all share one CRC32C, so a system checksumming its data can tell them apart', () => {
    // A CRC32C stored at the end of a sector would make crc32c(sector) a constant residue, and
    // the CRC32C of any run of payload sectors the same: the engine's data CRC would be blind.
    const a = new Uint8Array(2 * 512);
    const b = new Uint8Array(2 * 512);
    fillPayload(a, 0, 1);
    fillPayload(b, 8192, 77);
    assert.notEqual(crc32c(a), crc32c(b));
    assert.notEqual(crc32c(a.subarray(0, 512)), crc32c(a.subarray(512)));
    const swapped = new Uint8Array(2 * 512);
    swapped.set(a.subarray(512), 0);
    swapped.set(a.subarray(0, 512), 512);
    assert.notEqual(crc32c(swapped), crc32c(a));
  });

  it('differ between writes and sectors, so no two are alike', () => {
    const a = new Uint8Array(512);
    const b = new Uint8Array(512);
    writePayloadSector(a, 0, 1, 0);
    writePayloadSector(b, 0, 2, 0);
    assert.notDeepEqual(a.subarray(20, 508), b.subarray(20, 508));
    assert.equal(describeValue(payloadValue(12, 3)), 'write#12[3]');
  });
});

describe('floor and allowed', () => {
  it('allow an unflushed write or the old contents, and require a flushed one', () => {
    const { history: h, tick } = history();
    const write = h.issueWrite(0, blockBytes, 1, { fua: false });
    tick();
    h.reply(write, true);
    const beforeFlush = h.cut(1);
    assert.deepEqual(values(beforeFlush, 0), ['write#1[0]', 'zero']);
    const flush = h.issueFlush();
    tick();
    h.reply(flush, true);
    // Crash after the sync but before the reply: the flush was not acknowledged.
    assert.deepEqual(values(h.cut(1), 0), ['write#1[0]', 'zero']);
    const afterFlush = h.cut(2);
    assert.deepEqual(afterFlush.floor(3).map(describeValue), ['write#1[3]']);
    assert.deepEqual(values(afterFlush, 3), ['write#1[3]']);
    assert.deepEqual(values(afterFlush, 8), ['zero'], 'the next block was never written');
  });

  it('allow the floor and everything sent after it', () => {
    const { history: h, tick } = history();
    for (const payloadId of [1, 2]) {
      const write = h.issueWrite(0, blockBytes, payloadId, { fua: false });
      tick();
      h.reply(write, true);
    }
    const flush = h.issueFlush();
    tick();
    h.reply(flush, true);
    const later = h.issueWrite(0, blockBytes, 3, { fua: false });
    tick();
    const inFlight = h.issueWrite(0, blockBytes, 4, { fua: false });
    h.reply(later, true);
    const view = h.cut(4);
    assert.deepEqual(view.floor(0).map(describeValue), ['write#2[0]']);
    assert.deepEqual(values(view, 0), ['write#2[0]', 'write#3[0]', 'write#4[0]']);
    assert.equal(inFlight.replyTime, undefined);
  });

  it('require an acknowledged FUA write by itself', () => {
    const { history: h, tick } = history();
    const write = h.issueWrite(blockBytes, blockBytes, 5, { fua: true });
    tick();
    h.reply(write, true);
    assert.deepEqual(values(h.cut(1), 8), ['write#5[0]']);
  });

  it('let a TRIM add zero while the trimmed value stays allowed', () => {
    const { history: h, tick } = history();
    const write = h.issueWrite(0, blockBytes, 1, { fua: true });
    tick();
    h.reply(write, true);
    const trim = h.issueTrim(0, blockBytes, { fua: true });
    tick();
    h.reply(trim, true);
    assert.deepEqual(values(h.cut(2), 0), ['write#1[0]', 'zero']);
  });

  it('make an acknowledged, flushed WRITE_ZEROES read as zeroes', () => {
    const { history: h, tick } = history();
    const write = h.issueWrite(0, blockBytes, 1, { fua: true });
    tick();
    h.reply(write, true);
    const zeroes = h.issueWriteZeroes(0, blockBytes, { fua: false });
    tick();
    h.reply(zeroes, true);
    const flush = h.issueFlush();
    tick();
    h.reply(flush, true);
    assert.deepEqual(values(h.cut(3), 0), ['zero']);
  });

  it('never require a failed write or count a failed flush', () => {
    const { history: h, tick } = history();
    const failed = h.issueWrite(0, blockBytes, 1, { fua: true });
    tick();
    h.reply(failed, false);
    const good = h.issueWrite(blockBytes, blockBytes, 2, { fua: false });
    tick();
    h.reply(good, true);
    const flush = h.issueFlush();
    tick();
    h.reply(flush, false);
    const view = h.cut(3);
    assert.deepEqual(values(view, 0), ['write#1[0]', 'zero']);
    assert.deepEqual(values(view, 8), ['write#2[0]', 'zero']);
  });

  it('allow either of two overlapping writes that were in flight together', () => {
    const { history: h, tick } = history();
    const first = h.issueWrite(0, blockBytes, 1, { fua: false });
    const second = h.issueWrite(0, blockBytes, 2, { fua: false });
    tick();
    h.reply(second, true);
    h.reply(first, true);
    const flush = h.issueFlush();
    tick();
    h.reply(flush, true);
    const view = h.cut(2);
    assert.deepEqual(view.floor(0).map(describeValue).sort(), ['write#1[0]', 'write#2[0]']);
    assert.deepEqual(values(view, 0), ['write#1[0]', 'write#2[0]']);
  });

  it('start from given initial values', () => {
    const h = new RequestHistory({ sizeBytes: deviceBytes, initial: (sector) => (sector === 0 ? payloadValue(9, 0) : zeroValue) });
    assert.deepEqual(values(h.now(), 0), ['write#9[0]']);
    assert.deepEqual(values(h.now(), 1), ['zero']);
  });
});

describe('checks', () => {
  it('report each bad sector with what was found and what was allowed', () => {
    const { history: h, tick } = history();
    const write = h.issueWrite(0, blockBytes, 1, { fua: true });
    tick();
    h.reply(write, true);
    const bytes = new Uint8Array(deviceBytes);
    fillPayload(bytes.subarray(0, blockBytes), 0, 1);
    bytes.subarray(512, 1024).fill(0); // lost
    bytes[2048 + 100] = (bytes[2048 + 100] ?? 0) ^ 1; // damaged
    bytes.set(bytes.subarray(0, 512), 3072); // sector 0's payload found at sector 6
    writePayloadSector(bytes.subarray(blockBytes, blockBytes + 512), 8, 33, 0); // never written there
    const violations = h.cut(1).checkSectors(bytes, 0);
    assert.deepEqual(
      violations.map((violation) => [violation.sector, violation.reason, violation.found]),
      [
        [1, 'stale', 'zero'],
        [4, 'garbage', 'garbage'],
        [6, 'misplaced', 'misplaced'],
        [8, 'unexpected', 'write#33[0]'],
      ],
    );
    assert.deepEqual(violations[0]?.expected, ['write#1[1]']);
  });

  it('accept a backing device that holds a prefix of the flush epochs, the last one partial', () => {
    const { history: h, tick } = history();
    const epochs = [
      [1, 2],
      [3, 4],
    ];
    for (const epoch of epochs) {
      for (const payloadId of epoch) {
        const write = h.issueWrite((payloadId - 1) * blockBytes, blockBytes, payloadId, { fua: false });
        tick();
        h.reply(write, true);
      }
      const flush = h.issueFlush();
      tick();
      h.reply(flush, true);
    }
    const view = h.cut(6);
    assert.equal(view.checkEpochPrefix(image([1, 2, 3, 4]), 0).epoch, 2);
    assert.equal(view.checkEpochPrefix(image([1, 2, 0, 4]), 0).epoch, 1, 'epoch 1 partial');
    assert.equal(view.checkEpochPrefix(image([1, 0, 0, 0]), 0).epoch, 0, 'epoch 0 partial');
    const outOfOrder = view.checkEpochPrefix(image([0, 2, 3, 0]), 0);
    assert.equal(outOfOrder.epoch, undefined, 'epoch 1 data without all of epoch 0');
    assert.ok(outOfOrder.violations.length > 0);
  });

  it('check reads during normal operation against everything completed before them', () => {
    const { history: h, tick } = history();
    const write = h.issueWrite(0, blockBytes, 1, { fua: false });
    tick();
    h.reply(write, true);
    const read = h.issueRead(0, blockBytes);
    h.reply(read, true);
    const bytes = new Uint8Array(blockBytes);
    assert.equal(h.checkRead(read, bytes).length, 8, 'zeroes after a completed write');
    fillPayload(bytes, 0, 1);
    assert.deepEqual(h.checkRead(read, bytes), []);
  });

  it('compare two reads sector by sector', () => {
    const a = new Uint8Array(blockBytes);
    fillPayload(a, 0, 1);
    const b = a.slice();
    assert.deepEqual(compareReads(a, b, 0), []);
    b.fill(0, 1024, 1536);
    assert.deepEqual(
      compareReads(a, b, 0).map((violation) => [violation.sector, violation.found, violation.expected]),
      [[2, 'zero', ['write#1[2]']]],
    );
  });
});
