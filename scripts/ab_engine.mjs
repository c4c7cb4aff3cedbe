// A/B of the engine's 4 KiB hot paths between two built trees, alternating in one process, so a
// change can be checked for slowdowns on a noisy machine: 4 KiB random read hits at QD1 and QD32,
// and 4 KiB random writes at QD32, on memory devices (a 512 MiB cache of 16 MiB segments over a
// 1 GiB backing device, 256 MiB range read through first). Prints each build's median MiB/s and
// the median of the per-pair ratios (new / base); a pair runs base and new back to back, in an
// order that alternates. Both caches are drained before the runs and after every write run, so
// neither build's writeback runs during the other's turn.
// Usage: node scripts/ab_engine.mjs BASE_TREE NEW_TREE   (each with dist/ built; e.g. a
// `git archive` of main extracted and built beside this tree). PAIRS (default 30) and OPS
// (requests per run, default 50,000) from the environment.
import { Buffer } from 'node:buffer';
import { performance } from 'node:perf_hooks';

const [baseDir, newDir] = process.argv.slice(2);
if (baseDir === undefined || newDir === undefined) {
  console.error('usage: node scripts/ab_engine.mjs BASE_TREE NEW_TREE');
  process.exit(2);
}
const pairs = Number(process.env.PAIRS ?? 30);
const ops = Number(process.env.OPS ?? 50_000);
const MiB = 1024 * 1024;
const KiB = 1024;
const hotBytes = 256 * MiB;

async function load(dir) {
  const { Cache } = await import(`${dir}/dist/src/cache/cache.js`);
  const { MemoryDevice } = await import(`${dir}/dist/src/device/memory_device.js`);
  const { cacheDeviceBytesFor } = await import(`${dir}/dist/src/ondisk/layout.js`);
  const cache = await Cache.open({
    cacheDevice: new MemoryDevice(cacheDeviceBytesFor(32, 16 * MiB)),
    backingDevice: new MemoryDevice(1024 * MiB),
    formatIfBlank: { segmentSizeBytes: 16 * MiB },
  });
  cache.setTuning({ sequentialCutoffBytes: 0 });
  const fill = Buffer.alloc(MiB, 0x33);
  for (let offset = 0; offset < hotBytes; offset += MiB) await cache.write(fill, offset);
  cache.setTuning({ sequentialCutoffBytes: 4 * MiB });
  // Written back now, so one build's background writeback never runs during the other's turn.
  await cache.drain();
  return cache;
}

let seed = 11;
const next = () => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed; };
const where = Float64Array.from({ length: ops }, () => (next() % (hotBytes / (4 * KiB))) * 4 * KiB);

async function drive(cache, kind, depth) {
  const buffers = Array.from({ length: depth }, () => Buffer.alloc(4 * KiB, 0x5a));
  let at = 0;
  const start = performance.now();
  await Promise.all(buffers.map(async (buffer) => {
    while (at < ops) {
      const offset = where[at++];
      const io = kind === 'read' ? cache.read(buffer, offset) : cache.write(buffer, offset);
      if (io !== undefined) await io;
    }
  }));
  return (ops * 4) / 1024 / ((performance.now() - start) / 1000);
}

const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
};

const caches = { base: await load(baseDir), new: await load(newDir) };
for (const [kind, depth] of [['read', 1], ['read', 32], ['write', 32]]) {
  const results = { base: [], new: [] };
  const ratios = [];
  for (const cache of Object.values(caches)) await drive(cache, kind, depth);
  for (let i = 0; i < pairs; i++) {
    const pair = {};
    for (const name of i % 2 === 0 ? ['base', 'new'] : ['new', 'base']) {
      pair[name] = await drive(caches[name], kind, depth);
      results[name].push(pair[name]);
      if (kind === 'write') await caches[name].drain(); // outside the timing, as above
    }
    ratios.push(pair.new / pair.base);
  }
  console.log(`4K ${kind} QD${depth}: base ${median(results.base).toFixed(0)} MiB/s, new ${median(results.new).toFixed(0)} MiB/s, ` +
    `median of pair ratios ${median(ratios).toFixed(3)} (pairs ${Math.min(...ratios).toFixed(2)}-${Math.max(...ratios).toFixed(2)})`);
}
for (const cache of Object.values(caches)) await cache.close();
