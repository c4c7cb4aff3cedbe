// Which admission rule pays right now: two miniature caches replay a sample of the reads.
//
// Storing a full read cache's misses only when they recur (cache_admission.ts) keeps data read
// once from pushing out data read again, which pays on a skewed workload with a long tail; but
// when the working set moves, every block of the new one misses twice before it is stored, and
// storing every miss pays instead. Neither is right on every workload, and which one pays
// changes over time. So, as miniature cache simulations do (Waldspurger et al., ATC '17: a
// cache's hit ratio is estimated well by a small cache fed a hashed sample of the blocks, its
// size scaled by the same rate), two shadow caches of `capacityBlocks / sampleRate` blocks
// replay the reads of one block in `sampleRate` (chosen by a hash of the block number, so a
// sampled block is always sampled): `every` stores every miss, `recurring` stores a miss only
// when the block missed within its last `capacity` sampled misses, as the cache's ghost memory
// does. Both evict with CLOCK, as the cache's GC with its second chance does. A score adds one
// for each sampled read that only `every` hits and takes one away for each that only
// `recurring` hits, decaying by 1/capacity per sampled read (it weighs about the last cache's
// worth of sampled reads); while it is above zero the cache stores every miss.
// A third shadow, `recent`, stores every miss as `every` does but gives second chances only to
// blocks hit within the last half lap (in insertions), as GC does while relogRecentOnly holds
// (cache_second_chance.ts); a second score, kept the same way for `recent` against `every`,
// makes that choice: above zero after the popular data moved, below on steady popularity.
// Reads are given as the 4 KiB block they start at (a large read is one access, as the
// admission rule sees it too). Writes are not replayed: in a read cache they are few, and both
// shadows would store them alike.
// Invariants: each shadow holds at most `capacity` blocks and each ghost generation at most
// `capacity`, fixed at construction (memory is bounded by shadowBlocksMax, whatever the cache's
// size); a read that is not sampled costs one hash.

import { assert } from '../lib/assert.js';
import { hitEpochsPerLap } from './cache_data_head.js';
import { secondChanceRecentEpochs } from './cache_second_chance.js';

/** Each shadow cache holds at most this many sampled blocks (the sample rate grows with the cache). */
export const shadowBlocksMax = 4096;
/** Shadows smaller than this are not worth running: a cache this small admits by the recurrence rule alone. */
export const shadowBlocksMin = 64;

/**
 * A CLOCK cache of sampled block numbers (no data). With a `recentWindow`, a referenced block
 * gets its second chance only if its last hit came within the last `recentWindow` insertions
 * (stored blocks and second chances, as the data head counts what it allocates).
 */
export class ShadowClock {
  readonly capacity: number;
  private readonly slotOf = new Map<number, number>();
  private readonly blocks: Float64Array;
  private readonly referenced: Uint8Array;
  /** Per slot, `insertions` at its last hit (windowed shadows only). */
  private readonly lastHit: Float64Array | undefined;
  private insertions = 0;
  private hand = 0;

  constructor(capacity: number, private readonly recentWindow?: number) {
    assert(capacity > 0, 'a shadow cache needs room');
    this.capacity = capacity;
    this.blocks = new Float64Array(capacity);
    this.referenced = new Uint8Array(capacity);
    if (recentWindow !== undefined) this.lastHit = new Float64Array(capacity);
  }

  get size(): number {
    return this.slotOf.size;
  }

  /** Whether `block` is cached (then it is marked referenced). */
  hit(block: number): boolean {
    const slot = this.slotOf.get(block);
    if (slot === undefined) return false;
    this.referenced[slot] = 1;
    if (this.lastHit !== undefined) this.lastHit[slot] = this.insertions;
    return true;
  }

  /** Stores a block that missed, evicting the first unreferenced one the hand meets once full. */
  store(block: number): void {
    this.insertions++;
    if (this.slotOf.size < this.capacity) {
      this.place(this.slotOf.size, block);
      return;
    }
    // Every pass clears the bits it meets, so the hand stops within one lap.
    const window = this.recentWindow ?? Infinity;
    while (this.referenced[this.hand] === 1) {
      this.referenced[this.hand] = 0;
      if (this.insertions - (this.lastHit?.[this.hand] ?? 0) > window) break; // an old hit: evicted all the same
      this.insertions++; // a second chance is a copy at the head
      this.hand = (this.hand + 1) % this.capacity;
    }
    this.slotOf.delete(this.blocks[this.hand] ?? -1);
    this.place(this.hand, block);
    this.hand = (this.hand + 1) % this.capacity;
  }

  private place(slot: number, block: number): void {
    this.blocks[slot] = block;
    this.referenced[slot] = 0;
    this.slotOf.set(block, slot);
  }
}

/** The last `entries` to 2 x `entries` missed blocks, exactly (two generations of a Set). */
class ShadowGhosts {
  private current = new Set<number>();
  private previous = new Set<number>();

  constructor(private readonly entries: number) {}

  /** Whether `block` is remembered; remembers it either way. */
  recall(block: number): boolean {
    const seen = this.current.has(block) || this.previous.has(block);
    this.current.add(block);
    if (this.current.size >= this.entries) {
      this.previous = this.current;
      this.current = new Set();
    }
    return seen;
  }
}

/** The two shadow caches of one cache and the score that picks its admission rule (see the file comment). */
export class AdmissionShadow {
  /** One block in 2^sampleShift is replayed. */
  readonly sampleShift: number;
  readonly capacity: number;
  private readonly every: ShadowClock;
  private readonly recurring: ShadowClock;
  /** Stores every miss, as `every`, but gives second chances to recent hits only (cache_second_chance.ts). */
  private readonly recent: ShadowClock;
  private readonly ghosts: ShadowGhosts;
  private readonly decay: number;
  private score = 0;
  /** As `score`, for `recent` against `every`: above zero, only recent hits earn a second chance. */
  private recentScore = 0;

  /** `capacityBlocks`: the 4 KiB blocks the cache holds once full. */
  constructor(capacityBlocks: number) {
    let shift = 0;
    while (capacityBlocks / 2 ** shift > shadowBlocksMax) shift++;
    this.sampleShift = shift;
    this.capacity = Math.max(1, Math.floor(capacityBlocks / 2 ** shift));
    this.every = new ShadowClock(this.capacity);
    this.recurring = new ShadowClock(this.capacity);
    this.recent = new ShadowClock(this.capacity, (this.capacity * secondChanceRecentEpochs) / hitEpochsPerLap);
    this.ghosts = new ShadowGhosts(this.capacity);
    this.decay = 1 - 1 / this.capacity;
  }

  /** Whether storing every miss has paid lately (the score is above zero). */
  get storeEveryMiss(): boolean {
    return this.score > 0;
  }

  /** Whether giving second chances to recent hits only has paid lately (cache_second_chance.ts). */
  get relogRecentOnly(): boolean {
    return this.recentScore > 0;
  }

  /** A client read starting at 4 KiB block `block`: replayed in both shadows if it is sampled. */
  observe(block: number): void {
    if (this.sampled(block)) this.replay(block);
  }

  /** Whether `block` is one of the sampled ones (always the same answer for a block). */
  sampled(block: number): boolean {
    if (this.sampleShift === 0) return true;
    const low = block >>> 0;
    const high = Math.floor(block / 0x1_0000_0000) >>> 0;
    // A hash unrelated to the ghost filter's, so the sample is not biased towards its collisions.
    let h = Math.imul(low ^ Math.imul(high, 0x27d4_eb2f), 0x1656_67b1);
    h ^= h >>> 15;
    h = Math.imul(h, 0x85eb_ca77);
    h ^= h >>> 13;
    return h >>> (32 - this.sampleShift) === 0;
  }

  private replay(block: number): void {
    const everyHit = this.every.hit(block);
    if (!everyHit) this.every.store(block);
    const recurringHit = this.recurring.hit(block);
    if (!recurringHit) {
      // As in the cache: every miss is stored until it is full, then recurring ones only.
      const recurs = this.ghosts.recall(block);
      if (recurs || this.recurring.size < this.capacity) this.recurring.store(block);
    }
    this.score = this.score * this.decay + (everyHit === recurringHit ? 0 : everyHit ? 1 : -1);
    const recentHit = this.recent.hit(block);
    if (!recentHit) this.recent.store(block);
    this.recentScore = this.recentScore * this.decay + (everyHit === recentHit ? 0 : recentHit ? 1 : -1);
  }
}
