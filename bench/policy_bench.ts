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
// Once through the NBD server: the shifting trace (PCACHE_BENCH_NBD_TRACE names another) is
// also read through a real `pcache serve` (a sparse cache file of the same size, created fresh,
// a backing file on tmpfs) by an NBD client, 32 reads in flight at a time, and its hit ratio,
// from the server's counters, is printed beside the engine's.
// PCACHE_BENCH_TRACES: a comma list of trace names to run (default all).
import os from 'node:os';
import path from 'node:path';
import { Cache } from '../src/cache/cache.js';
import { controlRequest } from '../src/cli/control_client.js';
import { NbdClient } from '../src/nbd/client/client.js';
import { MemoryDevice } from '../src/device/memory_device.js';
import type { FormatOptions } from '../src/cache/cache_metadata.js';
import { MiB } from '../src/lib/units.js';
import { param, report } from './harness.js';
import { fill, makeScratch, removeScratch, startPcacheServe, stopChild } from './processes.js';
import { blocksSpanned, hotScanTrace, shiftingTrace, zipfTrace, type Trace } from './policy/traces.js';
import { hitRatio, referencePolicies } from './policy/reference_policies.js';

const blockBytes = 4096;
const cacheDeviceBytes = param(16, 256) * MiB;
const cacheBlocks = cacheDeviceBytes / blockBytes;
const requests = param(40_000, 1_500_000);
/** Reads replayed per event-loop turn (a busy NBD connection's batch). */
const readsPerTurn = 32;
/** The trace also read through the NBD server. */
const nbdTrace = process.env.PCACHE_BENCH_NBD_TRACE ?? 'shifting';

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

/** Reads the trace through `pcache serve` over NBD; returns its hit ratio from the server's counters. */
async function nbdHitRatio(trace: Trace): Promise<number> {
  const dir = makeScratch(os.platform() === 'linux' ? '/dev/shm' : os.tmpdir(), 'pcache-policy-');
  const socket = path.join(dir, 'nbd.sock');
  const control = path.join(dir, 'control.sock');
  const backing = path.join(dir, 'backing.img');
  fill(backing, blocksSpanned(trace) * blockBytes, false);
  const segmentArgs = param(['--segment-size', '1M'], []);
  const server = await startPcacheServe('pcache serve (policy)', dir, socket, [
    '--cache', path.join(dir, 'cache.img'), '--cache-size', String(cacheDeviceBytes), ...segmentArgs, '--backing', backing, '--control', control,
  ]);
  try {
    const client = await NbdClient.connect({ kind: 'unix', socketPath: socket }, { exportName: '' });
    const buffers = Array.from({ length: readsPerTurn }, () => new Uint8Array(blockBytes));
    const blocks = trace.blocks;
    for (let at = 0; at < blocks.length; at += readsPerTurn) {
      const batch: Promise<void>[] = [];
      for (let i = 0; i < readsPerTurn && at + i < blocks.length; i++) batch.push(client.read(buffers[i] ?? new Uint8Array(blockBytes), (blocks[at + i] ?? 0) * blockBytes));
      await Promise.all(batch);
    }
    await client.disconnect();
    const status = await controlRequest(control, 'status') as { cache: { counters: { readHitBytes: number } } };
    return status.cache.counters.readHitBytes / (blocks.length * blockBytes);
  } finally {
    await stopChild(server);
    removeScratch(dir);
  }
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
    if (!cutoffOff && trace.name === nbdTrace) {
      const nbd = await nbdHitRatio(trace);
      report({ bench: 'policy', metric: `${name} hit ratio through NBD vs best`, value: nbd, unit: 'hits/read', peer: best.name, peerValue: best.ratio });
      console.log(`  ${name} through pcache serve over NBD: ${nbd.toFixed(3)} (the engine: ${engine.ratio.toFixed(3)}; FIFO ${fifo?.ratio.toFixed(3) ?? '?'})`);
    }
  }
}

await main();
