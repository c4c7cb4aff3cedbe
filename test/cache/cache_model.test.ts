// A seeded randomized model test of the whole engine on in-memory devices.
//
// Thousands of random steps — reads, writes, FUA writes, flushes, trims, write-zeroes, several
// requests in flight at once, clean close and reopen, flush + unclean stop + reopen, drain,
// writeback and GC running in the background, the kset timer firing — on a cache of 1 MiB
// segments with a working set several times its size. Every read is compared with a plain
// byte array; after every drain the backing device must equal it too, and after every reopen
// the structural checker must find nothing wrong.
//
// A failure prints its seed. Replay one seed with PCACHE_SEED=<seed>; PCACHE_STEPS sets the
// number of steps; PCACHE_TRACE=1 prints every step (to find where a hang starts).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/device/memory_device.js';
import { Cache, cacheModes, eagerWriteback, type CacheMode } from '../../src/cache/cache.js';
import { ManualTimers } from '../../src/lib/timers.js';
import { MiB } from '../../src/lib/units.js';
import { Prng } from '../../sim/prng.js';
import { cacheBytesFor, pattern, ThreadedMemoryDevice } from '../helpers/cache_fixture.js';

const S = 512;
const segments = 12;
const backingBytes = 40 * MiB; // the cache holds about 12 MiB: the working set is 3x larger

interface Config {
  seed: number;
  steps: number;
  dataCrc: boolean;
  /** Also switch write modes at random, with a small sequential cutoff, sequential runs and several clients. */
  modes?: boolean;
  /** fragmented_read_pieces for every open (default: the engine's), so large reads of written-back data are gathered from the backing device. */
  gatherPieces?: number;
  /** fragmented_rewrite_pieces for every open (default: the engine's), so reads of dirty pieces are stored again as one. */
  rewritePieces?: number;
  /**
   * fragmented_thread_pieces for every open, on a cache device with a thread for reads (whose
   * batches complete on a later turn) and reads into shared memory: large reads' pieces read later.
   */
  threadPieces?: number;
}

/** What the engine is doing, for a step that does not finish (PCACHE_TRACE=1). */
function stallReport(cache: Cache): unknown {
  const core = cache.internals;
  return {
    segmentsUsed: core.ctx.segments.usedCount, segmentsFree: core.ctx.segments.freeCount, kinds: Array.from(core.ctx.segments.kind), refs: Array.from(core.ctx.segments.refs),
    head: core.head.segment, keyTail: core.ctx.keyTail, dirtyTail: core.ctx.dirtyTail, durableHead: core.log.durableHead, keyHead: core.log.keyHead,
    openKeys: core.log.openKeyCount, pendingKsets: core.log.pendingKsetCount, writebackActive: core.writeback.active, writebackDue: core.writeback.due,
    gcActive: core.gc.active, gcDue: core.gc.due, dirtyBytes: core.ctx.stats.dirtyBytes, failure: core.ctx.failure?.message,
    log: (({ durableWaiters, nextSeq, writtenSeq, durableSeq, sealed }) => ({ durableWaiters, nextSeq, writtenSeq, durableSeq, sealed: sealed.length }))(core.log as unknown as { durableWaiters: unknown[]; nextSeq: number; writtenSeq: number; durableSeq: number; sealed: unknown[] }),
    group: (({ pieces, writes, scheduled }) => ({ pieces: pieces.length, writes: writes.length, scheduled }))(core.writes.group as unknown as { pieces: unknown[]; writes: unknown[]; scheduled: boolean }),
  };
}

interface Totals {
  reads: number;
  writes: number;
  drains: number;
  reopens: number;
  gcSegments: number;
  switches: number;
  bypassMode: number;
  bypassCutoff: number;
  fallbacks: number;
  gathers: number;
  rewrites: number;
  threadBatches: number;
}

async function runModel(config: Config): Promise<Totals> {
  const prng = new Prng(config.seed);
  const model = Buffer.alloc(backingBytes);
  const cacheDevice = config.threadPieces !== undefined ? new ThreadedMemoryDevice(cacheBytesFor(segments)) : new MemoryDevice(cacheBytesFor(segments));
  const backingDevice = new MemoryDevice(backingBytes);
  const timers = new ManualTimers();
  // Half the seeds write back as soon as anything is dirty, half use the default policy.
  // (Rewrites need dirty data below writeback_stop_percent, which eager writeback's 0 never allows.)
  const tuning = prng.chance(0.5) && config.rewritePieces === undefined ? eagerWriteback : {};
  const openCache = (): Promise<Cache> => Cache.open({
    tuning,
    cacheDevice,
    backingDevice,
    formatIfBlank: { segmentSizeBytes: MiB, dataCrc: config.dataCrc, gcPercent: prng.pick([0, 50, 70, 90]), cacheUuid: new Uint8Array(16).fill(3), formatTimeMs: 0 },
    background: true,
    timers,
  });
  // Opens the cache and applies the configured fragmented-read setting (settings last until a stop).
  const open = async (): Promise<Cache> => {
    const opened = await openCache();
    if (config.gatherPieces !== undefined) opened.setTuning({ fragmentedReadPieces: config.gatherPieces });
    if (config.rewritePieces !== undefined) opened.setTuning({ fragmentedRewritePieces: config.rewritePieces });
    if (config.threadPieces !== undefined) opened.setTuning({ fragmentedThreadPieces: config.threadPieces });
    return opened;
  };
  let cache = await open();
  let mode: CacheMode = 'writeback';
  const cutoffs = [0, 16 * 1024, 256 * 1024];
  if (config.modes === true) cache.setTuning({ sequentialCutoffBytes: prng.pick(cutoffs) });
  let tag = 1;
  const totals = { reads: 0, writes: 0, drains: 0, reopens: 0, gcSegments: 0, switches: 0, bypassMode: 0, bypassCutoff: 0, fallbacks: 0, gathers: 0, rewrites: 0, threadBatches: 0 };
  // The engine's counters start again at every open: add them up before each stop.
  const noteCounters = (): void => {
    const counters = cache.status().counters;
    totals.bypassMode += counters.bypassModeRequests;
    totals.bypassCutoff += counters.bypassCutoffRequests;
    totals.fallbacks += counters.bypassFallbacks;
    totals.gathers += counters.readGathers;
    totals.rewrites += counters.fragmentRewrites;
    totals.threadBatches += counters.threadReadBatches;
  };

  const randomExtent = (maxSectors: number): { offset: number; length: number } => {
    const big = prng.chance(0.05);
    const sectors = 1 + prng.nextInt(big ? 4 * maxSectors : maxSectors);
    // Cluster most I/O in a hot region so reads hit, but touch the whole device.
    const region = prng.chance(0.7) ? 8 * MiB : backingBytes;
    const start = prng.nextInt(Math.max(1, region / S - sectors)) * S;
    return { offset: start, length: Math.min(sectors * S, backingBytes - start) };
  };
  const overlaps = (a: { offset: number; length: number }, b: { offset: number; length: number }): boolean =>
    a.offset < b.offset + b.length && b.offset < a.offset + a.length;

  const verifyAll = async (what: string): Promise<void> => {
    const chunk = Buffer.alloc(4 * MiB);
    for (let offset = 0; offset < backingBytes; offset += chunk.length) {
      await cache.read(chunk, offset);
      const expected = model.subarray(offset, offset + chunk.length);
      if (!chunk.equals(expected)) {
        const at = chunk.findIndex((byte, i) => byte !== expected[i]);
        assert.fail(`${what}: byte ${offset + at} differs (cache ${chunk[at]}, model ${expected[at]})`);
      }
    }
  };
  const checkStructure = async (what: string): Promise<void> => {
    const problems = await cache.check();
    assert.deepEqual(problems, [], `${what}: structural check`);
  };

  const recentReads: { offset: number; length: number }[] = [];
  for (let step = 0; step < config.steps; step++) {
    const roll = prng.nextInt(1000);
    const where = `seed ${config.seed} step ${step}`;
    const watchdog = process.env.PCACHE_TRACE === '1' ? setTimeout(() => { console.error(`${where} stalled:`, stallReport(cache)); }, 5000) : undefined;
    if (process.env.PCACHE_TRACE === '1') console.error(`${where} roll ${roll} ${JSON.stringify(cache.status().counters).slice(0, 0)}segs used ${cache.status().segsUsed} dirty ${cache.status().dirtyBytes} kt ${cache.status().keyTail} dt ${cache.status().dirtyTail} kh ${cache.status().keyHead} gc% ${cache.status().gcPercent} wb ${String(cache.status().writeback.active)} ${cache.status().writeback.lastError ?? ""} gc ${String(cache.status().gc.active)} ${cache.status().gc.lastError ?? ""}`);
    if (roll < 900) {
      // A batch of requests in flight at once; they never overlap each other, so the model stays exact.
      const batch: { kind: string; offset: number; length: number; client: number; data?: Buffer; fua?: boolean }[] = [];
      const count = 1 + prng.nextInt(6);
      // With modes: now and then a sequential run (each request starts where the last ended), for the cutoff.
      const sequential = config.modes === true && prng.chance(0.15);
      for (let i = 0; i < count; i++) {
        const previous = batch[batch.length - 1];
        let extent = randomExtent(prng.chance(0.5) ? 8 : 256);
        if (sequential && previous !== undefined && previous.offset + previous.length + extent.length <= backingBytes) extent = { offset: previous.offset + previous.length, length: extent.length };
        if (batch.some((other) => overlaps(other, extent))) continue;
        const kindRoll = prng.nextInt(100);
        const kind = kindRoll < 45 ? 'read' : kindRoll < 85 ? 'write' : kindRoll < 93 ? 'zero' : 'trim';
        // Rewrites need a read to come again at an offset: then half the reads repeat a recent one.
        if (kind === 'read' && config.rewritePieces !== undefined) {
          const again = recentReads.length > 0 && prng.chance(0.5) ? prng.pick(recentReads) : undefined;
          if (again !== undefined && !batch.some((other) => overlaps(other, again))) extent = again;
          recentReads.push(extent);
          if (recentReads.length > 16) recentReads.shift();
        }
        const client = config.modes === true ? prng.nextInt(3) : 0;
        batch.push({ kind, ...extent, client, fua: prng.chance(0.1), ...(kind === 'write' ? { data: pattern(tag++, extent.offset, extent.length) } : {}) });
      }
      // With modes: now and then a switch in the middle of the batch, its requests in flight around it.
      const switchTo = config.modes === true && prng.chance(0.08) ? prng.pick(cacheModes) : undefined;
      let switching: Promise<void> | undefined;
      const results = batch.map((request, index) => {
        if (switchTo !== undefined && index === Math.floor(batch.length / 2)) {
          switching = cache.setMode(switchTo);
          mode = switchTo;
          totals.switches++;
        }
        switch (request.kind) {
          case 'read': {
            const out = config.threadPieces !== undefined ? Buffer.from(new SharedArrayBuffer(request.length)) : Buffer.alloc(request.length);
            return Promise.resolve(cache.read(out, request.offset, request.client)).then(() => out);
          }
          case 'write':
            return cache.write(request.data ?? Buffer.alloc(0), request.offset, { fua: request.fua === true }, request.client).then(() => undefined);
          case 'zero':
            return cache.writeZeroes(request.offset, request.length, { fua: request.fua === true }).then(() => undefined);
          default:
            return cache.trim(request.offset, request.length, { fua: request.fua === true }).then(() => undefined);
        }
      });
      const outcomes = await Promise.all(results);
      if (switching !== undefined) await switching;
      batch.forEach((request, i) => {
        const expected = model.subarray(request.offset, request.offset + request.length);
        if (request.kind === 'read') {
          totals.reads++;
          const out = outcomes[i];
          assert.ok(out !== undefined);
          if (!out.equals(expected)) {
            const at = out.findIndex((byte, j) => byte !== expected[j]);
            assert.fail(`${where}: read ${request.offset}+${request.length} differs at byte ${request.offset + at}`);
          }
        } else if (request.kind === 'write') {
          totals.writes++;
          expected.set(request.data ?? Buffer.alloc(0));
        } else {
          expected.fill(0);
        }
      });
    } else if (roll < 930) {
      await cache.flush();
    } else if (roll < 950) {
      timers.advance(1100); // the open kset's timer fires
    } else if (roll < 965) {
      await cache.drain();
      totals.drains++;
      // The backing device alone now holds everything.
      if (!Buffer.from(backingDevice.bytes.buffer).equals(model)) {
        const at = backingDevice.bytes.findIndex((byte, i) => byte !== model[i]);
        assert.fail(`${where}: after drain the backing device differs from the model at byte ${at}`);
      }
    } else if (roll < 980) {
      totals.gcSegments = cache.status().counters.gcSegmentsFreed;
      await checkStructure(`${where} before close`); // the running cache agrees with its device
      noteCounters();
      await cache.close();
      cache = await open();
      totals.reopens++;
      assert.equal(cache.mode, mode, `${where}: the mode survives a restart`);
      if (config.modes === true) cache.setTuning({ sequentialCutoffBytes: prng.pick(cutoffs) });
      await checkStructure(`${where} after clean reopen`);
      await verifyAll(`${where} after clean reopen`);
    } else if (roll < 990) {
      // Unclean stop: everything flushed must be there after recovery.
      await cache.flush();
      noteCounters();
      cache.abandon();
      cache = await open();
      totals.reopens++;
      assert.equal(cache.mode, mode, `${where}: the mode survives a crash`);
      if (config.modes === true) cache.setTuning({ sequentialCutoffBytes: prng.pick(cutoffs) });
      await checkStructure(`${where} after unclean stop`);
      await verifyAll(`${where} after unclean stop`);
    } else if (config.modes === true && roll < 996) {
      // A switch, with requests of the last batch possibly still being written back or drained.
      mode = prng.pick(cacheModes);
      await cache.setMode(mode);
      totals.switches++;
    } else {
      await cache.internals.writeback.idle();
      await cache.internals.gc.idle();
    }
    clearTimeout(watchdog);
  }
  totals.gcSegments = Math.max(totals.gcSegments, cache.status().counters.gcSegmentsFreed);
  await cache.drain();
  await checkStructure(`seed ${config.seed} at the end`);
  assert.ok(Buffer.from(backingDevice.bytes.buffer).equals(model), `seed ${config.seed}: backing device differs after the final drain`);
  noteCounters();
  await cache.close();
  return totals;
}

describe('engine model test', () => {
  const fixedSeed = process.env.PCACHE_SEED;
  const steps = Number(process.env.PCACHE_STEPS ?? 2500);
  const seeds = fixedSeed !== undefined ? [Number(fixedSeed)] : [1, 2, 3];
  for (const seed of seeds) {
    for (const dataCrc of [false, true]) {
      if (dataCrc && seed > 2) continue;
      it(`seed ${seed}${dataCrc ? ' with data CRC' : ''}: ${steps} random steps match the model`, async () => {
        try {
          const totals = await runModel({ seed, steps, dataCrc });
          assert.ok(totals.reads > steps / 2, 'the workload reads');
          assert.ok(totals.writes > steps / 2, 'the workload writes');
          assert.ok(totals.gcSegments > 0, 'the working set is large enough to make GC free segments');
        } catch (error) {
          console.error(`model test failed: replay with PCACHE_SEED=${seed} node --test dist/test/cache/cache_model.test.js`);
          throw error;
        }
      });
    }
  }
  // Write modes switched at random (every mode and every switch, with dirty data and requests
  // in flight), the sequential cutoff, sequential runs and several clients.
  const modeSeeds = fixedSeed !== undefined ? [Number(fixedSeed)] : [11, 12];
  for (const seed of modeSeeds) {
    for (const dataCrc of [false, true]) {
      if (dataCrc && seed !== modeSeeds[0]) continue;
      it(`seed ${seed}${dataCrc ? ' with data CRC' : ''}, switching write modes: ${steps} random steps match the model`, async () => {
        try {
          const totals = await runModel({ seed, steps, dataCrc, modes: true });
          assert.ok(totals.switches > 5, 'the workload switches modes');
          assert.ok(totals.bypassMode > 50 && totals.bypassCutoff > 5 && totals.fallbacks > 0, `direct writes, the cutoff and fallbacks all happen: ${JSON.stringify(totals)}`);
          assert.ok(totals.reads > steps / 2 && totals.writes > steps / 2);
        } catch (error) {
          console.error(`model test failed: replay with PCACHE_SEED=${seed} node --test dist/test/cache/cache_model.test.js`);
          throw error;
        }
      });
    }
  }
  // Reads of dirty data stored again as one piece whenever a read with a dirty piece comes a
  // second time at an offset (fragmented_rewrite_pieces=1: this workload's reads seldom cover two
  // dirty pieces), with several requests in flight, writeback, GC, reopens and unclean stops
  // going on.
  const rewriteSeeds = fixedSeed !== undefined ? [Number(fixedSeed)] : [31, 36];
  for (const seed of rewriteSeeds) {
    it(`seed ${seed}, rewriting fragmented reads: ${steps} random steps match the model`, async () => {
      try {
        const totals = await runModel({ seed, steps, dataCrc: seed % 2 === 0, rewritePieces: 1 });
        assert.ok(totals.rewrites > 10, `reads are rewritten: ${JSON.stringify(totals)}`);
        assert.ok(totals.reads > steps / 2 && totals.writes > steps / 2);
      } catch (error) {
        console.error(`model test failed: replay with PCACHE_SEED=${seed} node --test dist/test/cache/cache_model.test.js`);
        throw error;
      }
    });
  }
  // Large reads' pieces read in one batch on the cache device's thread (fragmented_thread_pieces=1),
  // completing on a later turn, while writes, trims, writeback, GC, reopens and unclean stops go
  // on: a piece whose segment was freed meanwhile must come from the backing device.
  const threadSeeds = fixedSeed !== undefined ? [Number(fixedSeed)] : [41, 42];
  for (const seed of threadSeeds) {
    it(`seed ${seed}, reading pieces on the cache device's thread: ${steps} random steps match the model`, async () => {
      try {
        const totals = await runModel({ seed, steps, dataCrc: false, threadPieces: 1 });
        assert.ok(totals.threadBatches > 20, `pieces are read on the thread: ${JSON.stringify(totals)}`);
        assert.ok(totals.reads > steps / 2 && totals.writes > steps / 2);
      } catch (error) {
        console.error(`model test failed: replay with PCACHE_SEED=${seed} node --test dist/test/cache/cache_model.test.js`);
        throw error;
      }
    });
  }
  // Fragmented reads gathered from the backing device whenever a large read is cached in full and
  // at least one piece of it is written back (fragmented_read_pieces=1), the rest copied over it,
  // with writeback, GC and writes to other ranges going on.
  const gatherSeeds = fixedSeed !== undefined ? [Number(fixedSeed)] : [21, 22];
  for (const seed of gatherSeeds) {
    it(`seed ${seed}, gathering fragmented reads: ${steps} random steps match the model`, async () => {
      try {
        const totals = await runModel({ seed, steps, dataCrc: false, gatherPieces: 1 });
        assert.ok(totals.gathers > 20, `reads are gathered: ${JSON.stringify(totals)}`);
        assert.ok(totals.reads > steps / 2 && totals.writes > steps / 2);
      } catch (error) {
        console.error(`model test failed: replay with PCACHE_SEED=${seed} node --test dist/test/cache/cache_model.test.js`);
        throw error;
      }
    });
  }
});
