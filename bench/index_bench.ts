// The range index: insert and lookup rates, and heap bytes per live key at 1 M keys.
//
// Peer: the obvious JavaScript design — one object per key in a Map keyed by offset — measured
// in the same process on the same keys. The Map can only answer exact-offset lookups (no
// range queries), so it is a floor on what object-per-key storage costs, not a usable index.
import { KeyIndex } from '../src/cache/cache_index.js';
import { newIndexKey } from '../src/cache/cache_tree.js';
import { Prng } from '../sim/prng.js';
import { heapBytes, medianOf, param, report } from './harness.js';

const keyCount = param(20_000, 1_000_000);
const runs = param(1, 5);
const KiB = 1024;

interface Layout { name: string; offsets: Float64Array }

function layouts(): Layout[] {
  const prng = new Prng(42);
  const random = new Float64Array(keyCount);
  // Random 4 KiB blocks over a device with 25x as many blocks as keys (about 100 GiB at 1 M keys).
  const blocks = keyCount * 25;
  const used = new Set<number>();
  for (let i = 0; i < keyCount;) {
    const block = prng.nextInt(blocks);
    if (used.has(block)) continue;
    used.add(block);
    random[i++] = block * 4 * KiB;
  }
  const sequential = new Float64Array(keyCount);
  for (let i = 0; i < keyCount; i++) sequential[i] = i * 4 * KiB;
  return [{ name: 'random 4K', offsets: random }, { name: 'sequential 4K', offsets: sequential }];
}

function buildIndex(offsets: Float64Array): KeyIndex {
  const index = new KeyIndex();
  const key = newIndexKey();
  key.lengthBytes = 4 * KiB;
  key.crcLengthBytes = 4 * KiB;
  for (let i = 0; i < offsets.length; i++) {
    key.offsetBytes = offsets[i] ?? 0;
    key.segment = i & 1023;
    key.segmentOffsetBytes = (i * 4 * KiB) % (16 * 1024 * KiB);
    key.gen = 1;
    index.insert(key);
  }
  return index;
}

interface ObjectKey { off: number; len: number; flags: number; seg: number; segOff: number; gen: number; crc: number }

function buildMap(offsets: Float64Array): Map<number, ObjectKey> {
  const map = new Map<number, ObjectKey>();
  for (let i = 0; i < offsets.length; i++) {
    const off = offsets[i] ?? 0;
    map.set(off, { off, len: 4 * KiB, flags: 0, seg: i & 1023, segOff: (i * 4 * KiB) % (16 * 1024 * KiB), gen: 1, crc: 0 });
  }
  return map;
}

function lookupIndex(index: KeyIndex, offsets: Float64Array): number {
  let found = 0;
  for (let i = 0; i < offsets.length; i++) {
    const offset = offsets[i] ?? 0;
    const subtree = index.subtree(offset, false);
    if (subtree === undefined) continue;
    const at = subtree.seek(offset);
    if (at < subtree.count && subtree.start(at) <= offset) found++;
  }
  return found;
}

function lookupMap(map: Map<number, ObjectKey>, offsets: Float64Array): number {
  let found = 0;
  for (let i = 0; i < offsets.length; i++) if (map.get(offsets[i] ?? 0) !== undefined) found++;
  return found;
}

function shuffled(offsets: Float64Array): Float64Array {
  const prng = new Prng(7);
  const out = offsets.slice();
  for (let i = out.length - 1; i > 0; i--) {
    const j = prng.nextInt(i + 1);
    const t = out[i] ?? 0;
    out[i] = out[j] ?? 0;
    out[j] = t;
  }
  return out;
}

/** Heap growth from building `build()`, with nothing else alive in between. */
function retainedBytes(build: () => unknown): number {
  const base = heapBytes();
  const held = build();
  const bytes = heapBytes() - base;
  if (held === undefined) throw new Error('nothing was built');
  return bytes;
}

async function main(): Promise<void> {
  for (const layout of layouts()) {
    const bench = `index ${layout.name}`;
    const indexBytes = retainedBytes(() => buildIndex(layout.offsets));
    const mapBytes = retainedBytes(() => buildMap(layout.offsets));
    report({ bench, metric: `heap per live key (${keyCount} keys)`, value: indexBytes / keyCount, unit: 'B/key', peer: 'Map of objects', peerValue: mapBytes / keyCount });

    const insertRate = await medianOf(runs, () => {
      const start = performance.now();
      buildIndex(layout.offsets);
      return keyCount / ((performance.now() - start) / 1000);
    });
    const mapInsertRate = await medianOf(runs, () => {
      const start = performance.now();
      buildMap(layout.offsets);
      return keyCount / ((performance.now() - start) / 1000);
    });
    report({ bench, metric: `insert (${keyCount} keys)`, value: insertRate, unit: 'keys/s', peer: 'Map of objects', peerValue: mapInsertRate });

    const queries = shuffled(layout.offsets);
    const index = buildIndex(layout.offsets);
    const map = buildMap(layout.offsets);
    const lookupRate = await medianOf(runs, () => {
      const start = performance.now();
      if (lookupIndex(index, queries) !== keyCount) throw new Error('index lookup missed a key');
      return keyCount / ((performance.now() - start) / 1000);
    });
    const mapLookupRate = await medianOf(runs, () => {
      const start = performance.now();
      if (lookupMap(map, queries) !== keyCount) throw new Error('map lookup missed a key');
      return keyCount / ((performance.now() - start) / 1000);
    });
    report({ bench, metric: 'lookup (random order)', value: lookupRate, unit: 'lookups/s', peer: 'Map of objects', peerValue: mapLookupRate });
  }
}

await main();
