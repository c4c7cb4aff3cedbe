// Engine throughput on in-memory devices: 4 KiB random writes and read hits at queue depth 1
// and 32, and 1 MiB sequential writes and reads.
//
// Peer: the same I/O pattern copied straight into and out of a MemoryDevice (no cache), in
// the same process: the floor the engine's own work (allocation, index, kset log, CRC, the
// promise per request) is measured against. Background writeback and GC run as in production.
import { Cache } from '../src/cache/cache.js';
import { MemoryDevice } from '../src/device/memory_device.js';
import { Prng } from '../sim/prng.js';
import { medianOf, param, report } from './harness.js';
import { cacheDeviceBytesFor } from '../src/ondisk/layout.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const segmentSizeBytes = 16 * MiB;
const cacheBytes = cacheDeviceBytesFor(param(8, 32), segmentSizeBytes);
const backingBytes = param(64, 1024) * MiB;
const hotBytes = param(16, 256) * MiB; // random I/O stays in a range that fits the cache
const opsPerRun = param(2000, 100_000);
const runs = param(1, 5);

async function openCache(dataCrc: boolean): Promise<Cache> {
  return Cache.open({
    cacheDevice: new MemoryDevice(cacheBytes),
    backingDevice: new MemoryDevice(backingBytes),
    formatIfBlank: { segmentSizeBytes, dataCrc },
  });
}

function offsets(count: number, blockBytes: number, rangeBytes: number, seed: number): Float64Array {
  const prng = new Prng(seed);
  const out = new Float64Array(count);
  for (let i = 0; i < count; i++) out[i] = prng.nextInt(rangeBytes / blockBytes) * blockBytes;
  return out;
}

type Op = (buffer: Uint8Array, offset: number) => Promise<void> | undefined | void;

/** Runs `op` over `where` with `depth` requests in flight; returns MiB/s. */
async function drive(op: Op, where: Float64Array, blockBytes: number, depth: number): Promise<number> {
  const buffers = Array.from({ length: depth }, () => Buffer.alloc(blockBytes, 0x5a));
  const start = performance.now();
  let next = 0;
  const lane = async (lane: number): Promise<void> => {
    const buffer = buffers[lane] ?? Buffer.alloc(blockBytes);
    while (next < where.length) {
      const offset = where[next++] ?? 0;
      const io = op(buffer, offset);
      if (io !== undefined) await io;
    }
  };
  await Promise.all(Array.from({ length: depth }, (_, i) => lane(i)));
  const seconds = (performance.now() - start) / 1000;
  return (where.length * blockBytes) / MiB / seconds;
}

async function compare(name: string, blockBytes: number, depth: number, kind: 'write' | 'read', dataCrc = false): Promise<void> {
  const sequential = blockBytes >= MiB;
  const count = sequential ? Math.max(16, Math.floor(opsPerRun / 64)) : opsPerRun;
  const where = sequential
    ? Float64Array.from({ length: count }, (_, i) => (i * blockBytes) % hotBytes)
    : offsets(count, blockBytes, hotBytes, 11);
  const cache = await openCache(dataCrc);
  // The sequential cutoff (on by default) would send sequential writes past the cache: off while
  // warming up, and for the sequential runs, which measure the cache's own path. The random
  // runs keep it on, so they pay for following the streams as a server does.
  const cutoffBytes = cache.tuning.sequentialCutoffBytes;
  cache.setTuning({ sequentialCutoffBytes: 0 });
  if (kind === 'read') {
    // Warm the cache so reads are hits.
    const fill = Buffer.alloc(MiB, 0x33);
    for (let offset = 0; offset < hotBytes; offset += MiB) await cache.write(fill, offset);
  }
  if (!sequential) cache.setTuning({ sequentialCutoffBytes: cutoffBytes });
  const engine = await medianOf(runs, () => drive(
    kind === 'write' ? (b, o) => cache.write(b, o) : (b, o) => cache.read(b, o), where, blockBytes, depth));
  await cache.close();
  const raw = new MemoryDevice(backingBytes);
  const peer = await medianOf(runs, () => drive(
    kind === 'write' ? (b, o) => { raw.writeSync(b, o); } : (b, o) => { raw.readSync(b, o); }, where, blockBytes, depth));
  report({ bench: 'engine', metric: name, value: engine, unit: 'MiB/s', peer: 'raw memory device', peerValue: peer });
}

await compare('4K random write QD1', 4 * KiB, 1, 'write');
await compare('4K random write QD32', 4 * KiB, 32, 'write');
await compare('4K random read hit QD1', 4 * KiB, 1, 'read');
await compare('4K random read hit QD32', 4 * KiB, 32, 'read');
await compare('4K random read hit QD32 data CRC', 4 * KiB, 32, 'read', true);
await compare('1M sequential write QD1', MiB, 1, 'write');
await compare('1M sequential read hit QD1', MiB, 1, 'read');
