// Reference cache policies for the policy benchmark: FIFO, LRU, CLOCK, SIEVE and S3-FIFO over
// fixed-size blocks, each holding at most `capacityBlocks` blocks. They model only which
// blocks are cached (no data, no devices), so they are the textbook yardstick the engine's
// hit ratio is compared with at equal cache-device bytes.
//
// Each `access(block)` returns whether the block was cached, and then caches it (every miss
// is admitted, as each of these policies does). Slot-array implementations keep the memory of
// a 1 GiB-over-256 MiB run small and the runs quick; the Map of a policy maps block to slot.
//
// The algorithms, in our words:
// - FIFO: evict the block cached longest ago; hits change nothing.
// - LRU: evict the block used longest ago.
// - CLOCK (FIFO with reinsertion): a circular list with a reference bit set by a hit; the hand
//   clears set bits as it passes and evicts the first block whose bit is clear.
// - SIEVE (NSDI '24): a FIFO queue with a visited bit set by a hit, and a hand that moves from
//   the oldest block towards the newest, clearing set bits and evicting the first clear one;
//   unlike CLOCK, a survivor keeps its place instead of moving to the head; new blocks enter
//   at the head, and the hand wraps from the head back to the tail.
// - S3-FIFO (SOSP '23): a small FIFO (10% of the capacity) that every new block enters, a main
//   FIFO (the rest), and a ghost FIFO of block numbers recently evicted from the small one (as
//   many as the main one holds). Hits raise a 2-bit frequency. Evicting from the small FIFO
//   moves a block that was hit while there into the main one and drops the others into the
//   ghost; evicting from the main FIFO gives a block with a frequency above zero another round
//   (frequency minus one). A miss on a block in the ghost enters the main FIFO directly.

export interface Policy {
  readonly name: string;
  /** Whether `block` is cached; then it is (and something else may not be). */
  access(block: number): boolean;
}

export class FifoPolicy implements Policy {
  readonly name = 'FIFO';
  private readonly cached = new Set<number>();
  private readonly ring: Int32Array;
  private next = 0;

  constructor(readonly capacityBlocks: number) {
    this.ring = new Int32Array(capacityBlocks).fill(-1);
  }

  access(block: number): boolean {
    if (this.cached.has(block)) return true;
    const old = this.ring[this.next] ?? -1;
    if (old >= 0) this.cached.delete(old);
    this.ring[this.next] = block;
    this.cached.add(block);
    this.next = (this.next + 1) % this.capacityBlocks;
    return false;
  }
}

export class LruPolicy implements Policy {
  readonly name = 'LRU';
  // A Map iterates in insertion order: deleting and setting again moves a block to the end.
  private readonly order = new Map<number, true>();

  constructor(readonly capacityBlocks: number) {}

  access(block: number): boolean {
    if (this.order.delete(block)) {
      this.order.set(block, true);
      return true;
    }
    if (this.order.size >= this.capacityBlocks) {
      const oldest = this.order.keys().next();
      if (oldest.done !== true) this.order.delete(oldest.value);
    }
    this.order.set(block, true);
    return false;
  }
}

export class ClockPolicy implements Policy {
  readonly name = 'CLOCK';
  private readonly slotOf = new Map<number, number>();
  private readonly blocks: Int32Array;
  private readonly referenced: Uint8Array;
  private hand = 0;
  private used = 0;

  constructor(readonly capacityBlocks: number) {
    this.blocks = new Int32Array(capacityBlocks).fill(-1);
    this.referenced = new Uint8Array(capacityBlocks);
  }

  access(block: number): boolean {
    const slot = this.slotOf.get(block);
    if (slot !== undefined) {
      this.referenced[slot] = 1;
      return true;
    }
    let target: number;
    if (this.used < this.capacityBlocks) {
      target = this.used++;
    } else {
      while (this.referenced[this.hand] === 1) {
        this.referenced[this.hand] = 0;
        this.hand = (this.hand + 1) % this.capacityBlocks;
      }
      target = this.hand;
      this.hand = (this.hand + 1) % this.capacityBlocks;
      this.slotOf.delete(this.blocks[target] ?? -1);
    }
    this.blocks[target] = block;
    this.referenced[target] = 0;
    this.slotOf.set(block, target);
    return false;
  }
}

/** Slots in a doubly linked list: `toward head` (newer) and `toward tail` (older). */
export class SievePolicy implements Policy {
  readonly name = 'SIEVE';
  private readonly slotOf = new Map<number, number>();
  private readonly blocks: Int32Array;
  private readonly visited: Uint8Array;
  private readonly newer: Int32Array;
  private readonly older: Int32Array;
  private head = -1; // newest
  private tail = -1; // oldest
  private hand = -1;
  private used = 0;

  constructor(readonly capacityBlocks: number) {
    this.blocks = new Int32Array(capacityBlocks).fill(-1);
    this.visited = new Uint8Array(capacityBlocks);
    this.newer = new Int32Array(capacityBlocks).fill(-1);
    this.older = new Int32Array(capacityBlocks).fill(-1);
  }

  access(block: number): boolean {
    const slot = this.slotOf.get(block);
    if (slot !== undefined) {
      this.visited[slot] = 1;
      return true;
    }
    const target = this.used < this.capacityBlocks ? this.used++ : this.evict();
    this.blocks[target] = block;
    this.visited[target] = 0;
    this.slotOf.set(block, target);
    // Enters at the head.
    this.newer[target] = -1;
    this.older[target] = this.head;
    if (this.head >= 0) this.newer[this.head] = target;
    this.head = target;
    if (this.tail < 0) this.tail = target;
    return false;
  }

  /** Moves the hand from where it stopped toward the head, wrapping to the tail; returns the freed slot. */
  private evict(): number {
    let at = this.hand >= 0 ? this.hand : this.tail;
    while (this.visited[at] === 1) {
      this.visited[at] = 0;
      const next = this.newer[at] ?? -1;
      at = next >= 0 ? next : this.tail;
    }
    const next = this.newer[at] ?? -1;
    this.hand = next;
    this.unlink(at);
    this.slotOf.delete(this.blocks[at] ?? -1);
    return at;
  }

  private unlink(slot: number): void {
    const newer = this.newer[slot] ?? -1;
    const older = this.older[slot] ?? -1;
    if (newer >= 0) this.older[newer] = older;
    else this.head = older;
    if (older >= 0) this.newer[older] = newer;
    else this.tail = newer;
  }
}

/** A FIFO of slots with an O(1) membership map, for S3-FIFO's three queues. */
class BlockQueue {
  private readonly ring: Int32Array;
  private first = 0;
  size = 0;

  constructor(readonly capacity: number) {
    this.ring = new Int32Array(Math.max(1, capacity));
  }

  push(block: number): void {
    this.ring[(this.first + this.size) % this.ring.length] = block;
    this.size++;
  }

  shift(): number {
    const block = this.ring[this.first] ?? -1;
    this.first = (this.first + 1) % this.ring.length;
    this.size--;
    return block;
  }
}

export class S3FifoPolicy implements Policy {
  readonly name = 'S3-FIFO';
  private readonly small: BlockQueue;
  private readonly main: BlockQueue;
  private readonly ghost: BlockQueue;
  /** Cached blocks and their frequency (0..3). */
  private readonly frequency = new Map<number, number>();
  /** Blocks in the ghost queue, with how many times each is queued there (a block can re-enter). */
  private readonly ghosts = new Map<number, number>();
  private readonly smallBlocks: number;

  constructor(readonly capacityBlocks: number) {
    this.smallBlocks = Math.max(1, Math.floor(capacityBlocks / 10));
    // Each queue's ring can hold everything: a block moves between them without overflow.
    this.small = new BlockQueue(capacityBlocks + 1);
    this.main = new BlockQueue(capacityBlocks + 1);
    this.ghost = new BlockQueue(capacityBlocks - this.smallBlocks + 1);
  }

  access(block: number): boolean {
    const frequency = this.frequency.get(block);
    if (frequency !== undefined) {
      if (frequency < 3) this.frequency.set(block, frequency + 1);
      return true;
    }
    while (this.small.size + this.main.size >= this.capacityBlocks) this.evict();
    if (this.ghosts.has(block)) {
      this.main.push(block);
    } else {
      this.small.push(block);
    }
    this.frequency.set(block, 0);
    return false;
  }

  private evict(): void {
    if (this.small.size >= this.smallBlocks || this.main.size === 0) this.evictSmall();
    else this.evictMain();
  }

  private evictSmall(): void {
    while (this.small.size > 0) {
      const block = this.small.shift();
      if ((this.frequency.get(block) ?? 0) > 0) {
        this.main.push(block);
        if (this.main.size > this.capacityBlocks - this.smallBlocks) this.evictMain();
      } else {
        this.frequency.delete(block);
        this.remember(block);
        return;
      }
    }
  }

  private evictMain(): void {
    while (this.main.size > 0) {
      const block = this.main.shift();
      const frequency = this.frequency.get(block) ?? 0;
      if (frequency > 0) {
        this.frequency.set(block, frequency - 1);
        this.main.push(block);
      } else {
        this.frequency.delete(block);
        return;
      }
    }
  }

  private remember(block: number): void {
    if (this.ghost.size >= this.ghost.capacity - 1) {
      const old = this.ghost.shift();
      const count = (this.ghosts.get(old) ?? 1) - 1;
      if (count > 0) this.ghosts.set(old, count);
      else this.ghosts.delete(old);
    }
    this.ghost.push(block);
    this.ghosts.set(block, (this.ghosts.get(block) ?? 0) + 1);
  }
}

/** Every reference policy, at one capacity. */
export function referencePolicies(capacityBlocks: number): Policy[] {
  return [new FifoPolicy(capacityBlocks), new LruPolicy(capacityBlocks), new ClockPolicy(capacityBlocks), new SievePolicy(capacityBlocks), new S3FifoPolicy(capacityBlocks)];
}

/** Replays `blocks` through `policy`; returns the fraction that hit. */
export function hitRatio(policy: Policy, blocks: Uint32Array): number {
  let hits = 0;
  for (const block of blocks) if (policy.access(block)) hits++;
  return blocks.length === 0 ? 0 : hits / blocks.length;
}
