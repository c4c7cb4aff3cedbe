// The policy benchmark's yardsticks: each reference policy behaves as its algorithm says on
// small sequences worked out by hand, never holds more than its capacity, and the traces are
// what they claim (Zipf skew, scans, shifting sets). A wrong yardstick would make any
// comparison in the benchmark meaningless.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ClockPolicy, FifoPolicy, LruPolicy, S3FifoPolicy, SievePolicy, hitRatio, referencePolicies, type Policy } from '../../bench/policy/reference_policies.js';
import { hotScanTrace, permutation, shiftingTrace, zipfTrace, ZipfSampler } from '../../bench/policy/traces.js';
import { Prng } from '../../sim/prng.js';

/** Which accesses hit, as a string of h and m. */
function pattern(policy: Policy, blocks: number[]): string {
  return blocks.map((block) => (policy.access(block) ? 'h' : 'm')).join('');
}

describe('reference policies', () => {
  it('FIFO evicts the oldest insertion even if it was just hit', () => {
    // 1 2 3 fill; 1 hits; 4 evicts 1 (oldest insert); 1 misses.
    assert.equal(pattern(new FifoPolicy(3), [1, 2, 3, 1, 4, 1]), 'mmmhmm');
  });

  it('LRU evicts the least recently used', () => {
    // 1 2 3 fill; 1 hits (now newest); 4 evicts 2; 1 hits; 2 misses.
    assert.equal(pattern(new LruPolicy(3), [1, 2, 3, 1, 4, 1, 2]), 'mmmhmhm');
  });

  it('CLOCK gives a hit block a second chance', () => {
    // 1 2 3 fill; 1 hit (bit set); 4: hand clears 1, evicts 2; 1 hits, 2 misses.
    assert.equal(pattern(new ClockPolicy(3), [1, 2, 3, 1, 4, 1, 2]), 'mmmhmhm');
    // Without the hit, 4 evicts 1.
    assert.equal(pattern(new ClockPolicy(3), [1, 2, 3, 4, 1]), 'mmmmm');
  });

  it('SIEVE keeps a visited block in place and its hand resumes where it stopped', () => {
    // 1 2 3 fill (tail 1 .. head 3); 1 and 2 visited; 4: the hand clears 1, clears 2, evicts 3;
    // the hand now points past 3 (none newer): wraps to the tail for the next eviction.
    const sieve = new SievePolicy(3);
    assert.equal(pattern(sieve, [1, 2, 3, 1, 2, 4]), 'mmmhhm');
    assert.equal(pattern(sieve, [3]), 'm', '3 was evicted');
    // 3 evicted the tail's 1 (bits cleared by the first pass), so 2 and 4 remain with 3.
    assert.equal(pattern(sieve, [2, 4, 1]), 'hhm');
  });

  it('S3-FIFO drops one-hit blocks from its small queue and readmits a ghost into the main queue', () => {
    // Capacity 10: small queue 1 block, main 9.
    const s3 = new S3FifoPolicy(10);
    // Block 0 hit twice, then 20 new blocks pass through: 0 was hit in the small queue, so it
    // moves to main and survives the one-hit wonders.
    assert.equal(pattern(s3, [0, 0]), 'mh');
    for (let block = 100; block < 120; block++) s3.access(block);
    assert.equal(s3.access(0), true, 'the reused block survived the scan');
    // The cache filled at 109; from then on each miss pushed the small queue's oldest one-hit
    // block (100, 101, ..., 110) into the ghost, and 111..119 are still in the small queue.
    assert.equal(s3.access(119), true);
    assert.equal(s3.access(110), false, '110 was evicted');
    for (let block = 200; block < 230; block++) s3.access(block);
    assert.equal(s3.access(110), true, 'a ghost readmitted into main outlives one-hit blocks');
    assert.equal(s3.access(111), false, 'while a one-hit block of the same age is gone');
  });

  it('never holds more blocks than its capacity: after any sequence, at most capacity distinct blocks hit', () => {
    const prng = new Prng(5);
    for (const policy of referencePolicies(64)) {
      for (let i = 0; i < 5000; i++) policy.access(prng.nextInt(200));
      // Each block probed once: a probe's own insertion cannot make a later (distinct) probe
      // hit, so the hits are blocks cached before the probes: at most 64.
      let hits = 0;
      for (let block = 0; block < 200; block++) if (policy.access(block)) hits++;
      assert.ok(hits <= 64, `${policy.name}: ${hits} hits from 200 distinct blocks with 64 slots`);
    }
  });

  it('on a trace that fits, every policy misses each block once', () => {
    const blocks = Uint32Array.from({ length: 1000 }, (_, i) => i % 50);
    for (const policy of referencePolicies(64)) assert.equal(hitRatio(policy, blocks), 950 / 1000, policy.name);
  });

  it('through scans larger than the cache, SIEVE and S3-FIFO keep more of a hot set than LRU', () => {
    // Each scan flushes LRU's and FIFO's hot set; SIEVE's hand and S3-FIFO's small queue keep
    // the visited blocks. (CLOCK does not: every hot block has its bit set, so one turn of the
    // hand clears them all and it behaves as FIFO.)
    const trace = hotScanTrace({ hotBlocks: 64, scanBlocks: 256, scanEveryRequests: 1000, requests: 40_000, seed: 1 });
    const ratios = Object.fromEntries(referencePolicies(128).map((policy) => [policy.name, hitRatio(policy, trace.blocks)]));
    for (const name of ['SIEVE', 'S3-FIFO']) {
      assert.ok((ratios[name] ?? 0) > (ratios.LRU ?? 1) + 0.02, `${name} ${ratios[name]} beats LRU ${ratios.LRU} on hot+scans`);
    }
  });
});

describe('policy traces', () => {
  it('a permutation holds every block once', () => {
    const p = permutation(1000, new Prng(3));
    assert.deepEqual([...p].sort((a, b) => a - b), Array.from({ length: 1000 }, (_, i) => i));
  });

  it('Zipf ranks follow 1/k^alpha: rank 0 about twice as frequent as rank 1 at alpha 1', () => {
    const sampler = new ZipfSampler(1000, 1.0);
    const prng = new Prng(9);
    const counts = new Uint32Array(1000);
    for (let i = 0; i < 200_000; i++) {
      const rank = sampler.next(prng);
      counts[rank] = (counts[rank] ?? 0) + 1;
    }
    const ratio = (counts[0] ?? 0) / (counts[1] ?? 1);
    assert.ok(ratio > 1.8 && ratio < 2.2, `rank 0 / rank 1 = ${ratio}`);
  });

  it('a Zipf trace stays in its working set, and a skewed one hits LRU more than a flat one', () => {
    const skewed = zipfTrace({ alpha: 1.0, workingSetBlocks: 4000, requests: 50_000, seed: 2 });
    const flat = zipfTrace({ alpha: 0.1, workingSetBlocks: 4000, requests: 50_000, seed: 2 });
    assert.ok(skewed.blocks.every((block) => block < 4000));
    assert.ok(hitRatio(new LruPolicy(1000), skewed.blocks) > hitRatio(new LruPolicy(1000), flat.blocks) + 0.2);
  });

  it('a shifting trace moves: its last phase reads blocks its first never did', () => {
    const trace = shiftingTrace({ alpha: 0.9, workingSetBlocks: 1000, phases: 4, requests: 40_000, seed: 4 });
    const first = new Set(trace.blocks.subarray(0, 10_000));
    const last = trace.blocks.subarray(30_000);
    assert.ok(last.every((block) => block >= 1500 && block < 2500), 'phase 3 spans [1500, 2500)');
    assert.ok(last.some((block) => !first.has(block)));
  });
});
