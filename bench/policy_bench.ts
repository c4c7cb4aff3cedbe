// Cache policy: pcache's read hit ratio on block traces against textbook policies (FIFO, LRU,
// CLOCK, SIEVE, S3-FIFO) at equal cache-device bytes, in the same run.
//
// Method: each trace (bench/policy/traces.ts) is a sequence of 4 KiB block reads. pcache gets
// a fresh cache device of `cacheDeviceBytes`, formatted as `serve --cache-size` would (default
// segment size and gc_percent), in front of an in-memory backing device, with background
// writeback and GC as in production; the trace is read through the engine at queue depth 1,
// (32 reads per event-loop turn, as a busy connection's batch arrives), and its hit ratio is
// the engine's read-hit bytes over the bytes read. The reference policies
// hold `cacheDeviceBytes / 4 KiB` blocks: the whole device counts as cache for them, while
// pcache pays for its metadata, its GC reserve and its segment tails out of the same bytes.
// Every block counts once per request; every policy starts cold on the same trace.
//
// The goal (cache-policy issue): pcache >= 0.9x the best of LRU, CLOCK, SIEVE and S3-FIFO on
// every trace, and above FIFO everywhere. The hot-set trace's scans are sequential, so the
// sequential cutoff (on by default) keeps them out of the cache by itself; the trace runs a
// second time with the cutoff off, where only the admission policy can.
// PCACHE_BENCH_TRACES: a comma list of trace names to run (default all).
import { Cache } from '../src/cache/cache.js';
import { MemoryDevice } from '../src/device/memory_device.js';
import type { FormatOptions } from '../src/cache/cache_metadata.js';
import { MiB } from '../src/lib/units.js';
import { param, report } from './harness.js';
import { blocksSpanned, hotScanTrace, shiftingTrace, zipfTrace, type Trace } from './policy/traces.js';
import { hitRatio, referencePolicies } from './policy/reference_policies.js';

const blockBytes = 4096;
const cacheDeviceBytes = param(16, 256) * MiB;
const cacheBlocks = cacheDeviceBytes / blockBytes;
const requests = param(40_000, 1_500_000);
/** Reads replayed per event-loop turn (a busy NBD connection's batch). */
const readsPerTurn = 32;

interface Run {
  readonly trace: Trace;
  readonly cutoffOff?: boolean;
}

function traces(): Run[] {
  const hotScans = hotScanTrace({ hotBlocks: cacheBlocks / 2, scanBlocks: 2 * cacheBlocks, scanEveryRequests: 4 * cacheBlocks, requests, seed: 14 });
  return [
    { trace: zipfTrace({ alpha: 0.9, workingSetBlocks: 4 * cacheBlocks, requests, seed: 11 }) },
    { trace: zipfTrace({ alpha: 0.8, workingSetBlocks: 4 * cacheBlocks, requests, seed: 12 }) },
    { trace: zipfTrace({ alpha: 1.0, workingSetBlocks: 4 * cacheBlocks, requests, seed: 13 }) },
    { trace: hotScans },
    { trace: hotScans, cutoffOff: true },
    { trace: shiftingTrace({ alpha: 0.9, workingSetBlocks: 2 * cacheBlocks, phases: 6, requests, seed: 15 }) },
  ];
}

/** Reads the trace through a fresh engine; returns its hit ratio and requests per second. */
async function engineHitRatio(trace: Trace, cutoffOff: boolean): Promise<{ ratio: number; perSecond: number; fills: string }> {
  const cache = await Cache.open({
    cacheDevice: new MemoryDevice(cacheDeviceBytes),
    backingDevice: new MemoryDevice(blocksSpanned(trace) * blockBytes),
    // Smoke runs use 1 MiB segments: a 16 MiB device holds too few 16 MiB ones.
    formatIfBlank: param<FormatOptions | true>({ segmentSizeBytes: MiB }, true),
    ...(cutoffOff ? { tuning: { sequentialCutoffBytes: 0 } } : {}),
  });
  const buffer = new Uint8Array(blockBytes);
  const start = performance.now();
  let sinceTurn = 0;
  for (const block of trace.blocks) {
    const io = cache.read(buffer, block * blockBytes);
    if (io !== undefined) await io;
    // An in-memory device settles every read in a microtask, so a loop of awaits would never
    // let the event loop turn: writeback's and GC's timers would never fire. Requests from
    // sockets arrive in event-loop turns; so do these, a few at a time.
    if (++sinceTurn === readsPerTurn) {
      sinceTurn = 0;
      await new Promise<void>((resolve) => { setImmediate(resolve); });
    }
  }
  const seconds = (performance.now() - start) / 1000;
  const counters = cache.status().counters;
  await cache.close();
  const bytesRead = trace.blocks.length * blockBytes;
  return {
    ratio: counters.readHitBytes / bytesRead,
    perSecond: trace.blocks.length / seconds,
    // Where the misses went: stored, turned away for want of space, not admitted (first miss), and what GC re-logged.
    fills: `fills stored ${counters.fillsStored}, no space ${counters.fillsSkipped}, first miss ${counters.fillsNotRecurring}; re-logged ${counters.secondChanceKeys} keys; GC freed ${counters.gcSegmentsFreed} segments`,
  };
}

async function main(): Promise<void> {
  console.log(`cache device ${cacheDeviceBytes / MiB} MiB (${cacheBlocks} blocks of 4 KiB for the reference policies), ${requests} reads per trace`);
  const wanted = process.env.PCACHE_BENCH_TRACES?.split(',');
  for (const { trace, cutoffOff = false } of traces().filter((run) => wanted === undefined || wanted.includes(run.trace.name))) {
    const name = cutoffOff ? `${trace.name} (cutoff off)` : trace.name;
    const references = referencePolicies(cacheBlocks).map((policy) => ({ name: policy.name, ratio: hitRatio(policy, trace.blocks) }));
    const engine = await engineHitRatio(trace, cutoffOff);
    const textbook = references.filter((reference) => reference.name !== 'FIFO');
    const best = textbook.reduce((a, b) => (b.ratio > a.ratio ? b : a));
    const fifo = references.find((reference) => reference.name === 'FIFO');
    console.log(`${name}: ${trace.description}; ${references.map((r) => `${r.name} ${r.ratio.toFixed(3)}`).join(', ')}; pcache ${engine.ratio.toFixed(3)} (${Math.round(engine.perSecond)} reads/s; ${engine.fills})`);
    report({ bench: 'policy', metric: `${name} hit ratio vs best`, value: engine.ratio, unit: 'hits/read', peer: best.name, peerValue: best.ratio });
    if (fifo !== undefined) report({ bench: 'policy', metric: `${name} hit ratio vs FIFO`, value: engine.ratio, unit: 'hits/read', peer: 'FIFO', peerValue: fifo.ratio });
  }
}

await main();
