import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { crc32c } from '../../src/lib/crc32c.js';
import { formatSize, parseSize, readU64BE, readU64LE, writeU64BE, writeU64LE } from '../../src/lib/units.js';
import { PcacheError } from '../../src/lib/errors.js';
import { BackgroundTask, SerialSection } from '../../src/lib/background_task.js';
import { assert as pcacheAssert, AssertionFailure } from '../../src/lib/assert.js';

describe('crc32c', () => {
  it('matches the Castagnoli check value, not CRC-32/IEEE', () => {
    assert.equal(crc32c(Buffer.from('123456789')), 0xe3069283);
  });
  it('continues a computation across pieces', () => {
    const whole = crc32c(Buffer.from('hello, world'));
    assert.equal(crc32c(Buffer.from(', world'), crc32c(Buffer.from('hello'))), whole);
  });
});

describe('64-bit fields', () => {
  it('round-trips safe integers in both byte orders', () => {
    const bytes = new Uint8Array(8);
    for (const value of [0, 1, 0xffffffff, 0x1_0000_0000, Number.MAX_SAFE_INTEGER]) {
      writeU64LE(bytes, 0, value);
      assert.equal(readU64LE(bytes, 0), value);
      writeU64BE(bytes, 0, value);
      assert.equal(readU64BE(bytes, 0), value);
    }
  });
  it('maps values above 2^53 to +Infinity so that no bounds check passes them', () => {
    const bytes = new Uint8Array(8).fill(0xff);
    assert.equal(readU64LE(bytes, 0), Number.POSITIVE_INFINITY);
    assert.equal(readU64BE(bytes, 0), Number.POSITIVE_INFINITY);
    const justAbove = new Uint8Array([0, 0, 0, 0, 0, 0, 0x20, 0]);
    assert.equal(readU64LE(justAbove, 0), Number.POSITIVE_INFINITY);
  });
  it('reads little-endian and big-endian as named', () => {
    const bytes = new Uint8Array([2, 1, 0, 0, 0, 0, 0, 0]);
    assert.equal(readU64LE(bytes, 0), 0x0102);
    assert.equal(readU64BE(bytes.slice().reverse(), 0), 0x0102);
  });
});

describe('sizes', () => {
  it('parses binary suffixes', () => {
    assert.equal(parseSize('512'), 512);
    assert.equal(parseSize('4K'), 4096);
    assert.equal(parseSize('16M'), 16 * 2 ** 20);
    assert.equal(parseSize('1g'), 2 ** 30);
    assert.equal(parseSize('2T'), 2 * 2 ** 40);
    assert.equal(parseSize('8MiB'), 8 * 2 ** 20);
  });
  it('rejects anything else with EINVAL', () => {
    for (const text of ['', 'x', '-1', '1.5G', '4Q']) {
      assert.throws(() => parseSize(text), (e: unknown) => e instanceof PcacheError && e.code === 'EINVAL');
    }
  });
  it('formats for people', () => {
    assert.equal(formatSize(16 * 2 ** 20), '16 MiB');
    assert.equal(formatSize(1.5 * 2 ** 30), '1.5 GiB');
    assert.equal(formatSize(100), '100 B');
  });
});

describe('BackgroundTask', () => {
  it('never loses a kick that arrives as the body finishes', async () => {
    let pending = 0;
    let handled = 0;
    const task = new BackgroundTask(async () => {
      while (pending > 0) {
        await Promise.resolve();
        pending--;
        handled++;
      }
    });
    // Kick once per item, at every possible microtask offset relative to the body's exit.
    for (let delay = 0; delay < 8; delay++) {
      pending++;
      task.kick();
      for (let i = 0; i < delay; i++) await Promise.resolve();
      pending++;
      task.kick();
      await task.idle();
      assert.equal(pending, 0, `kick after ${delay} microtasks was lost`);
    }
    assert.equal(handled, 16);
    assert.equal(task.running, false);
  });
  it('runs one body at a time', async () => {
    let concurrent = 0;
    let maxConcurrent = 0;
    const task = new BackgroundTask(async () => {
      concurrent++;
      maxConcurrent = Math.max(maxConcurrent, concurrent);
      await new Promise((resolve) => setImmediate(resolve));
      concurrent--;
    });
    for (let i = 0; i < 10; i++) task.kick();
    await task.idle();
    assert.equal(maxConcurrent, 1);
  });
});

describe('SerialSection', () => {
  it('never runs two sections at once, runs them in call order, and survives a failing one', async () => {
    const section = new SerialSection();
    let running = 0;
    const order: number[] = [];
    const body = (id: number, fail = false) => async (): Promise<number> => {
      running++;
      assert.equal(running, 1, 'sections overlap');
      await new Promise((resolve) => setImmediate(resolve));
      order.push(id);
      running--;
      if (fail) throw new Error(`section ${id} failed`);
      return id;
    };
    const results = await Promise.allSettled([section.run(body(1)), section.run(body(2, true)), section.run(body(3))]);
    assert.deepEqual(order, [1, 2, 3]);
    assert.deepEqual(results.map((r) => r.status), ['fulfilled', 'rejected', 'fulfilled']);
  });
});

describe('assert', () => {
  it('names the broken fact and, only on failure, the detail that broke it', () => {
    assert.doesNotThrow(() => { pcacheAssert(true, 'never shown', 7); });
    assert.throws(() => { writeU64LE(new Uint8Array(8), 0, -1); }, (e: unknown) => e instanceof AssertionFailure && e.message === 'u64 out of range: -1');
    assert.throws(() => { pcacheAssert(false, 'segment freed twice', 12); }, (e: unknown) => e instanceof AssertionFailure && e.message === 'segment freed twice: 12');
    assert.throws(() => { pcacheAssert(false); }, (e: unknown) => e instanceof AssertionFailure && e.message === 'assertion failed');
  });
});
