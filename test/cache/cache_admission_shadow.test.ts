// The shadow caches that choose the admission rule (cache_admission_shadow.ts): CLOCK eviction,
// the sample rate, and the choice on the two workloads that want opposite rules: a working set
// that moves (store every miss) and a hot set read among blocks read once (store recurring ones).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { AdmissionShadow, shadowBlocksMax, ShadowClock } from '../../src/cache/cache_admission_shadow.js';
import { Prng } from '../../sim/prng.js';

describe('shadow CLOCK cache', () => {
  it('evicts the first unreferenced block the hand meets and keeps referenced ones for another lap', () => {
    const clock = new ShadowClock(3);
    for (const block of [1, 2, 3]) clock.store(block);
    assert.equal(clock.size, 3);
    assert.equal(clock.hit(1), true);
    clock.store(4); // the hand passes 1 (referenced: cleared) and evicts 2
    assert.deepEqual([1, 2, 3, 4].map((block) => clock.hit(block)), [true, false, true, true]);
    // Now 1, 3 and 4 are all referenced: a full lap clears them and evicts where the hand began.
    clock.store(5);
    assert.equal(clock.size, 3);
    assert.equal([1, 3, 4].filter((block) => clock.hit(block)).length, 2, 'one of the three went');
    assert.equal(clock.hit(5), true);
  });

  it('with a recency window, gives a second chance only to blocks hit within the window', () => {
    const clock = new ShadowClock(4, 3);
    for (const block of [1, 2, 3, 4]) clock.store(block);
    assert.equal(clock.hit(1), true); // hit after 4 insertions
    clock.store(5); // 5 insertions: 1 was hit 1 insertion ago, within the window; it stays and 2 goes
    assert.deepEqual([1, 2, 3, 4, 5].map((block) => clock.hit(block)), [true, false, true, true, true]);
    // Every block is referenced now (hit at 6 insertions: 5 and 1 of the second chance).
    for (let block = 10; block < 14; block++) clock.store(block);
    // Plain CLOCK would clear all four bits and keep most of them a lap longer; the window
    // gives a second chance only to those hit within the last 3 insertions, so all are gone.
    assert.deepEqual([1, 3, 4, 5].map((block) => clock.hit(block)), [false, false, false, false]);
    assert.equal(clock.size, 4);
  });
});

describe('admission shadow', () => {
  it('samples one block in 2^n of a large cache, so each shadow stays within its bound', () => {
    const small = new AdmissionShadow(1000);
    assert.equal(small.sampleShift, 0);
    assert.equal(small.capacity, 1000);
    const large = new AdmissionShadow(1 << 26); // 256 GiB of 4 KiB blocks
    assert.ok(large.capacity <= shadowBlocksMax && large.capacity > shadowBlocksMax / 2, `capacity ${large.capacity}`);
    assert.equal(large.capacity * 2 ** large.sampleShift, 1 << 26);
    // The sample is a fixed set of blocks, about the expected share of them.
    const probe = new AdmissionShadow(shadowBlocksMax * 16);
    assert.equal(probe.sampleShift, 4);
    let sampled = 0;
    for (let block = 0; block < 1 << 16; block++) {
      if (probe.sampled(block)) sampled++;
      assert.equal(probe.sampled(block), probe.sampled(block));
    }
    assert.ok(Math.abs(sampled - 4096) < 400, `${sampled} of 65,536 blocks sampled`);
    // Blocks past 2^32 (backing devices over 16 TiB) are sampled by their high half too.
    let high = 0;
    for (let k = 0; k < 1 << 16; k++) if (probe.sampled(k * 2 ** 32 + 5)) high++;
    assert.ok(Math.abs(high - 4096) < 400, `${high} of 65,536 blocks 2^32 apart sampled`);
  });

  it('stores every miss while the working set moves, and recurring ones only while a hot set is read among blocks read once', () => {
    const capacity = 1024;
    const shadow = new AdmissionShadow(capacity);
    const prng = new Prng(7);
    // A hot set of half the shadow's size, read at random among as many reads of blocks never read again.
    let cold = 1_000_000;
    for (let i = 0; i < 20 * capacity; i++) shadow.observe(i % 2 === 0 ? prng.nextInt(capacity / 2) : cold++);
    assert.equal(shadow.storeEveryMiss, false, 'the one-time blocks would push the hot set out');
    // Now the hot set moves by its whole size every four passes over it.
    let moves = 0;
    for (let base = 2_000_000; moves < 4; base += capacity / 2, moves++) {
      for (let i = 0; i < 2 * capacity; i++) shadow.observe(base + prng.nextInt(capacity / 2));
    }
    assert.equal(shadow.storeEveryMiss, true, 'each new hot set would miss twice');
    // And back: one-time reads among a steady hot set turn it round again.
    for (let i = 0; i < 20 * capacity; i++) shadow.observe(i % 2 === 0 ? 3_000_000 + prng.nextInt(capacity / 2) : cold++);
    assert.equal(shadow.storeEveryMiss, false);
  });
});

/** Draws ranks in [0, count) with P(k) proportional to 1 / (k + 1)^alpha (Zipf), by bisecting the cumulative sums. */
function zipf(count: number, alpha: number): (prng: Prng) => number {
  const cdf = new Float64Array(count);
  let sum = 0;
  for (let k = 0; k < count; k++) cdf[k] = sum += 1 / Math.pow(k + 1, alpha);
  return (prng) => {
    const u = prng.nextFloat() * sum;
    let lo = 0;
    let hi = count - 1;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((cdf[mid] ?? sum) < u) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
}

describe('second-chance choice of the shadows', () => {
  it('keeps plain CLOCK on a steady Zipf workload and gives second chances to recent hits only while the popular set moves', () => {
    const capacity = 1024;
    const shadow = new AdmissionShadow(capacity);
    const prng = new Prng(3);
    // A getter: the assertions below would otherwise narrow it to one value for the compiler.
    const chosen = (): boolean => shadow.relogRecentOnly;
    // Zipf 0.9 over four times the shadow, steady: what was hit a lap ago is hit again.
    const steady = zipf(4 * capacity, 0.9);
    let recentOnly = 0;
    for (let i = 0; i < 30 * capacity; i++) {
      shadow.observe(steady(prng));
      if (i >= 15 * capacity && chosen()) recentOnly++;
    }
    assert.ok(recentOnly < 0.1 * 15 * capacity, `recent hits only for ${recentOnly} of the last ${15 * capacity} reads`);
    assert.equal(chosen(), false, 'steady popularity: every hit earns its second chance');
    // Zipf 0.9 over twice the shadow, moving by half of it with a new popularity order every
    // four shadows' worth of reads (the policy benchmark's shifting trace, scaled down).
    const moving = zipf(2 * capacity, 0.9);
    const where = new Uint32Array(2 * capacity);
    recentOnly = 0;
    let counted = 0;
    for (let phase = 1; phase <= 8; phase++) {
      for (let i = 0; i < where.length; i++) where[i] = 1_000_000 + phase * capacity + i;
      for (let i = where.length - 1; i > 0; i--) {
        const j = prng.nextInt(i + 1);
        const held = where[i] ?? 0;
        where[i] = where[j] ?? 0;
        where[j] = held;
      }
      for (let i = 0; i < 4 * capacity; i++) {
        shadow.observe(where[moving(prng)] ?? 0);
        if (phase > 2) {
          counted++;
          if (chosen()) recentOnly++;
        }
      }
    }
    assert.ok(recentOnly > 0.5 * counted, `recent hits only for ${recentOnly} of ${counted} reads after two moves`);
    assert.equal(chosen(), true, 'hits from before a move are worth no second chance');
  });
});
