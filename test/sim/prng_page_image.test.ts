// Tests for the simulator's foundations: the seeded PRNG and the copy-on-write page image.
// Goal: a seed fully determines the random stream; a fork costs nothing and isolates both
// sides; storage is proportional to pages written, never to the device size.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Prng } from '../../sim/prng.js';
import { PageImage, pageSizeBytes, type PageSource } from '../../sim/page_image.js';
import { TiB } from '../../src/lib/units.js';

describe('Prng', () => {
  it('repeats its stream for the same seed and differs for another', () => {
    const draw = (seed: number): number[] => {
      const prng = new Prng(seed);
      return Array.from({ length: 16 }, () => prng.nextU32());
    };
    assert.deepEqual(draw(42), draw(42));
    assert.notDeepEqual(draw(42), draw(43));
    // Seeds above 2^32 must not collapse onto their low word.
    assert.notDeepEqual(draw(7), draw(7 + 2 ** 32));
  });

  it('keeps nextInt inside its bound and reaches every value', () => {
    const prng = new Prng(1);
    const counts = new Array<number>(10).fill(0);
    for (let draw = 0; draw < 10_000; draw += 1) {
      const value = prng.nextInt(10);
      assert.ok(Number.isInteger(value) && value >= 0 && value < 10);
      counts[value] = (counts[value] ?? 0) + 1;
    }
    // Uniform within a wide margin: each bucket expects 1000.
    for (const count of counts) assert.ok(count > 800 && count < 1200, `bucket count ${count}`);
  });

  it('shuffles into a permutation and picks only elements', () => {
    const prng = new Prng(9);
    const items = Array.from({ length: 50 }, (_, index) => index);
    const shuffled = prng.shuffle([...items]);
    assert.notDeepEqual(shuffled, items);
    assert.deepEqual([...shuffled].sort((a, b) => a - b), items);
    for (let draw = 0; draw < 100; draw += 1) assert.ok(items.includes(prng.pick(items)));
  });

  it('derives printable child seeds that replay the child stream', () => {
    const parent = new Prng(5);
    const seed = parent.nextSeed();
    assert.ok(Number.isSafeInteger(seed) && seed >= 0);
    const a = new Prng(seed);
    const b = new Prng(Number(String(seed)));
    assert.equal(a.nextU32(), b.nextU32());
  });

  it('refuses seeds that would not survive printing', () => {
    assert.throws(() => new Prng(-1));
    assert.throws(() => new Prng(1.5));
  });
});

describe('PageImage', () => {
  it('reads unwritten bytes as zeroes and returns what was written, across pages', () => {
    const image = new PageImage(64 * 1024);
    const data = Uint8Array.from({ length: 6000 }, (_, index) => (index % 251) + 1);
    image.write(data, 3000);
    const back = new Uint8Array(6000);
    image.read(back, 3000);
    assert.deepEqual(back, data);
    const around = new Uint8Array(10);
    image.read(around, 2990);
    assert.deepEqual([...around], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
  });

  it('isolates a fork from its parent in both directions', () => {
    const parent = new PageImage(32 * 1024);
    parent.write(new Uint8Array(100).fill(1), 0);
    const child = parent.fork();
    child.write(new Uint8Array(100).fill(2), 50);
    parent.write(new Uint8Array(10).fill(3), 0);
    const fromParent = new Uint8Array(150);
    const fromChild = new Uint8Array(150);
    parent.read(fromParent, 0);
    child.read(fromChild, 0);
    assert.deepEqual([fromParent[0], fromParent[60], fromParent[120]], [3, 1, 0]);
    assert.deepEqual([fromChild[0], fromChild[60], fromChild[120]], [1, 2, 2]);
  });

  it('shares untouched pages with its parent and copies only the page it writes', () => {
    const parent = new PageImage(1024 * 1024);
    for (let page = 0; page < 8; page += 1) parent.write(new Uint8Array([page + 1]), page * pageSizeBytes);
    const child = parent.fork();
    child.write(new Uint8Array([99]), 5 * pageSizeBytes);
    for (let page = 0; page < 8; page += 1) {
      if (page === 5) assert.notEqual(child.storedPage(page), parent.storedPage(page));
      else assert.equal(child.storedPage(page), parent.storedPage(page), `page ${page} is shared`);
    }
  });

  it('holds a 1 TiB device with a handful of writes (storage follows writes, not size)', () => {
    const image = new PageImage(TiB);
    image.write(new Uint8Array([7, 8, 9]), TiB - 3);
    image.write(new Uint8Array([1]), 0);
    const fork = image.fork();
    fork.write(new Uint8Array([5]), 512 * 1024 * 1024 * 1024);
    let stored = 0;
    fork.forEachStoredPage(() => {
      stored += 1;
    });
    assert.equal(stored, 3);
    const tail = new Uint8Array(3);
    fork.read(tail, TiB - 3);
    assert.deepEqual([...tail], [7, 8, 9]);
  });

  it('drops whole zeroed pages and zeroes partial ones', () => {
    const image = new PageImage(4 * pageSizeBytes);
    image.write(new Uint8Array(3 * pageSizeBytes).fill(4), 0);
    image.zero(100, 2 * pageSizeBytes);
    assert.equal(image.storedPage(1), undefined);
    const bytes = new Uint8Array(3 * pageSizeBytes);
    image.read(bytes, 0);
    assert.equal(bytes[99], 4);
    assert.equal(bytes[100], 0);
    assert.equal(bytes[2 * pageSizeBytes + 99], 0);
    assert.equal(bytes[2 * pageSizeBytes + 100], 4);
  });

  it('reads unwritten pages from its source and keeps the source unchanged', () => {
    const base = Uint8Array.from({ length: 3 * pageSizeBytes }, (_, index) => index % 256);
    const source: PageSource = {
      sizeBytes: base.length,
      readPage: (pageIndex, target) => target.set(base.subarray(pageIndex * pageSizeBytes, (pageIndex + 1) * pageSizeBytes)),
    };
    const image = new PageImage(base.length, { source });
    image.write(new Uint8Array([200]), pageSizeBytes + 1);
    image.zero(2 * pageSizeBytes, pageSizeBytes);
    const bytes = new Uint8Array(base.length);
    image.read(bytes, 0);
    assert.equal(bytes[5], 5);
    assert.equal(bytes[pageSizeBytes], 0);
    assert.equal(bytes[pageSizeBytes + 1], 200);
    assert.equal(bytes[pageSizeBytes + 2], 2);
    assert.equal(bytes[2 * pageSizeBytes + 7], 0);
    assert.equal(base[pageSizeBytes + 1], 1);
  });

  it('round-trips a byte array through fromBytes', () => {
    const bytes = new Uint8Array(5 * pageSizeBytes + 100);
    bytes[3 * pageSizeBytes + 17] = 3;
    bytes[bytes.length - 1] = 9;
    const image = PageImage.fromBytes(bytes);
    const back = new Uint8Array(bytes.length);
    image.read(back, 0);
    assert.deepEqual(back, bytes);
  });
});
