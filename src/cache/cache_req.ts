// Request paths: write, read, write-zeroes/trim, prefetch and block status.
//
// Write: cut at 4 MiB subtree boundaries and at segment ends; copy the data into the cache
// device at the data head; insert the key into the index (newer wins) and append it to the
// open kset, in one synchronous step so the log's order is the index's order. FUA waits for
// the key's kset to be durable. Nothing touches the backing device.
// Read: walk the index over the request; hits are copied from the cache device (generation
// checked first, data CRC verified when enabled); misses are read from the backing device,
// and the first miss of a range leaves an EMPTY placeholder in the index. When the miss
// completes and its placeholder is still there, the data is stored in the cache as a CLEAN
// key; a write that landed meanwhile has cut or replaced the placeholder and wins.
// Every await is a point where the index may change; code after one re-checks what it needs.

import { assert } from '../lib/assert.js';
import { crc32c } from '../lib/crc32c.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { SerialSection } from '../lib/background_task.js';
import { sectorSizeBytes } from '../lib/units.js';
import { keyFlagClean, keyFlagEmpty, keyFlagZero, type KeyRecord } from '../ondisk/kset.js';
import { subtreeSizeBytes } from '../ondisk/layout.js';
import type { CacheCore } from './cache_core.js';
import { segmentKindData } from './cache_segment.js';
import { isDataKey, keyFromRecord, newIndexKey, type IndexKey, type Subtree } from './cache_tree.js';

/** Space for one key's data, with a reference on its segment taken for the key. */
interface Space {
  readonly segment: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly gen: number;
}

/**
 * The data head: the segment new data is written into. Allocation never crosses the end of a
 * segment; a request larger than what is left gets what is left, and the rest goes to the
 * next segment. The head holds one reference on its segment while it fills it.
 */
export class DataHead {
  private readonly core: CacheCore;
  /** The segment being filled, or -1. */
  segment = -1;
  private offsetBytes = 0;
  /**
   * The generation write of the head segment, while it is in flight on an asynchronous
   * device. Keys pointing into the segment may be appended only after it completed, so that
   * the log's next sync covers it.
   */
  genWrite: Promise<void> | undefined;

  constructor(core: CacheCore) {
    this.core = core;
  }

  /**
   * Takes up to `maxBytes` of data space, or returns undefined when no segment is free (the
   * caller waits for space, or skips an optional fill). Writes the generation of a newly
   * taken segment before any data goes into it; see `genWrite`.
   */
  alloc(maxBytes: number): Space | undefined {
    const core = this.core;
    if (this.segment < 0 || this.offsetBytes === core.dev.dataSizeBytes) {
      const segment = core.segments.allocate(segmentKindData);
      if (segment === undefined) return undefined;
      core.segmentTaken();
      if (this.segment >= 0) core.segments.put(this.segment);
      this.segment = segment;
      this.offsetBytes = 0;
      core.segments.get(segment); // the head's own reference
      const io = core.dev.writeGen(segment, core.segments.gen[segment] ?? 0);
      if (io !== undefined) {
        const pending: Promise<void> = io.then(
          () => { if (this.genWrite === pending) this.genWrite = undefined; },
          (error: unknown) => { core.fail(error, 'writing a segment generation'); },
        );
        this.genWrite = pending;
      }
    }
    const lengthBytes = Math.min(maxBytes, core.dev.dataSizeBytes - this.offsetBytes);
    assert(lengthBytes > 0 && lengthBytes % sectorSizeBytes === 0, 'data allocation is not whole sectors');
    const space: Space = { segment: this.segment, offsetBytes: this.offsetBytes, lengthBytes, gen: core.segments.gen[this.segment] ?? 0 };
    this.offsetBytes += lengthBytes;
    core.segments.get(this.segment); // the key's reference
    return space;
  }

  /** Lets go of the head segment (shutdown); later allocations start a new one. */
  release(): void {
    if (this.segment >= 0) this.core.segments.put(this.segment);
    this.segment = -1;
  }
}

function subtreeEnd(offsetBytes: number): number {
  return Math.floor(offsetBytes / subtreeSizeBytes) * subtreeSizeBytes + subtreeSizeBytes;
}

function keyRecord(key: IndexKey): KeyRecord {
  return {
    offsetBytes: key.offsetBytes,
    lengthBytes: key.lengthBytes,
    flags: key.flags,
    segment: key.segment,
    segmentOffsetBytes: key.segmentOffsetBytes,
    gen: key.gen,
    dataCrc: key.crc,
  };
}

/** A piece of a write: space taken at the data head, its data, and the key to publish. */
interface GroupedPiece {
  readonly record: KeyRecord;
  readonly data: Uint8Array;
  readonly write: GroupedWrite;
}

/** A write request whose pieces wait in a write group. */
interface GroupedWrite {
  failure: unknown;
  /** The kset seq carrying its last published key (for FUA). */
  seq: number;
  resolve(): void;
  reject(error: unknown): void;
}

/**
 * The write group: the writes of one event-loop turn reach the cache device together.
 *
 * A write takes its space at the data head at once (so the writes of a turn sit back to back in
 * the segment) and queues its data here. One microtask later — after every request of the
 * socket chunk being served has been dispatched — each contiguous run of queued data goes to the
 * cache device in one call (pwritev), and then, in queue order, every key whose data was written
 * enters the index and the open kset, and the writes complete. A key is never visible before its
 * data is in the device, so reads need no knowledge of the group; a run that fails fails only
 * its own writes, whose keys were never published. Groups publish in the order they formed.
 */
export class WriteGroup {
  private readonly core: CacheCore;
  private pieces: GroupedPiece[] = [];
  private writes: GroupedWrite[] = [];
  private scheduled = false;
  private readonly publishing = new SerialSection();
  private readonly scratchKey = newIndexKey();

  constructor(core: CacheCore) {
    this.core = core;
  }

  /** Resolves once every write queued so far has been published (or failed). */
  published(): Promise<void> {
    if (!this.scheduled) return this.publishing.run(() => Promise.resolve());
    return new Promise<void>((resolve) => { queueMicrotask(() => { void this.publishing.run(() => Promise.resolve()).then(resolve); }); });
  }

  /**
   * Queues a write of one piece that needs no kset seq (not FUA): the common case, with one
   * promise and two small objects, where add() needs a closure and a copy of each piece.
   */
  addOne(record: KeyRecord, data: Uint8Array): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const write: GroupedWrite = { failure: undefined, seq: 0, resolve, reject };
      this.writes.push(write);
      this.pieces.push({ record, data, write });
      this.schedule();
    });
  }

  /** Queues a write's pieces; resolves with the seq of the kset holding its last key. */
  add(pieces: readonly { record: KeyRecord; data: Uint8Array }[]): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      const write: GroupedWrite = { failure: undefined, seq: 0, resolve: () => { resolve(write.seq); }, reject };
      this.writes.push(write);
      for (const piece of pieces) this.pieces.push({ ...piece, write });
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    queueMicrotask(this.runBound);
  }

  private readonly runBound = (): void => { void this.publishing.run(this.flushBound); };
  private readonly flushBound = (): Promise<void> => this.flush();

  private async flush(): Promise<void> {
    const core = this.core;
    const pieces = this.pieces;
    const writes = this.writes;
    this.pieces = [];
    this.writes = [];
    this.scheduled = false;
    // For writeback's idle rule: a group is the writes of one turn, so one clock read serves all.
    core.lastWriteMs = core.timers.now();
    const failed = new Set<GroupedPiece>();
    const fail = (from: number, to: number, error: unknown): void => {
      if (!isPcacheError(error)) throw error;
      core.stats.cacheIoErrors++;
      for (let index = from; index < to; index++) {
        const piece = pieces[index];
        if (piece === undefined) continue;
        failed.add(piece);
        piece.write.failure ??= error;
      }
    };
    for (let from = 0; from < pieces.length;) {
      const first = pieces[from];
      assert(first !== undefined, 'write group out of range');
      let to = from + 1;
      let end = first.record.segmentOffsetBytes + first.record.lengthBytes;
      for (let next = pieces[to]; next !== undefined && next.record.segment === first.record.segment && next.record.segmentOffsetBytes === end; next = pieces[to]) {
        end += next.record.lengthBytes;
        to++;
      }
      try {
        const io = core.dev.writeDataRun(pieces.slice(from, to).map((piece) => piece.data), first.record.segment, first.record.segmentOffsetBytes);
        if (io !== undefined) await io;
      } catch (error) {
        fail(from, to, error);
      }
      from = to;
    }
    if (core.head.genWrite !== undefined) await core.head.genWrite;
    for (const piece of pieces) {
      const refused = failed.has(piece) ? undefined : core.failure ?? (core.stopped() ? new PcacheError('ESHUTDOWN', 'the cache stopped') : undefined);
      if (failed.has(piece) || refused !== undefined) {
        core.segments.put(piece.record.segment);
        piece.write.failure ??= refused;
        continue;
      }
      core.index.insert(keyFromRecord(this.scratchKey, piece.record));
      piece.write.seq = core.log.append(piece.record);
    }
    for (const write of writes) {
      if (write.failure === undefined) write.resolve();
      else write.reject(write.failure);
    }
  }
}

/** The key record of `data` written at `position` into `space`. */
function writeRecord(core: CacheCore, position: number, space: Space, data: Uint8Array): KeyRecord {
  return {
    offsetBytes: position,
    lengthBytes: space.lengthBytes,
    flags: 0,
    segment: space.segment,
    segmentOffsetBytes: space.offsetBytes,
    gen: space.gen,
    dataCrc: core.dataCrc ? crc32c(data) : 0,
  };
}

/**
 * A client write. The common case — not FUA, the backing device online, room in the log, and
 * the whole write fitting one key and the current data segment — is served without an async
 * function: one allocation at the head, one entry in the write group, one promise. Everything
 * else (splits, waits for space, FUA) takes cacheWriteInParts, which handles the general case
 * and is counted by `track` (the Cache's in-flight count, which close() waits for).
 */
export function cacheWrite(core: CacheCore, source: Uint8Array, offsetBytes: number, fua: boolean, track: (io: Promise<void>) => Promise<void>): Promise<void> {
  try {
    core.checkWritable();
  } catch (error) {
    return Promise.reject(error instanceof Error ? error : new Error(String(error)));
  }
  core.stats.writeRequests++;
  core.stats.writeBytes += source.length;
  // No clock read here: the write group notes the time of the last write once per group.
  if (fua || core.backingOfflineSinceMs !== undefined || core.log.full) return track(cacheWriteInParts(core, source, offsetBytes, fua, core.timers.now(), undefined));
  const wanted = Math.min(source.length, subtreeEnd(offsetBytes) - offsetBytes, core.keyMaxBytes);
  const space = core.head.alloc(wanted);
  if (space === undefined || space.lengthBytes !== source.length) return track(cacheWriteInParts(core, source, offsetBytes, fua, core.timers.now(), space));
  // Not tracked: close() waits for the write group itself (published), which saves a promise per write.
  return core.writes.addOne(writeRecord(core, offsetBytes, space, source), source);
}

/** The general write: any number of pieces, waiting for room and space, FUA. `first` is space already allocated for the first piece. */
async function cacheWriteInParts(core: CacheCore, source: Uint8Array, offsetBytes: number, fua: boolean, startedMs: number, first: Space | undefined): Promise<void> {
  if (first === undefined) {
    if (core.backingOfflineSinceMs !== undefined) await core.admitWrite(startedMs);
    if (core.log.full) await core.log.roomAvailable();
  }
  let pieces: { record: KeyRecord; data: Uint8Array }[] = [];
  const parts: Promise<number>[] = [];
  let allocated = first;
  for (let done = 0; done < source.length;) {
    const position = offsetBytes + done;
    const wanted = Math.min(source.length - done, subtreeEnd(position) - position, core.keyMaxBytes);
    let space = allocated ?? core.head.alloc(wanted);
    allocated = undefined;
    while (space === undefined) {
      // Never hold space while waiting for more: what this write has so far goes to the write
      // group now (so it reaches the log and can be written back and reclaimed like any other
      // key), and everything queued must be published before sealing can help.
      if (pieces.length > 0) {
        parts.push(core.writes.add(pieces));
        pieces = [];
      }
      await core.writes.published();
      // Space may have been freed during that await: try again before waiting for the next free
      // (the check and the wait's registration must run without an await between them).
      space = core.head.alloc(wanted);
      if (space !== undefined) break;
      await core.waitForSpace(startedMs);
      core.checkWritable();
      space = core.head.alloc(wanted);
    }
    const data = source.subarray(done, done + space.lengthBytes);
    pieces.push({ data, record: writeRecord(core, position, space, data) });
    done += space.lengthBytes;
  }
  parts.push(core.writes.add(pieces));
  const seqs = await Promise.all(parts);
  if (fua) await core.log.commit(Math.max(...seqs));
}

/** WRITE_ZEROES and TRIM: ZERO keys carry no data and are ordered with the log like writes. */
export async function cacheZero(core: CacheCore, offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
  core.checkWritable();
  core.stats.zeroRequests++;
  core.stats.zeroBytes += lengthBytes;
  core.lastWriteMs = core.timers.now();
  if (core.backingOfflineSinceMs !== undefined) await core.admitWrite(core.timers.now());
  const key = newIndexKey();
  let seq = 0;
  for (let position = offsetBytes; position < offsetBytes + lengthBytes;) {
    if (core.log.full) await core.log.roomAvailable();
    core.checkWritable();
    const end = Math.min(offsetBytes + lengthBytes, subtreeEnd(position));
    const record: KeyRecord = { offsetBytes: position, lengthBytes: end - position, flags: keyFlagZero, segment: 0, segmentOffsetBytes: 0, gen: 0, dataCrc: 0 };
    core.index.insert(keyFromRecord(key, record));
    seq = core.log.append(record);
    position = end;
  }
  if (fua) await core.log.commit(seq);
}

/** A part of a read that goes to the backing device. */
interface Miss {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  /** The placeholder this miss inserted, or 0 when another read's placeholder covers it. */
  readonly ticket: number;
}

/** A hit read asynchronously: re-checked once the read completed. */
interface PendingHit {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly segment: number;
  readonly genLow32: number;
}

class ReadWalk {
  misses: Miss[] | undefined;
  pendingHits: PendingHit[] | undefined;
  reads: Promise<void>[] | undefined;
  hitBytes = 0;
  readonly scratchKey = newIndexKey();
}

export function cacheRead(core: CacheCore, target: Uint8Array, offsetBytes: number): Promise<void> | undefined {
  core.checkReadable();
  core.stats.readRequests++;
  const walk = new ReadWalk();
  const endBytes = offsetBytes + target.length;
  for (let position = offsetBytes; position < endBytes;) {
    const end = Math.min(endBytes, subtreeEnd(position));
    readSubtree(core, walk, target, offsetBytes, position, end);
    position = end;
  }
  core.stats.readHitBytes += walk.hitBytes;
  if (walk.misses === undefined && walk.reads === undefined) {
    core.stats.readHitRequests++;
    return undefined;
  }
  if (walk.misses === undefined) core.stats.readHitRequests++;
  else core.stats.readMissRequests++;
  return finishRead(core, walk, target, offsetBytes);
}

/**
 * Serves [position, end) of one subtree. `request` is the request's first byte. The walk over
 * existing keys T, with R the part of the request not yet served:
 *
 *   before:     R |=====|           T starts after R: all of R is a miss (placeholder).
 *                          T |==|
 *   overlap     R |=====|           the gap before T is a miss (placeholder); the part of
 *   tail:          T |=====|        R that T covers is a hit.
 *   contain:    R |=========|       the gap before T is a miss (placeholder); all of T is a
 *                   T |==|          hit; the walk goes on after T.
 *   contained:  R   |===|           all of R is a hit, at (R start - T start) inside T.
 *               T |=======|
 *   overlap     R    |=====|        [R start, T end) is a hit; the walk goes on.
 *   head:       T |=====|
 *
 * A hit on an EMPTY placeholder is a backing read without a new placeholder; a hit on a ZERO
 * key fills zeroes; a hit on a stale key deletes the key and serves that range as a gap. The
 * tail left after the last key is a miss (placeholder).
 */
function readSubtree(core: CacheCore, walk: ReadWalk, target: Uint8Array, request: number, position: number, end: number): void {
  const subtree = core.index.subtree(position, false);
  if (subtree === undefined) {
    addMiss(core, walk, target, request, position, end, true);
    return;
  }
  let index = subtree.seek(position);
  while (position < end) {
    if (index >= subtree.count || subtree.start(index) >= end) {
      addMiss(core, walk, target, request, position, end, true);
      return;
    }
    const keyStart = subtree.start(index);
    if (keyStart > position) {
      if (addMiss(core, walk, target, request, position, keyStart, true)) index++; // it went in at `index`
      position = keyStart;
      continue;
    }
    const pieceEnd = Math.min(subtree.end(index), end);
    const flags = subtree.flags(index);
    if ((flags & keyFlagEmpty) !== 0) {
      addMiss(core, walk, target, request, position, pieceEnd, false);
    } else if ((flags & keyFlagZero) !== 0) {
      target.fill(0, position - request, pieceEnd - request);
      walk.hitBytes += pieceEnd - position;
    } else {
      const segment = subtree.segment(index);
      if (core.segments.genLow32(segment) !== subtree.genLow32(index)) {
        subtree.removeAt(index);
        core.stats.staleKeysRemoved++;
        continue; // the range is a gap now
      }
      readHit(core, walk, subtree, index, target.subarray(position - request, pieceEnd - request), position);
    }
    position = pieceEnd;
    index++;
  }
  core.index.release(subtree);
}

function readHit(core: CacheCore, walk: ReadWalk, subtree: Subtree, index: number, piece: Uint8Array, position: number): void {
  const key = subtree.read(index, walk.scratchKey);
  const segmentOffset = key.segmentOffsetBytes + (position - key.offsetBytes);
  walk.hitBytes += piece.length;
  const io = core.dataCrc ? verifiedRead(core, key, piece, segmentOffset) : core.dev.readData(piece, key.segment, segmentOffset);
  if (io === undefined) return;
  (walk.reads ??= []).push(io);
  (walk.pendingHits ??= []).push({ offsetBytes: position, lengthBytes: piece.length, segment: key.segment, genLow32: subtree.genLow32(index) });
}

/**
 * Reads a hit and checks its data CRC. The CRC covers the key's original extent, which may be
 * larger than what is left of the key after later writes cut it; then the whole original
 * extent is read and checked, and the wanted part copied out.
 */
function verifiedRead(core: CacheCore, key: IndexKey, piece: Uint8Array, segmentOffset: number): Promise<void> | undefined {
  const originalOffset = key.segmentOffsetBytes - key.crcDeltaBytes;
  const whole = segmentOffset === originalOffset && piece.length === key.crcLengthBytes;
  const extent = whole ? piece : new Uint8Array(key.crcLengthBytes);
  const { crc, segment, offsetBytes, lengthBytes } = key;
  const check = (): void => {
    if (crc32c(extent) !== crc) {
      core.stats.dataCrcErrors++;
      throw new PcacheError('EIO', `data CRC mismatch in cached extent ${offsetBytes}+${lengthBytes} (segment ${segment})`);
    }
    if (!whole) piece.set(extent.subarray(segmentOffset - originalOffset, segmentOffset - originalOffset + piece.length));
  };
  const io = core.dev.readData(extent, segment, originalOffset);
  if (io === undefined) {
    check();
    return undefined;
  }
  return io.then(check);
}

/** Queues a backing read for [start, end); returns whether a placeholder went into the index. */
function addMiss(core: CacheCore, walk: ReadWalk, target: Uint8Array, request: number, start: number, end: number, placeholder: boolean): boolean {
  let ticket = 0;
  if (placeholder && core.state === 'running' && !core.readOnly && core.failure === undefined) {
    ticket = core.nextTicket();
    const empty: KeyRecord = { offsetBytes: start, lengthBytes: end - start, flags: keyFlagEmpty, segment: ticket, segmentOffsetBytes: 0, gen: 0, dataCrc: 0 };
    core.index.insert(keyFromRecord(walk.scratchKey, empty));
  }
  (walk.misses ??= []).push({ offsetBytes: start, lengthBytes: end - start, ticket });
  core.stats.readMissBytes += end - start;
  (walk.reads ??= []).push(core.backing.read(target.subarray(start - request, end - request), start));
  return ticket !== 0;
}

async function finishRead(core: CacheCore, walk: ReadWalk, target: Uint8Array, request: number): Promise<void> {
  const misses = walk.misses ?? [];
  try {
    await Promise.all(walk.reads ?? []);
  } catch (error) {
    for (const miss of misses) if (miss.ticket !== 0) removePlaceholders(core, miss);
    if (isPcacheError(error)) {
      core.stats.backingReadErrors++;
      if (error.code === 'ENODEV') core.backingOffline(error.message);
    }
    throw error;
  }
  // A hit read asynchronously may have raced with GC freeing its segment; then the data has
  // been written back, so the backing device holds it.
  for (const hit of walk.pendingHits ?? []) {
    if (core.segments.genLow32(hit.segment) !== hit.genLow32) {
      await core.backing.read(target.subarray(hit.offsetBytes - request, hit.offsetBytes - request + hit.lengthBytes), hit.offsetBytes);
    }
  }
  for (const miss of misses) {
    if (miss.ticket !== 0) await fillMiss(core, miss, target.subarray(miss.offsetBytes - request, miss.offsetBytes - request + miss.lengthBytes));
  }
}

/** Visits the EMPTY keys of `miss`'s ticket still inside its range, in order. */
function forEachPlaceholder(core: CacheCore, miss: Miss, visit: (subtree: Subtree, index: number) => 'keep' | 'removed' | 'stop'): void {
  const end = miss.offsetBytes + miss.lengthBytes;
  for (let position = miss.offsetBytes; position < end; position = subtreeEnd(position)) {
    const subtree = core.index.subtree(position, false);
    if (subtree === undefined) continue;
    const stop = Math.min(end, subtreeEnd(position));
    for (let index = subtree.seek(position); index < subtree.count && subtree.start(index) < stop;) {
      if ((subtree.flags(index) & keyFlagEmpty) !== 0 && subtree.segment(index) === miss.ticket) {
        const verdict = visit(subtree, index);
        if (verdict === 'stop') return;
        if (verdict === 'removed') continue;
      }
      index++;
    }
    core.index.release(subtree);
  }
}

function removePlaceholders(core: CacheCore, miss: Miss): void {
  forEachPlaceholder(core, miss, (subtree, index) => {
    subtree.removeAt(index);
    return 'removed';
  });
}

/**
 * Stores a completed miss in the cache as CLEAN keys, for the parts whose placeholder is still
 * in the index. Filling is optional: with no free space, no room in the log, or a stopping
 * cache, the placeholders are simply removed.
 */
async function fillMiss(core: CacheCore, miss: Miss, data: Uint8Array): Promise<void> {
  const pieces: { offsetBytes: number; lengthBytes: number }[] = [];
  forEachPlaceholder(core, miss, (subtree, index) => {
    pieces.push({ offsetBytes: subtree.start(index), lengthBytes: subtree.length(index) });
    return 'keep';
  });
  for (const piece of pieces) {
    for (let done = 0; done < piece.lengthBytes;) {
      const canFill = core.state === 'running' && core.failure === undefined && !core.log.full;
      const space = canFill ? core.head.alloc(Math.min(piece.lengthBytes - done, core.keyMaxBytes)) : undefined;
      if (space === undefined) {
        core.stats.fillsSkipped++;
        removePlaceholders(core, miss);
        return;
      }
      const start = piece.offsetBytes + done;
      const bytes = data.subarray(start - miss.offsetBytes, start - miss.offsetBytes + space.lengthBytes);
      try {
        const io = core.dev.writeData(bytes, space.segment, space.offsetBytes);
        if (io !== undefined) await io;
        if (core.head.genWrite !== undefined) await core.head.genWrite;
      } catch (error) {
        core.segments.put(space.segment);
        if (!isPcacheError(error)) throw error;
        core.stats.cacheIoErrors++;
        removePlaceholders(core, miss);
        return;
      }
      storeFill(core, miss, { offsetBytes: start, lengthBytes: space.lengthBytes }, space, bytes);
      done += space.lengthBytes;
    }
  }
}

/**
 * Turns the placeholder pieces of `miss` inside `range` into CLEAN keys pointing at `space`,
 * which holds `range`'s data. Writes may have cut the placeholder while the data was being
 * stored; each surviving piece becomes its own key (with its own segment reference).
 */
function storeFill(core: CacheCore, miss: Miss, range: { offsetBytes: number; lengthBytes: number }, space: Space, bytes: Uint8Array): void {
  let references = 1; // alloc took one for us
  const rangeEnd = range.offsetBytes + range.lengthBytes;
  const key = newIndexKey();
  forEachPlaceholder(core, miss, (subtree, index) => {
    const start = subtree.start(index);
    if (start >= rangeEnd) return 'stop';
    if (start < range.offsetBytes) return 'keep';
    const length = Math.min(subtree.length(index), rangeEnd - start);
    const delta = start - range.offsetBytes;
    const piece = bytes.subarray(delta, delta + length);
    if (references === 0) core.segments.get(space.segment);
    else references--;
    const crc = core.dataCrc ? crc32c(piece) : 0;
    subtree.fillPlaceholder(index, { lengthBytes: length, segment: space.segment, segmentOffsetBytes: space.offsetBytes + delta, gen: space.gen, crc });
    subtree.read(index, key);
    core.log.append(keyRecord(key));
    core.stats.fillsStored++;
    return 'keep';
  });
  if (references > 0) core.segments.put(space.segment);
}

/** NBD_CMD_CACHE: brings the range into the cache, a bounded piece at a time. */
export async function cachePrefetch(core: CacheCore, offsetBytes: number, lengthBytes: number): Promise<void> {
  const chunkBytes = subtreeSizeBytes;
  const scratch = new Uint8Array(Math.min(chunkBytes, lengthBytes));
  for (let done = 0; done < lengthBytes; done += chunkBytes) {
    const piece = scratch.subarray(0, Math.min(chunkBytes, lengthBytes - done));
    const io = cacheRead(core, piece, offsetBytes + done);
    if (io !== undefined) await io;
  }
}

/** One run of the block status answer. */
export interface CacheExtentStatus {
  readonly lengthBytes: number;
  readonly zero: boolean;
  readonly hole: boolean;
}

/** Maximum extents in one block status answer; the client asks again for the rest. */
export const blockStatusExtentsMax = 1024;

/**
 * Describes the range as the cache sees it: ZERO keys read as zeroes; everything else is
 * reported as data (the cache does not know what the backing device holds, and claiming
 * nothing is always safe).
 */
export function cacheBlockStatus(core: CacheCore, offsetBytes: number, lengthBytes: number): CacheExtentStatus[] {
  core.checkReadable();
  const extents: { lengthBytes: number; zero: boolean; hole: boolean }[] = [];
  const push = (length: number, zero: boolean): void => {
    const last = extents[extents.length - 1];
    if (last !== undefined && last.zero === zero) last.lengthBytes += length;
    else extents.push({ lengthBytes: length, zero, hole: false });
  };
  const endBytes = offsetBytes + lengthBytes;
  for (let position = offsetBytes; position < endBytes && extents.length < blockStatusExtentsMax;) {
    const end = Math.min(endBytes, subtreeEnd(position));
    const subtree = core.index.subtree(position, false);
    let cursor = position;
    if (subtree !== undefined) {
      for (let index = subtree.seek(position); index < subtree.count && subtree.start(index) < end; index++) {
        const start = Math.max(subtree.start(index), cursor);
        if (start > cursor) push(start - cursor, false);
        const pieceEnd = Math.min(subtree.end(index), end);
        push(pieceEnd - start, (subtree.flags(index) & keyFlagZero) !== 0);
        cursor = pieceEnd;
      }
    }
    if (end > cursor) push(end - cursor, false);
    position = end;
  }
  return extents;
}

export { isDataKey, keyFlagClean };
