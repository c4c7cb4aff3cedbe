// Caches with history, for the crash suites to start from (the harness's `base` option).
//
// A freshly formatted cache never wraps its log within the few operations an exhaustive
// workload has, and a randomized run of a few hundred operations barely moves a 1 MiB log
// segment. These bases are built fast, without crash points, by driving the engine directly
// on simulated devices (tens of thousands of 512-byte writes in about a second), so that the
// workloads run where the bugs were hiding:
// - `log-end`: the log's head a few bytes short of its segment's end, so the next commit of
//   any size writes a LAST kset and takes a new log segment (its generation written and
//   synced first); the last ksets' keys still live in the data head's segment;
// - `stranded`: the state a crash left during that commit: the new segment's generation and
//   its first kset (sixteen keys, two sectors) durable, the LAST kset pointing at it lost, and
//   so is the mirror of that generation into its second copy (the copies differ: the newest
//   and the one before). The next commit takes a segment again — the log wraps across a
//   recovery into a segment that holds a kset of this log with the very seq it expects next,
//   whose keys point at data that is still there, and rewrites a generation whose copies
//   differ;
// - `divergent-tails`: two writeback rounds on, with the crash losing the second copy (the
//   mirror) of the last dirty_tail update: the two copies on disk differ, as they do in the
//   window between an update and its mirror.
// - `log-full`: every segment in use — three log segments and one of data — and the log's
//   head at its segment's end, everything written back, and key_tail still at the LAST kset
//   of the oldest log segment (no GC since the log left it). The next commit finds no free
//   segment, waits, and GC's first round frees that oldest segment, which the commit then
//   takes at once: a segment reused while a key_tail pointing into it may not be durable yet
//   (GC must persist key_tail before it frees). The log segments after it hold ZERO keys
//   (trims), so nothing but the log needs space; the data keys that keep the fourth segment
//   in use lie beyond the reach of GC's first round.
// Every payload a base writes has an id from setupPayloadIdFirst on, so the workloads' ids
// (1, 2, ... ) never collide with them; the harness reads what the base serves after
// recovery and takes it as the oracle's initial contents.
import assert from 'node:assert/strict';
import type { Cache } from '../../../src/cache/cache.js';
import { formatVersionLatest, layoutFor, segmentDataOffsetBytes, segmentDataSizeBytes, segmentOffsetBytes, segmentsOffsetBytes } from '../../../src/ondisk/layout.js';
import { ksetExtendedHeaderBytes, keyBytes, ksetKeysMax } from '../../../src/ondisk/kset.js';
import { gcKsetsPerRoundMax } from '../../../src/cache/cache_gc.js';
import { sectorSizeBytes } from '../../../src/lib/units.js';
import { crashState, materialize, prefixState } from '../../../sim/crash_states.js';
import type { CrashPoint } from '../../../sim/device_model.js';
import type { BaseSpec, SystemImages } from '../../../sim/harness.js';
import { fillPayload } from '../../../sim/oracle.js';
import { SimDevice } from '../../../sim/sim_device.js';
import { crashSegmentBytes, openCache, type CacheTargetOptions } from './cache_target.js';

/** Payload ids of what bases write: far above any workload's. */
export const setupPayloadIdFirst = 100_000;

export type BaseName = 'log-end' | 'stranded' | 'divergent-tails' | 'log-full';
export const baseNames: readonly BaseName[] = ['log-end', 'stranded', 'divergent-tails', 'log-full'];

export interface BaseShape {
  readonly cacheSizeBytes: number;
  readonly backingSizeBytes: number;
  /** Sectors the workloads write ([0, this)); bases write elsewhere where they can. */
  readonly workloadSectors: number;
}

const dataSizeBytes = segmentDataSizeBytes(crashSegmentBytes);
/** A kset of one key and the header after it: the smallest commit. */
const smallestCommitBytes = 2 * ksetExtendedHeaderBytes + keyBytes;

/** The engine on two simulated devices, driven directly: writes of one sector, flushes, rounds. */
class Setup {
  private nextId = setupPayloadIdFirst;
  private nextSector: number;

  private constructor(
    public cacheDevice: SimDevice,
    public backingDevice: SimDevice,
    public cache: Cache,
    private readonly shape: BaseShape,
    private readonly options: CacheTargetOptions,
  ) {
    this.nextSector = shape.workloadSectors;
  }

  static async start(shape: BaseShape, options: CacheTargetOptions): Promise<Setup> {
    const cacheDevice = SimDevice.blank(shape.cacheSizeBytes, { name: 'cache' });
    const backingDevice = SimDevice.blank(shape.backingSizeBytes, { name: 'backing' });
    return new Setup(cacheDevice, backingDevice, await openCache(cacheDevice, backingDevice, options), shape, options);
  }

  /** A clean close and a recovery on what it left: the data head is gone, unreferenced data segments are free again. */
  async reopen(): Promise<void> {
    const images = await this.closed();
    this.cacheDevice = new SimDevice(images.cache.fork(), { name: 'cache' });
    this.backingDevice = new SimDevice(images.backing.fork(), { name: 'backing' });
    this.cache = await openCache(this.cacheDevice, this.backingDevice, this.options);
  }

  /** The sector the next setup write goes to: cycling over the sectors the workloads leave alone. */
  private sector(): number {
    const sectors = this.shape.backingSizeBytes / sectorSizeBytes;
    const sector = this.nextSector;
    this.nextSector = sector + 1 >= sectors ? this.shape.workloadSectors : sector + 1;
    return sector;
  }

  async write(sector = this.sector()): Promise<void> {
    const data = new Uint8Array(sectorSizeBytes);
    fillPayload(data, sector * sectorSizeBytes, this.nextId);
    this.nextId += 1;
    await this.cache.write(data, sector * sectorSizeBytes);
  }

  /** A trim of one sector: a ZERO key, which needs no data space. */
  async trim(sector = this.sector()): Promise<void> {
    await this.cache.trim(sector * sectorSizeBytes, sectorSizeBytes, { fua: false });
  }

  /**
   * `keys` one-sector writes (or trims), a flush (one kset of `keys` keys), a writeback round,
   * and a GC round if asked.
   */
  async epoch(keys: number, gc: boolean, kind: 'write' | 'trim' = 'write'): Promise<void> {
    for (let key = 0; key < keys; key += 1) await (kind === 'write' ? this.write() : this.trim());
    await this.cache.flush();
    await this.cache.writebackStep();
    if (gc) await this.cache.gcStep();
  }

  keyHead(): { segment: number; offsetBytes: number } {
    const [segment, offset] = this.cache.status().keyHead.split(':').map(Number);
    assert.ok(segment !== undefined && offset !== undefined);
    return { segment, offsetBytes: offset };
  }

  /**
   * Commits ksets (each followed by a writeback and a GC round) until the log's head is so
   * close to its segment's end that only a kset of one key fits, then that kset, with a
   * writeback round but no GC: no kset of any size fits after it, and replay has one kset to
   * read (its key points into the data head's segment, which stays live). The ksets hold
   * writes and each is followed by a GC round unless `options` say trims (ZERO keys, no data
   * space needed) and no GC, as the full-cache base fills its later log segments.
   */
  async fillLogToEnd(options: { kind: 'write' | 'trim'; gc: boolean } = { kind: 'write', gc: true }): Promise<void> {
    const startSegment = this.keyHead().segment;
    // One key in a kset, the header after it, and up to a key's worth of slack.
    const lastKset = smallestCommitBytes;
    for (;;) {
      const remaining = dataSizeBytes - this.keyHead().offsetBytes;
      if (remaining < lastKset + keyBytes) break;
      // Full ksets while far from the end; then exactly the size that leaves room for the last one.
      const fitting = Math.floor((remaining - lastKset - ksetExtendedHeaderBytes) / keyBytes);
      await this.epoch(Math.max(1, Math.min(ksetKeysMax, fitting)), options.gc, options.kind);
    }
    await this.epoch(1, false, options.kind);
    const remaining = dataSizeBytes - this.keyHead().offsetBytes;
    assert.equal(this.keyHead().segment, startSegment, 'the log stayed in its segment');
    assert.ok(remaining >= ksetExtendedHeaderBytes && remaining < smallestCommitBytes, `${remaining} bytes left: no kset fits any more`);
  }

  /** Both devices as a clean shutdown leaves them. */
  async closed(): Promise<SystemImages> {
    await this.cache.close();
    this.cacheDevice.settle();
    this.backingDevice.settle();
    return { cache: this.cacheDevice.durableImage(), backing: this.backingDevice.durableImage() };
  }

  /** Both devices' crash points after every cache write `action` makes, with that write. */
  async recordCacheWrites(action: () => Promise<void>): Promise<{ offsetBytes: number; cache: CrashPoint; backing: CrashPoint }[]> {
    const points: { offsetBytes: number; cache: CrashPoint; backing: CrashPoint }[] = [];
    const stop = this.cacheDevice.events.listen((event) => {
      if (event.device !== 'cache' || event.kind !== 'write' || event.phase !== 'complete') return;
      points.push({ offsetBytes: event.offsetBytes, cache: this.cacheDevice.crashPoint(), backing: this.backingDevice.crashPoint() });
    });
    try {
      await action();
    } finally {
      stop();
    }
    return points;
  }
}

function dataOffset(segment: number, offsetBytes: number): number {
  return segmentOffsetBytes(segment, crashSegmentBytes) + segmentDataOffsetBytes + offsetBytes;
}

async function logEnd(shape: BaseShape, options: CacheTargetOptions): Promise<Setup> {
  const setup = await Setup.start(shape, options);
  await setup.fillLogToEnd();
  return setup;
}

/** Every segment in use, the log at its end and key_tail at the oldest log segment's LAST kset (see the file's opening). */
async function logFull(shape: BaseShape, options: CacheTargetOptions): Promise<SystemImages> {
  const setup = await logEnd(shape, options);
  const oldest = setup.keyHead().segment;
  await setup.cache.gcStep(); // key_tail to the end of the oldest log segment, where its LAST kset will go
  await setup.reopen(); // the data head and the data behind key_tail released: only the log is in use
  assert.equal(setup.cache.status().segsUsed, 1, 'only the oldest log segment is in use');
  // Beyond what GC's first round passes (the LAST kset and the ksets after it, gcKsetsPerRoundMax
  // in all), a few data keys: they keep a data segment in use, taken while two were free.
  for (let kset = 0; kset < gcKsetsPerRoundMax; kset += 1) await setup.epoch(ksetKeysMax, false, 'trim');
  await setup.epoch(4, false, 'write');
  const second = setup.keyHead().segment;
  while (setup.keyHead().segment === second) await setup.epoch(ksetKeysMax, false, 'trim');
  await setup.fillLogToEnd({ kind: 'trim', gc: false });
  while (await setup.cache.writebackStep());
  const status = setup.cache.status();
  assert.equal(status.segsUsed, status.segTotal, 'every segment is in use');
  assert.equal(Number(status.keyTail.split(':')[0]), oldest, 'key_tail is still in the oldest log segment');
  assert.equal(status.dirtyTail, status.keyHead, 'everything is written back');
  return setup.closed();
}

/** The state a crash leaves when it loses the LAST kset of a commit into a new segment but keeps the rest. */
async function stranded(shape: BaseShape, options: CacheTargetOptions): Promise<SystemImages> {
  const setup = await logEnd(shape, options);
  const head = setup.keyHead();
  const lastAt = dataOffset(head.segment, head.offsetBytes);
  const keys = 16; // two sectors of keys: a tear at the sector boundary leaves keys of each
  const points = await setup.recordCacheWrites(async () => {
    for (let key = 0; key < keys; key += 1) await setup.write();
    await setup.cache.flush();
  });
  // The first kset written at the start of a segment's data area: the commit into the new segment.
  const index = points.findIndex((point) => point.offsetBytes !== lastAt && (point.offsetBytes - dataOffset(0, 0)) % crashSegmentBytes === 0);
  const at = points[index];
  assert.ok(at !== undefined, 'the commit wrote a kset at the start of a new segment');
  const volatile = at.cache.volatile;
  const last = volatile.findIndex((write) => write.offsetBytes === lastAt);
  assert.ok(last >= 0 && volatile[volatile.length - 1]?.offsetBytes === at.offsetBytes, 'the LAST kset and the new kset are both unsynced');
  // The new segment's generation went to one copy and was synced; its mirror into the other copy is still volatile.
  const segment = Math.floor((at.offsetBytes - segmentsOffsetBytes) / crashSegmentBytes);
  const genCopies = layoutFor(formatVersionLatest).segmentGenOffsetsBytes.map((offset) => segmentOffsetBytes(segment, crashSegmentBytes) + offset);
  const mirror = volatile.findIndex((write) => genCopies.includes(write.offsetBytes));
  assert.ok(mirror >= 0, 'the mirror of the new segment\'s generation is unsynced');
  const lost = [last, mirror];
  const state = crashState(at.cache, volatile.map((_, i) => ({ index: i, sectorMask: undefined })).filter((choice) => !lost.includes(choice.index)), 'the LAST kset and a generation mirror lost');
  return {
    cache: materialize(state).durableImage(),
    backing: materialize(prefixState(at.backing, at.backing.volatile.length)).durableImage(),
  };
}

/**
 * Two writeback rounds, the second one's dirty_tail mirror lost: dirty_tail's copies on disk
 * hold the last two values.
 */
async function divergentTails(shape: BaseShape, options: CacheTargetOptions): Promise<SystemImages> {
  const setup = await Setup.start(shape, options);
  for (let round = 0; round < 3; round += 1) await setup.epoch(4, true);
  await setup.write();
  await setup.cache.flush();
  await setup.cache.writebackStep();
  // The round's dirty_tail went to one copy, was synced, and its mirror written (unsynced).
  assert.ok(setup.cacheDevice.volatileWriteCount > 0, 'the mirror of dirty_tail is pending');
  return { cache: setup.cacheDevice.durableImage(), backing: setup.backingDevice.durableImage() };
}

/** The base `name` for a target with `options` and a run of `shape`. */
export function agedBase(name: BaseName, shape: BaseShape, options: CacheTargetOptions): BaseSpec {
  switch (name) {
    case 'log-end':
      return { name, build: async () => (await logEnd(shape, options)).closed() };
    case 'stranded':
      return { name, build: () => stranded(shape, options) };
    case 'divergent-tails':
      return { name, build: () => divergentTails(shape, options) };
    case 'log-full':
      return { name, build: () => logFull(shape, options) };
  }
}
