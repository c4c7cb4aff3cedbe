// The range index: every overlap case of insert, checked explicitly and against a per-sector
// model under random inserts.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { KeyIndex } from '../../src/cache/cache_index.js';
import {
  Subtree, hitEpochOf, isDataKey, keyFlagReferenced, keyFlagsInMemory, keyFromRecord, newIndexKey, subtreeEnd, type IndexKey,
} from '../../src/cache/cache_tree.js';
import { keyFlagClean, keyFlagEmpty, keyFlagZero } from '../../src/ondisk/kset.js';
import { MiB } from '../../src/lib/units.js';
import { Prng } from '../../sim/prng.js';

const S = 512;
const subtreeBytes = 4 * MiB;
/** Bytes one key's row and end take in a subtree's storage: nine u32 columns plus one u32 end. */
const bytesPerKeySlot = 40;

function key(startSectors: number, lengthSectors: number, segment: number, flags = 0): IndexKey {
  const k = newIndexKey();
  k.offsetBytes = startSectors * S;
  k.lengthBytes = lengthSectors * S;
  k.flags = flags;
  k.segment = segment;
  k.segmentOffsetBytes = segment * 100_000 + 0; // data of key `segment` starts here
  k.gen = 1;
  k.crcLengthBytes = k.lengthBytes;
  return k;
}

/** [start, length, segment, segmentOffset, crcDelta] per key, in sectors / bytes. */
function dump(subtree: Subtree): [number, number, number, number, number][] {
  const out: [number, number, number, number, number][] = [];
  const k = newIndexKey();
  for (let i = 0; i < subtree.count; i++) {
    subtree.read(i, k);
    out.push([k.offsetBytes / S, k.lengthBytes / S, k.segment, k.segmentOffsetBytes, k.crcDeltaBytes]);
  }
  return out;
}

describe('index insert: overlap cases', () => {
  it('T contains K: T is split around K', () => {
    const t = new Subtree(0);
    t.insert(key(10, 20, 1));
    t.insert(key(15, 5, 2));
    assert.deepEqual(dump(t), [
      [10, 5, 1, 100_000, 0],
      [15, 5, 2, 200_000, 0],
      [20, 10, 1, 100_000 + 10 * S, 10 * S],
    ]);
  });
  it('T overlaps the head of K: T is cut back', () => {
    const t = new Subtree(0);
    t.insert(key(10, 10, 1));
    t.insert(key(15, 10, 2));
    assert.deepEqual(dump(t), [[10, 5, 1, 100_000, 0], [15, 10, 2, 200_000, 0]]);
  });
  it('T inside K: T is deleted (several at once, exact edges too)', () => {
    const t = new Subtree(0);
    t.insert(key(10, 2, 1));
    t.insert(key(12, 2, 2));
    t.insert(key(20, 4, 3));
    t.insert(key(30, 1, 4));
    t.insert(key(10, 14, 5));
    assert.deepEqual(dump(t), [[10, 14, 5, 500_000, 0], [30, 1, 4, 400_000, 0]]);
  });
  it('T overlaps the tail of K: T is cut at the front and its data pointer moves', () => {
    const t = new Subtree(0);
    t.insert(key(20, 10, 1));
    t.insert(key(15, 10, 2));
    assert.deepEqual(dump(t), [[15, 10, 2, 200_000, 0], [25, 5, 1, 100_000 + 5 * S, 5 * S]]);
  });
  it('T before and after K: untouched; K lands between them', () => {
    const t = new Subtree(0);
    t.insert(key(0, 10, 1));
    t.insert(key(30, 10, 2));
    t.insert(key(10, 20, 3));
    assert.deepEqual(dump(t), [[0, 10, 1, 100_000, 0], [10, 20, 3, 300_000, 0], [30, 10, 2, 200_000, 0]]);
  });
  it('head cut, deletions and tail cut in one insert', () => {
    const t = new Subtree(0);
    for (let i = 0; i < 10; i++) t.insert(key(i * 4, 4, i + 1));
    t.insert(key(6, 20, 99));
    assert.deepEqual(dump(t).map((e) => e.slice(0, 3)), [
      [0, 4, 1], [4, 2, 2], [6, 20, 99], [26, 2, 7], [28, 4, 8], [32, 4, 9], [36, 4, 10],
    ]);
  });
  it('exact replacement of a key', () => {
    const t = new Subtree(0);
    t.insert(key(8, 8, 1));
    t.insert(key(8, 8, 2));
    assert.deepEqual(dump(t), [[8, 8, 2, 200_000, 0]]);
  });
  it('cutting ZERO and EMPTY keys never moves a data pointer (they have none)', () => {
    const t = new Subtree(0);
    t.insert(key(0, 16, 0, keyFlagZero));
    t.insert(key(32, 16, 77, keyFlagEmpty));
    t.insert(key(8, 32, 5));
    const k = newIndexKey();
    t.read(2, k);
    assert.equal(k.offsetBytes, 40 * S);
    assert.equal(k.segment, 77, 'the placeholder keeps its ticket');
    assert.equal(k.segmentOffsetBytes, 77 * 100_000);
  });
  it('fills a placeholder in place, splitting off what the fill does not cover', () => {
    const t = new Subtree(0);
    t.insert(key(0, 16, 42, keyFlagEmpty));
    t.fillPlaceholder(0, { lengthBytes: 4 * S, segment: 3, segmentOffsetBytes: 4096, gen: 9, crc: 5 });
    const k = newIndexKey();
    t.read(0, k);
    assert.deepEqual([k.offsetBytes, k.lengthBytes, k.segment, k.segmentOffsetBytes, k.gen, k.flags & keyFlagEmpty], [0, 4 * S, 3, 4096, 9, 0]);
    t.read(1, k);
    assert.deepEqual([k.offsetBytes, k.lengthBytes, k.segment, k.flags], [4 * S, 12 * S, 42, keyFlagEmpty]);
  });
  it('KeyIndex routes keys to 4 MiB subtrees and frees empty ones', () => {
    const index = new KeyIndex();
    index.insert(key(0, 8, 1));
    index.insert(key(subtreeBytes / S + 8, 8, 2));
    assert.equal(index.subtreeCount, 2);
    assert.equal(index.keyCount, 2);
    assert.deepEqual(index.inOrder().map((s) => s.baseBytes), [0, subtreeBytes]);
    const second = index.subtree(subtreeBytes, false);
    assert.ok(second !== undefined);
    second.removeAt(0);
    index.release(second);
    assert.equal(index.subtreeCount, 1);
    assert.throws(() => { index.insert(key(subtreeBytes / S - 4, 8, 3)); }, /outside its subtree/);
  });
});

describe('index insert: random inserts match a per-sector model', () => {
  it('agrees with the model after every insert', () => {
    const seed = Number(process.env.PCACHE_SEED ?? 1234);
    const prng = new Prng(seed);
    const sectors = 2048;
    for (let round = 0; round < 20; round++) {
      const t = new Subtree(0);
      // model[s] = [key id, sector index inside that key]
      const model: ([number, number] | undefined)[] = new Array<[number, number] | undefined>(sectors).fill(undefined);
      for (let id = 1; id <= 300; id++) {
        const start = prng.nextInt(sectors - 1);
        const length = 1 + prng.nextInt(Math.min(64, sectors - start));
        t.insert(key(start, length, id));
        for (let s = start; s < start + length; s++) model[s] = [id, s - start];
        const k = newIndexKey();
        const seen: ([number, number] | undefined)[] = new Array<[number, number] | undefined>(sectors).fill(undefined);
        let previousEnd = 0;
        for (let i = 0; i < t.count; i++) {
          t.read(i, k);
          assert.ok(k.offsetBytes >= previousEnd, `seed ${seed}: keys overlap or are unsorted`);
          previousEnd = k.offsetBytes + k.lengthBytes;
          for (let s = 0; s < k.lengthBytes / S; s++) {
            const inKey = (k.segmentOffsetBytes - k.segment * 100_000) / S + s;
            assert.equal(k.crcDeltaBytes / S, (k.segmentOffsetBytes - k.segment * 100_000) / S, `seed ${seed}: crc delta follows front cuts`);
            seen[k.offsetBytes / S + s] = [k.segment, inKey];
          }
        }
        assert.deepEqual(seen, model, `seed ${seed}, round ${round}, insert ${id}`);
      }
    }
  });
});

describe('index seek: the column of key ends stays true under every kind of change', () => {
  /** seek by definition: the first key that ends after `offset`, found by walking every key. */
  function seekByScan(t: Subtree, offsetBytes: number): number {
    for (let i = 0; i < t.count; i++) if (t.start(i) + t.length(i) > offsetBytes) return i;
    return t.count;
  }

  function check(t: Subtree, prng: Prng, context: string): void {
    for (let i = 0; i < t.count; i++) {
      assert.equal(t.end(i), t.start(i) + t.length(i), `${context}: end of key ${i}`);
      // Every key's own edges, and the sector before it.
      for (const at of [t.start(i), t.end(i) - S, t.end(i), Math.max(0, t.start(i) - S)]) {
        if (at < subtreeBytes) assert.equal(t.seek(at), seekByScan(t, at), `${context}: seek(${at / S})`);
      }
    }
    for (let probe = 0; probe < 64; probe++) {
      const at = prng.nextInt(subtreeBytes / S) * S;
      assert.equal(t.seek(at), seekByScan(t, at), `${context}: seek(${at / S})`);
    }
  }

  it('inserts of every size, placeholder fills, removals and shrinking, across a whole subtree', () => {
    const seed = Number(process.env.PCACHE_SEED ?? 99);
    const prng = new Prng(seed);
    const sectors = subtreeBytes / S;
    for (let round = 0; round < 6; round++) {
      const t = new Subtree(round * subtreeBytes);
      const base = round * subtreeBytes / S;
      for (let step = 0; step < 1500; step++) {
        const choice = prng.nextInt(10);
        if (choice < 6 || t.count === 0) {
          // Mostly 4 KiB keys on 4 KiB boundaries (the shape random writes give), some of any size.
          const small = prng.nextInt(4) !== 0;
          const length = small ? 8 : 1 + prng.nextInt(2048);
          const start = small ? prng.nextInt(sectors / 8) * 8 : prng.nextInt(sectors - length);
          t.insert(key(base + start, length, 1 + step, prng.nextInt(8) === 0 ? keyFlagEmpty : 0));
        } else if (choice < 8) {
          t.removeAt(prng.nextInt(t.count));
        } else {
          // Fill the front of a placeholder, if there is one.
          for (let i = 0; i < t.count; i++) {
            if ((t.flags(i) & keyFlagEmpty) === 0) continue;
            const lengthSectors = 1 + prng.nextInt(t.length(i) / S);
            t.fillPlaceholder(i, { lengthBytes: lengthSectors * S, segment: 7, segmentOffsetBytes: 0, gen: 1, crc: 0 });
            break;
          }
        }
        if (step % 25 === 0) check(t, prng, `seed ${seed}, round ${round}, step ${step}`);
      }
      // Removing most keys shrinks the storage: the ends must survive that too.
      while (t.count > 3) t.removeAt(prng.nextInt(t.count));
      check(t, prng, `seed ${seed}, round ${round}, after shrinking`);
    }
  });
});

describe('stale entries: inserts take their rows, sweeps remove them in one pass', () => {
  it('an insert into a gap takes a stale neighbour\'s row, before or after it, and keeps the order', () => {
    const stale = new Set<number>([2]);
    const isStale = (t: Subtree, index: number): boolean => stale.has(t.segment(index));
    const t = new Subtree(0);
    for (const [start, segment] of [[0, 1], [16, 2], [32, 3]] as const) t.insert(key(start, 8, segment));
    // K at 8..16 lies between key 1 and the stale key 2 (after it): K takes 2's row.
    t.insert(key(8, 8, 4), isStale);
    assert.deepEqual(dump(t).map((row) => [row[0], row[2]]), [[0, 1], [8, 4], [32, 3]]);
    // K at 24..32 lies between key 4 and key 3; neither is stale: a row is opened.
    t.insert(key(24, 8, 5), isStale);
    assert.deepEqual(dump(t).map((row) => [row[0], row[2]]), [[0, 1], [8, 4], [24, 5], [32, 3]]);
    // Segment 3 goes stale; K at 40 lies after it (the stale row is before K): K takes its row.
    stale.add(3);
    t.insert(key(40, 8, 6), isStale);
    assert.deepEqual(dump(t).map((row) => [row[0], row[2]]), [[0, 1], [8, 4], [24, 5], [40, 6]]);
    for (let i = 0; i < t.count; i++) assert.equal(t.end(i), t.start(i) + t.length(i));
    // A stale key K overlaps is cut as any key is; what is left of it after K is then the
    // neighbour K takes the row of. A live key K overlaps is cut and kept.
    stale.add(5);
    t.insert(key(20, 8, 7), isStale);
    assert.deepEqual(dump(t).map((row) => [row[0], row[1], row[2]]), [[0, 8, 1], [8, 8, 4], [20, 8, 7], [40, 8, 6]]);
    t.insert(key(36, 8, 8), isStale);
    assert.deepEqual(dump(t).map((row) => [row[0], row[1], row[2]]), [[0, 8, 1], [8, 8, 4], [20, 8, 7], [36, 8, 8], [44, 4, 6]]);
  });

  it('random inserts with segments going stale: the live keys match a per-sector model', () => {
    const seed = Number(process.env.PCACHE_SEED ?? 4321);
    const prng = new Prng(seed);
    const sectors = 2048;
    for (let round = 0; round < 10; round++) {
      const stale = new Set<number>();
      const isStale = (t: Subtree, index: number): boolean => stale.has(t.segment(index));
      const t = new Subtree(0);
      const model: (number | undefined)[] = new Array<number | undefined>(sectors).fill(undefined);
      for (let id = 1; id <= 400; id++) {
        if (prng.nextInt(4) === 0) stale.add(1 + prng.nextInt(id)); // a segment freed: its keys go stale
        const small = prng.nextInt(3) !== 0;
        const length = small ? 8 : 1 + prng.nextInt(64);
        const start = small ? prng.nextInt(sectors / 8) * 8 : prng.nextInt(sectors - length);
        t.insert(key(start, length, id), isStale);
        for (let s = start; s < start + length; s++) model[s] = id;
        const seen: (number | undefined)[] = new Array<number | undefined>(sectors).fill(undefined);
        let previousEnd = 0;
        for (let i = 0; i < t.count; i++) {
          assert.ok(t.start(i) >= previousEnd, `seed ${seed}: keys overlap or are unsorted`);
          assert.equal(t.end(i), t.start(i) + t.length(i));
          previousEnd = t.end(i);
          if (stale.has(t.segment(i))) continue;
          for (let s = t.start(i) / S; s < t.end(i) / S; s++) seen[s] = t.segment(i);
        }
        assert.deepEqual(seen, model.map((owner) => (owner === undefined || stale.has(owner) ? undefined : owner)), `seed ${seed}, round ${round}, insert ${id}`);
      }
    }
  });

  it('removeWhere removes what it picks in one pass and keeps the rest in order', () => {
    const t = new Subtree(0);
    for (let i = 0; i < 100; i++) t.insert(key(i * 8, 8, i));
    assert.equal(t.removeWhere((s, index) => s.segment(index) % 3 === 0), 34);
    assert.deepEqual(dump(t).map((row) => row[2]), Array.from({ length: 100 }, (_, i) => i).filter((i) => i % 3 !== 0));
    for (let i = 0; i < t.count; i++) assert.equal(t.seek(t.start(i)), i);
    assert.equal(t.removeWhere(() => true), 66);
    assert.equal(t.count, 0);
  });

  it('a sweep leaves a subtree\'s stale entries while they are at most half of it, and drops an all-stale subtree', () => {
    const stale = new Set<number>();
    const isStale = (t: Subtree, index: number): boolean => stale.has(t.segment(index));
    const index = new KeyIndex(isStale);
    for (let i = 0; i < 8; i++) index.insert(key(i * 8, 8, i));
    index.insert(key(subtreeBytes / S, 8, 100));
    const [first, second] = index.subtreeIds();
    assert.ok(first !== undefined && second !== undefined);
    for (let i = 0; i < 4; i++) stale.add(i);
    assert.equal(index.sweepSubtree(first, isStale), 0, 'half stale: left');
    assert.equal(index.keyCount, 9);
    stale.add(4);
    assert.equal(index.sweepSubtree(first, isStale), 5, 'more than half: removed');
    assert.deepEqual(index.subtree(0, false)?.count, 3);
    stale.add(100);
    assert.equal(index.sweepSubtree(second, isStale), 1);
    assert.equal(index.subtreeCount, 1, 'an emptied subtree is dropped');
    // sweep() removes whatever it is told, every subtree.
    assert.equal(index.sweep(() => true), 3);
    assert.equal(index.subtreeCount, 0);
  });
});

describe('index entries: fields, in-memory flags and storage', () => {
  it('a key record becomes a whole, uncut index key', () => {
    const out = newIndexKey();
    out.crcDeltaBytes = 99; // left over from an earlier use: must be reset
    keyFromRecord(out, { offsetBytes: 8192, lengthBytes: 4096, flags: keyFlagClean, segment: 7, segmentOffsetBytes: 12_288, gen: 3, dataCrc: 0xdeadbeef });
    assert.deepEqual({ ...out }, {
      offsetBytes: 8192, lengthBytes: 4096, flags: keyFlagClean, segment: 7, segmentOffsetBytes: 12_288, gen: 3,
      crc: 0xdeadbeef, crcDeltaBytes: 0, crcLengthBytes: 4096,
    });
  });

  it('every field survives a store and a read; the generation is kept modulo 2^32', () => {
    const t = new Subtree(subtreeBytes);
    const k = key(subtreeBytes / S + 16, 8, 5, keyFlagClean);
    k.gen = 2 ** 32 + 17;
    k.crc = 0xfedcba98;
    k.crcDeltaBytes = 1024;
    k.crcLengthBytes = 8192;
    t.insert(k);
    const out = t.read(0, newIndexKey());
    assert.deepEqual({ ...out }, { ...k, gen: 17 });
    assert.deepEqual([t.start(0), t.end(0), t.length(0), t.flags(0), t.segment(0), t.segmentOffset(0), t.genLow32(0)],
      [k.offsetBytes, k.offsetBytes + k.lengthBytes, k.lengthBytes, keyFlagClean, 5, k.segmentOffsetBytes, 17]);
    assert.throws(() => t.read(1, out), /out of range/);
    assert.throws(() => t.read(-1, out), /out of range/);
  });

  it('subtreeEnd is the end of the 4 MiB subtree holding an offset', () => {
    assert.equal(subtreeEnd(0), subtreeBytes);
    assert.equal(subtreeEnd(subtreeBytes - 1), subtreeBytes);
    assert.equal(subtreeEnd(subtreeBytes), 2 * subtreeBytes);
    assert.equal(subtreeEnd(5 * subtreeBytes + 4096), 6 * subtreeBytes);
  });

  it('data keys are those with neither the EMPTY nor the ZERO flag', () => {
    assert.equal(isDataKey(0), true);
    assert.equal(isDataKey(keyFlagClean), true);
    assert.equal(isDataKey(keyFlagClean | keyFlagReferenced), true);
    assert.equal(isDataKey(keyFlagEmpty), false);
    assert.equal(isDataKey(keyFlagZero), false);
    assert.equal(isDataKey(keyFlagZero | keyFlagClean), false);
  });

  it('a read hit sets the reference bit and the hit epoch (modulo 16), keeping the on-disk flags', () => {
    assert.equal(keyFlagsInMemory & (keyFlagEmpty | keyFlagClean | keyFlagZero), 0, 'in-memory flags overlap on-disk ones');
    const t = new Subtree(0);
    t.insert(key(0, 8, 1, keyFlagClean));
    t.insert(key(8, 8, 2));
    assert.equal(hitEpochOf(t.flags(0)), 0);
    t.markReferenced(0, 5);
    assert.equal(t.flags(0), keyFlagClean | keyFlagReferenced | (5 << 9));
    assert.equal(hitEpochOf(t.flags(0)), 5);
    t.markReferenced(0, 16 + 10); // a later hit replaces the epoch, not ORs into it
    assert.equal(hitEpochOf(t.flags(0)), 10);
    assert.equal(t.flags(0) & ~keyFlagsInMemory, keyFlagClean);
    assert.equal(t.flags(1), 0, 'the neighbour is untouched');
    t.markReferenced(1, 15);
    assert.equal(t.flags(1), keyFlagReferenced | (15 << 9));
    assert.equal(hitEpochOf(t.flags(1)), 15);
  });

  it('a filled placeholder is a CLEAN key with its own CRC fields, the generation modulo 2^32', () => {
    const t = new Subtree(0);
    t.insert(key(0, 16, 42, keyFlagEmpty));
    t.fillPlaceholder(0, { lengthBytes: 16 * S, segment: 3, segmentOffsetBytes: 4096, gen: 2 ** 32 + 9, crc: 0x1234 });
    assert.equal(t.count, 1, 'a whole fill splits nothing');
    assert.deepEqual({ ...t.read(0, newIndexKey()) }, {
      offsetBytes: 0, lengthBytes: 16 * S, flags: keyFlagClean, segment: 3, segmentOffsetBytes: 4096, gen: 9,
      crc: 0x1234, crcDeltaBytes: 0, crcLengthBytes: 16 * S,
    });
    assert.throws(() => t.fillPlaceholder(0, { lengthBytes: S, segment: 3, segmentOffsetBytes: 0, gen: 1, crc: 0 }), /not a placeholder/);
    t.insert(key(32, 8, 43, keyFlagEmpty));
    assert.throws(() => t.fillPlaceholder(1, { lengthBytes: 9 * S, segment: 3, segmentOffsetBytes: 0, gen: 1, crc: 0 }), /longer than its placeholder/);
    assert.throws(() => t.fillPlaceholder(1, { lengthBytes: 0, segment: 3, segmentOffsetBytes: 0, gen: 1, crc: 0 }), /longer than its placeholder/);
    // The split-off rest keeps the ticket and ends where the placeholder ended.
    t.fillPlaceholder(1, { lengthBytes: 3 * S, segment: 4, segmentOffsetBytes: 0, gen: 1, crc: 0 });
    assert.deepEqual([t.count, t.start(2), t.end(2), t.segment(2), t.flags(2)], [3, 35 * S, 40 * S, 43, keyFlagEmpty]);
    assert.deepEqual([t.end(1), t.seek(34 * S), t.seek(35 * S)], [35 * S, 1, 2]);
  });

  it('storage doubles as keys arrive and halves as they go, never below 16 keys nor above a full subtree', () => {
    const t = new Subtree(0);
    assert.equal(t.storageBytes, 4 * bytesPerKeySlot, 'a new subtree has room for 4 keys');
    for (let i = 0; i < 5; i++) t.insert(key(i * 8, 8, i + 1));
    assert.equal(t.storageBytes, 8 * bytesPerKeySlot);
    for (let i = 5; i < 100; i++) t.insert(key(i * 8, 8, i + 1));
    assert.equal(t.storageBytes, 128 * bytesPerKeySlot);
    // Shrinks while a quarter of the capacity is more than the keys: 10 keys fit 32 slots.
    while (t.count > 10) t.removeAt(t.count - 1);
    assert.equal(t.storageBytes, 32 * bytesPerKeySlot);
    assert.deepEqual(dump(t).map((row) => row[2]), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 'shrinking keeps the keys');
    for (let i = 0; i < 10; i++) assert.equal(t.end(i), (i + 1) * 8 * S, 'and their ends');
    // Never below 16 slots, however few keys are left; removeWhere shrinks too.
    assert.equal(t.removeWhere((_subtree, index) => index > 0), 9);
    assert.equal(t.storageBytes, 16 * bytesPerKeySlot);
    // A subtree full of one-sector keys: 8,192 of them, all in order, storage capped there.
    const full = new Subtree(0);
    for (let i = subtreeBytes / S - 1; i >= 0; i--) full.insert(key(i, 1, 1));
    assert.equal(full.count, subtreeBytes / S);
    assert.equal(full.storageBytes, (subtreeBytes / S) * bytesPerKeySlot);
    for (const at of [0, 1, 4095, 8191]) assert.equal(full.seek(at * S), at);
    assert.equal(full.seek(subtreeBytes), full.count);
  });

  it('removeAt moves the rows after the removed one, few or many (ends included)', () => {
    for (const keys of [6, 80]) {
      const t = new Subtree(0);
      for (let i = 0; i < keys; i++) t.insert(key(i * 8, 8, i));
      t.removeAt(2);
      assert.equal(t.count, keys - 1);
      for (let i = 0; i < t.count; i++) {
        const expected = i < 2 ? i : i + 1;
        assert.deepEqual([t.segment(i), t.start(i), t.end(i)], [expected, expected * 8 * S, (expected + 1) * 8 * S], `${keys} keys, row ${i}`);
        assert.equal(t.seek(t.start(i)), i);
      }
      assert.throws(() => t.removeAt(t.count), /out of range/);
    }
  });

  it('opening a row in front of few or many keys moves them and their ends', () => {
    for (const keys of [6, 80]) {
      const t = new Subtree(0);
      for (let i = 1; i <= keys; i++) t.insert(key(i * 8, 8, i));
      t.insert(key(0, 8, 0));
      t.insert(key(2 * 8 + 2, 2, 500)); // T contains K near the front: opens two rows
      const rows = dump(t);
      assert.equal(rows.length, keys + 3);
      for (let i = 0; i < t.count; i++) assert.equal(t.end(i), t.start(i) + t.length(i), `${keys} keys: end of row ${i}`);
      assert.deepEqual(rows.slice(0, 6).map((row) => [row[0], row[1], row[2]]), [[0, 8, 0], [8, 8, 1], [16, 2, 2], [18, 2, 500], [20, 4, 2], [24, 8, 3]]);
      assert.deepEqual(rows[rows.length - 1]?.slice(0, 3), [keys * 8, 8, keys]);
    }
  });
});

describe('KeyIndex: ranges, sizes and stale rows across subtrees', () => {
  it('removeRange removes what lies over a range, cuts what crosses it, and drops an emptied subtree', () => {
    const index = new KeyIndex();
    index.insert(key(0, 16, 1));
    index.insert(key(16, 16, 2));
    index.insert(key(32, 16, 3));
    index.removeRange(key(8, 32, 9));
    const subtree = index.subtree(0, false);
    assert.ok(subtree !== undefined);
    assert.deepEqual(dump(subtree), [[0, 8, 1, 100_000, 0], [40, 8, 3, 300_000 + 8 * S, 8 * S]]);
    index.insert(key(subtreeBytes / S, 8, 4));
    index.removeRange(key(subtreeBytes / S, 8, 9));
    assert.equal(index.subtreeCount, 1, 'the second subtree held only the removed range');
    index.removeRange(key(100, 8, 9)); // nothing there: nothing changes
    assert.equal(index.keyCount, 2);
  });

  it('keyCount and storageBytes add up every subtree; all() visits each once', () => {
    const index = new KeyIndex();
    for (let s = 0; s < 3; s++) for (let i = 0; i <= s; i++) index.insert(key((s * subtreeBytes) / S + i * 8, 8, 1));
    assert.equal(index.keyCount, 6);
    assert.equal(index.storageBytes, 3 * 4 * bytesPerKeySlot);
    assert.deepEqual([...index.all()].map((s) => s.count).sort(), [1, 2, 3]);
    assert.equal(index.subtree(3 * subtreeBytes, false), undefined, 'looking does not create');
    assert.equal(index.subtreeCount, 3);
  });

  it('insertTakingStale takes a stale neighbour\'s row; insert never does', () => {
    const stale = new Set<number>([2]);
    const isStale = (t: Subtree, row: number): boolean => stale.has(t.segment(row));
    const index = new KeyIndex(isStale);
    index.insert(key(0, 8, 1));
    index.insert(key(16, 8, 2));
    index.insert(key(8, 4, 3));
    assert.equal(index.keyCount, 3, 'insert opened a row next to the stale key');
    index.insertTakingStale(key(12, 4, 4));
    assert.deepEqual(dump(index.subtree(0, true)).map((row) => row[2]), [1, 3, 4]);
    assert.equal(new KeyIndex().sweepSubtree(0, isStale), 0, 'no such subtree');
  });

  it('a sweep counts exactly: half stale is left, one more is removed, at any size', () => {
    for (const keys of [2, 3, 9, 64]) {
      const stale = new Set<number>();
      const isStale = (t: Subtree, row: number): boolean => stale.has(t.segment(row));
      const index = new KeyIndex(isStale);
      for (let i = 0; i < keys; i++) index.insert(key(i * 8, 8, i));
      const half = Math.floor(keys / 2);
      // Stale rows at the end, so that a count stopping early would miss them.
      for (let i = keys - half; i < keys; i++) stale.add(i);
      assert.equal(index.sweepSubtree(0, isStale), 0, `${keys} keys, ${half} stale: left`);
      stale.add(keys - half - 1);
      assert.equal(index.sweepSubtree(0, isStale), half + 1, `${keys} keys, ${half + 1} stale: removed`);
      assert.equal(index.keyCount, keys - half - 1);
    }
  });
});

describe('index edges found by mutation testing (docs/testing.md, scope index)', () => {
  it('a key taking a stale row never looks outside the rows: not past the last, not before the first', () => {
    // The live cache's staleness test compares a row's generation with its segment's, so
    // memory outside the rows (zeros, or a removed row's leftovers) can look stale. Here
    // segment 0 and segment 9 are stale, as a zeroed row and a removed row would be.
    const stale = new Set<number>([0, 9]);
    const isStale = (t: Subtree, row: number): boolean => stale.has(t.segment(row));
    const t = new Subtree(0);
    t.insert(key(16, 8, 1));
    t.insert(key(32, 8, 9));
    t.removeAt(1); // its row's bytes stay behind the last row
    t.insert(key(48, 8, 2), isStale); // lands after the last row: must open one
    t.insert(key(0, 8, 3), isStale); // lands before the first row: must open one
    assert.deepEqual(dump(t).map((row) => [row[0], row[2]]), [[0, 3], [16, 1], [48, 2]]);
  });

  it('insertTakingStale and removeRange work on a subtree not there yet; inOrder sorts by address', () => {
    const index = new KeyIndex(() => false);
    index.insertTakingStale(key(3 * subtreeBytes / S, 8, 1));
    index.removeRange(key(subtreeBytes / S, 8, 2));
    index.insert(key(0, 8, 3));
    assert.deepEqual(index.inOrder().map((s) => s.baseBytes), [0, 3 * subtreeBytes], 'inserted out of order, listed in order');
    assert.equal(index.keyCount, 2);
  });

  it('a key before its subtree, or of no length, is refused; so is removing row -1', () => {
    const t = new Subtree(subtreeBytes);
    assert.throws(() => { t.insert(key(subtreeBytes / S - 8, 8, 1)); }, /outside its subtree/);
    assert.throws(() => { t.insert(key(subtreeBytes / S, 0, 1)); }, /outside its subtree/);
    t.insert(key(subtreeBytes / S, 8, 1));
    assert.throws(() => { t.removeAt(-1); }, /out of range/);
    assert.equal(t.count, 1);
  });

  it('one removal of many keys shrinks the storage to the smallest power of two above 4x the keys left', () => {
    const t = new Subtree(0);
    for (let i = 0; i < 100; i++) t.insert(key(i * 8, 8, i));
    assert.equal(t.removeWhere((_subtree, row) => row >= 16), 84);
    assert.equal(t.storageBytes, 64 * bytesPerKeySlot, '16 keys keep 64 slots: a quarter full is full enough');
  });
});
