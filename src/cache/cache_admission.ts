// Admission of read misses: once the cache is full, a miss is stored only when it recurs.
//
// A full cache stores a miss by evicting something. Data read once and never again (a scan,
// the long tail of a skewed workload) would then push out data that is read again and again,
// as it does under FIFO and LRU. So, as S3-FIFO's ghost queue and TinyLFU's doorkeeper do, a
// full cache remembers the blocks its recent misses started at, and stores a miss only when
// its block is remembered: the second miss within the memory's window is admitted, the first
// is read from the backing device and not stored. This is for read caches, the ones GC lets
// fill up (CacheContext.mostlyClean: little dirty data, gc_percent not 0). Every miss is
// admitted while such a cache still has room (more than admitAllFreeSegments free segments),
// and always in a cache holding much dirty data or with gc_percent 0, whose GC keeps free space
// for writers or reclaims eagerly: there a stored miss displaces nothing a read would want.
// The recurrence rule costs a moving working set a second miss per block; while sampled shadow
// caches find that storing every miss would have hit more (cache_admission_shadow.ts), a full
// read cache stores first misses too.
//
// The memory is two Bloom filters of equal size, `current` and `previous`, each with two bit
// positions per block: a block is remembered when both its bits are set in either filter. A
// block is recorded in `current`; once `current` has recorded `entries` blocks it becomes
// `previous` and a cleared filter becomes `current`. So a block stays remembered for between
// `entries` and twice `entries` later misses, with no per-entry deletion, at a fixed cost of
// ghostBitsPerEntry bits per entry in each filter. `entries` is the number of 4 KiB blocks the
// cache holds (S3-FIFO sizes its ghost queue as its main queue), bounded by ghostEntriesMax.
// A false positive admits a first miss, which only makes the filter more permissive.
// Invariant: the filters' sizes never change after construction; nothing here allocates per miss.

import { assert } from '../lib/assert.js';
import { AdmissionShadow, shadowBlocksMin } from './cache_admission_shadow.js';
import { gcCleanReserveSegments } from './cache_context.js';

/** Bits of each filter per remembered block: 8 bits and 2 probes give about 5% false positives. */
export const ghostBitsPerEntry = 8;
/** At most this many blocks remembered (each filter then takes 16 MiB). */
export const ghostEntriesMax = 1 << 24;
/** The block size misses are remembered at. */
export const ghostBlockBytes = 4096;
/**
 * Every miss is admitted while more than this many segments are free: the free segments a
 * full read cache keeps (cache_context.ts, gcCleanReserveSegments) and two more, so that GC
 * has not begun to evict when first misses stop being stored, and the rule does not flicker
 * as GC frees a segment and fills take it.
 */
export const admitAllFreeSegments = gcCleanReserveSegments + 2;

/** Remembers recently missed blocks, in a bounded window (see the file comment). */
export class MissGhosts {
  readonly entries: number;
  private current: Uint32Array;
  private previous: Uint32Array;
  private readonly bitMask: number;
  private recorded = 0;

  constructor(entries: number) {
    assert(entries > 0, 'a ghost memory needs entries');
    this.entries = entries;
    // A power of two of bits, at least ghostBitsPerEntry per entry, so a probe is a mask.
    let bits = 64;
    while (bits < entries * ghostBitsPerEntry) bits *= 2;
    this.bitMask = bits - 1;
    this.current = new Uint32Array(bits / 32);
    this.previous = new Uint32Array(bits / 32);
  }

  /** Heap bytes of both filters. */
  get storageBytes(): number {
    return this.current.byteLength + this.previous.byteLength;
  }

  /** Whether `block` was remembered; remembers it either way. */
  recall(block: number): boolean {
    // Two probe positions from the block number's two 32-bit halves (blocks pass 2^32 on
    // backing devices over 16 TiB), mixed so neighbouring blocks land far apart.
    const low = block >>> 0;
    const high = Math.floor(block / 0x1_0000_0000) >>> 0;
    let h = Math.imul(low ^ Math.imul(high, 0x9e37_79b1), 0x85eb_ca6b);
    h ^= h >>> 13;
    h = Math.imul(h, 0xc2b2_ae35);
    h ^= h >>> 16;
    const a = h & this.bitMask;
    const b = Math.imul(h ^ (h >>> 15), 0x2c1b_3c6d) & this.bitMask;
    const seen = (has(this.current, a) && has(this.current, b)) || (has(this.previous, a) && has(this.previous, b));
    set(this.current, a);
    set(this.current, b);
    if (++this.recorded >= this.entries) {
      const cleared = this.previous;
      cleared.fill(0);
      this.previous = this.current;
      this.current = cleared;
      this.recorded = 0;
    }
    return seen;
  }
}

function has(filter: Uint32Array, bit: number): boolean {
  return ((filter[bit >>> 5] ?? 0) & (1 << (bit & 31))) !== 0;
}

function set(filter: Uint32Array, bit: number): void {
  filter[bit >>> 5] = (filter[bit >>> 5] ?? 0) | (1 << (bit & 31));
}

/** The number of blocks a cache of `dataCapacityBytes` remembers (see the file comment). */
export function ghostEntriesFor(dataCapacityBytes: number): number {
  return Math.max(1, Math.min(ghostEntriesMax, Math.floor(dataCapacityBytes / ghostBlockBytes)));
}

/** A miss is stored, stored although it did not recur (the shadows' choice), or not stored. */
export type AdmissionVerdict = 'stored' | 'first-miss' | 'rejected';

/** The admission decision for read misses of one cache. */
export class ReadAdmission {
  private readonly ghosts: MissGhosts;
  readonly shadow: AdmissionShadow | undefined;

  constructor(dataCapacityBytes: number, heldBytes = dataCapacityBytes) {
    this.ghosts = new MissGhosts(ghostEntriesFor(dataCapacityBytes));
    const heldBlocks = Math.floor(heldBytes / ghostBlockBytes);
    this.shadow = heldBlocks >= shadowBlocksMin ? new AdmissionShadow(heldBlocks) : undefined;
  }

  /** A client read whose misses may be stored, starting at `offsetBytes`: the shadows see it. */
  observe(offsetBytes: number): void {
    this.shadow?.observe(Math.floor(offsetBytes / ghostBlockBytes));
  }

  get storageBytes(): number {
    return this.ghosts.storageBytes;
  }

  /** Whether GC's second chance should copy only recently hit data (the shadows' choice; SecondChancePolicy). */
  get relogRecentOnly(): boolean {
    return this.shadow?.relogRecentOnly === true;
  }

  /**
   * Whether a miss starting at `offsetBytes` is stored, with `freeSegments` free in a cache
   * that is `mostlyClean` or not: in a read cache with no room left, a recurring one, or any
   * while the shadows find that storing every miss pays ('first-miss': stored for that alone).
   */
  admit(offsetBytes: number, freeSegments: number, mostlyClean: boolean): AdmissionVerdict {
    if (!mostlyClean || freeSegments > admitAllFreeSegments) return 'stored';
    // Recorded whichever rule is in force, so the memory is current when the rule changes.
    if (this.ghosts.recall(Math.floor(offsetBytes / ghostBlockBytes))) return 'stored';
    return this.shadow?.storeEveryMiss === true ? 'first-miss' : 'rejected';
  }
}
