// Prng: the simulator's only source of randomness (xoshiro128**, seeded through splitmix32).
//
// Every random choice the simulator makes (crash states, tear masks, fault firing, I/O
// completion order, workloads) comes from a Prng built from a printed seed, so a failure
// replays exactly from that seed. Math.random is never used. Invariants: the state is four
// 32-bit words that are never all zero; a seed is a non-negative safe integer, so it survives
// being printed and pasted back into a command line.

import { assert } from '../src/lib/assert.js';

const twoPow32 = 0x1_0000_0000;
/** splitmix32's increment: the 32-bit golden ratio. */
const goldenGamma32 = 0x9e3779b9;

export class Prng {
  private s0 = 0;
  private s1 = 0;
  private s2 = 0;
  private s3 = 0;

  constructor(seed: number) {
    assert(Number.isSafeInteger(seed), `seed must be a safe integer: ${seed}`);
    assert(seed >= 0, `seed must not be negative: ${seed}`);
    // Fold both halves of the seed into splitmix32's state so seeds above 2^32 differ too.
    let state = (seed % twoPow32) ^ Math.imul(Math.floor(seed / twoPow32), goldenGamma32);
    const nextMix = (): number => {
      state = (state + goldenGamma32) | 0;
      return mix32(state);
    };
    this.s0 = nextMix();
    this.s1 = nextMix();
    this.s2 = nextMix();
    this.s3 = nextMix();
    // splitmix32 outputs are a bijection of distinct inputs, so four zeros cannot happen; the
    // generator would be stuck forever if they did.
    assert((this.s0 | this.s1 | this.s2 | this.s3) !== 0, 'xoshiro state must not be all zero');
  }

  /** A uniformly distributed unsigned 32-bit integer. */
  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const shifted = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= shifted;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** A uniformly distributed integer in [0, bound), without modulo bias. */
  nextInt(bound: number): number {
    assert(Number.isInteger(bound), `bound must be an integer: ${bound}`);
    assert(bound > 0 && bound <= twoPow32, `bound out of range: ${bound}`);
    // Reject the top partial copy of [0, bound) so every residue is equally likely.
    const limit = twoPow32 - (twoPow32 % bound);
    for (;;) {
      const value = this.nextU32();
      if (value < limit) return value % bound;
    }
  }

  /** A uniformly distributed number in [0, 1). */
  nextFloat(): number {
    return this.nextU32() / twoPow32;
  }

  /** True with probability `probability`. */
  chance(probability: number): boolean {
    assert(probability >= 0 && probability <= 1, `probability out of range: ${probability}`);
    if (probability === 0) return false;
    if (probability === 1) return true;
    return this.nextFloat() < probability;
  }

  /** A uniformly chosen element of a non-empty array. */
  pick<T>(items: readonly T[]): T {
    assert(items.length > 0, 'cannot pick from an empty array');
    // nextInt keeps the index inside the array, so the element exists (it may itself be undefined).
    return items[this.nextInt(items.length)] as T;
  }

  /** Shuffles `items` in place (Fisher-Yates) and returns it. */
  shuffle<T>(items: T[]): T[] {
    for (let index = items.length - 1; index > 0; index -= 1) {
      const other = this.nextInt(index + 1);
      const held = items[index] as T;
      items[index] = items[other] as T;
      items[other] = held;
    }
    return items;
  }

  /** A new seed drawn from this stream, for an independent child stream that can be printed. */
  nextSeed(): number {
    // 53 bits: a safe integer that round-trips through text.
    return (this.nextU32() & 0x1f_ffff) * twoPow32 + this.nextU32();
  }

  /** An independent generator derived from this one's stream. */
  fork(): Prng {
    return new Prng(this.nextSeed());
  }
}

function rotl(value: number, bits: number): number {
  return (value << bits) | (value >>> (32 - bits));
}

/** splitmix32's output function (a bijection on 32-bit words). */
function mix32(input: number): number {
  let z = input;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return (z ^ (z >>> 16)) >>> 0;
}
