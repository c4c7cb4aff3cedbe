// KeyIndex: the whole range index, a map from 4 MiB subtree to its Subtree (cache_tree.ts),
// and the sweeps that drop stale entries.
//
// Invariants: a subtree is in the map only while it holds keys (release drops an empty one,
// so idle address space costs nothing); a key never crosses its subtree's end.
// Stale entries (their segment was freed since) are no keys at all to every reader. With a
// staleness test (the live cache's index has one), a write's insert that lands next to a stale
// entry takes its row instead of opening one (insertTakingStale), and a GC sweep leaves a subtree's stale entries in
// place while they are at most half its rows (sweepSubtree): under overwrites they are the
// rows the next writes take, and removing them only to open rows again for those writes moved
// every row after each one twice. The index thus holds at most twice its live keys after a
// sweep, plus what went stale since.

import type { IndexKey, StaleRow } from './cache_tree.js';
import { Subtree } from './cache_tree.js';
import { assert } from '../lib/assert.js';
import { subtreeSizeBytes } from '../ondisk/layout.js';

/** A sweep leaves a subtree's stale entries in place while at most 1/n of its rows are stale. */
export const sweepLeaveStaleDivisor = 2;

export class KeyIndex {
  private readonly subtrees = new Map<number, Subtree>();
  /** Whether an entry is stale (its segment was freed since it was written); none if undefined. */
  private readonly isStale: StaleRow | undefined;

  constructor(isStale?: StaleRow) {
    this.isStale = isStale;
  }

  get subtreeCount(): number {
    return this.subtrees.size;
  }

  /** The subtree holding `offsetBytes`, created when `create` is set. */
  subtree(offsetBytes: number, create: true): Subtree;
  subtree(offsetBytes: number, create: false): Subtree | undefined;
  subtree(offsetBytes: number, create: boolean): Subtree | undefined {
    const id = Math.floor(offsetBytes / subtreeSizeBytes);
    let subtree = this.subtrees.get(id);
    if (subtree === undefined && create) {
      subtree = new Subtree(id * subtreeSizeBytes);
      this.subtrees.set(id, subtree);
    }
    return subtree;
  }

  /** Inserts `key` (newer wins); a key that lands in a gap opens a row there. */
  insert(key: IndexKey): void {
    this.subtree(key.offsetBytes, true).insert(key);
  }

  /**
   * insert(), except that a key landing in a gap next to a stale entry takes that entry's row
   * (the file comment says why). Rows then move differently from insert(), so code that walks
   * a subtree by row number and inserts as it goes (a read adding placeholders) uses insert();
   * the write path, which holds no row numbers, uses this.
   */
  insertTakingStale(key: IndexKey): void {
    this.subtree(key.offsetBytes, true).insert(key, this.isStale);
  }

  /**
   * Removes whatever the index holds over `key`'s range (inside one subtree): `key` goes in,
   * cutting what it overlaps, and then comes out again (a DROP key, cache_replay.ts).
   */
  removeRange(key: IndexKey): void {
    const subtree = this.subtree(key.offsetBytes, true);
    subtree.insert(key);
    const index = subtree.seek(key.offsetBytes);
    assert(subtree.start(index) === key.offsetBytes && subtree.length(index) === key.lengthBytes, 'removeRange lost its key');
    subtree.removeAt(index);
    this.release(subtree);
  }

  /** Drops a subtree that has become empty, so idle address space costs nothing. */
  release(subtree: Subtree): void {
    if (subtree.count === 0) this.subtrees.delete(subtree.baseBytes / subtreeSizeBytes);
  }

  get keyCount(): number {
    let count = 0;
    for (const subtree of this.subtrees.values()) count += subtree.count;
    return count;
  }

  /** Subtrees in address order. */
  inOrder(): Subtree[] {
    return [...this.subtrees.values()].sort((a, b) => a.baseBytes - b.baseBytes);
  }

  /** Subtrees in no particular order (cheap; for sweeps). */
  all(): IterableIterator<Subtree> {
    return this.subtrees.values();
  }

  get storageBytes(): number {
    let bytes = 0;
    for (const subtree of this.subtrees.values()) bytes += subtree.storageBytes;
    return bytes;
  }

  /** Removes every key for which `remove(subtree, index)` holds (called once per key); returns how many went. */
  sweep(remove: StaleRow): number {
    let removed = 0;
    for (const id of this.subtreeIds()) {
      const subtree = this.subtrees.get(id);
      if (subtree === undefined) continue;
      removed += subtree.removeWhere(remove);
      this.release(subtree);
    }
    return removed;
  }

  /** Ids of the subtrees present now, for a sweep done a few subtrees at a time (sweepSubtree). */
  subtreeIds(): number[] {
    return [...this.subtrees.keys()];
  }

  /**
   * Removes the stale entries `isStale` picks from subtree `id`, if it is still there, unless
   * they are at most 1/sweepLeaveStaleDivisor of its rows (see the file comment); returns how
   * many went. `isStale` must have no side effects: it may be asked twice per row.
   */
  sweepSubtree(id: number, isStale: StaleRow): number {
    const subtree = this.subtrees.get(id);
    if (subtree === undefined) return 0;
    // Count stale entries only until the answer is known: enough to remove, or too few left to be.
    const count = subtree.count;
    const needed = Math.floor(count / sweepLeaveStaleDivisor) + 1;
    let stale = 0;
    for (let index = 0; index < count && stale < needed && stale + (count - index) >= needed; index++) if (isStale(subtree, index)) stale++;
    if (stale < needed) return 0;
    const removed = subtree.removeWhere(isStale);
    this.release(subtree);
    return removed;
  }
}
