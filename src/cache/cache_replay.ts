// Recovery: rebuilding the index, the segment references and key_head from the log.
//
// Replay starts at the persisted key_tail and reads ksets in log order, following LAST links
// from segment to segment, and stops at the first kset that is not valid. The stop rules, with
// the crash (or damage) that produces each:
//
//   | kset at the position                                  | decision                      |
//   |-------------------------------------------------------|-------------------------------|
//   | zero header / no magic                                | end of log (never written, or  |
//   |                                                       |   the zeroed header after the  |
//   |                                                       |   last kset)                   |
//   | CRC mismatch                                          | end of log (torn kset: power   |
//   |                                                       |   lost while it was written)   |
//   | log_gen differs from the segment's generation         | end of log (a kset left from   |
//   |                                                       |   an earlier use of the segment)|
//   | key_count > 128, kset overruns its segment, bad field | end of log (damage; reported)  |
//   | LAST pointing at a segment already in the chain or    | end of log (a cycle or damage; |
//   |   holding data                                        |   reported)                    |
//   | a key pointing at data with a newer generation than   | end of log (damage; reported)  |
//   |   its segment's, or at a log segment                  |                                |
//   | valid                                                 | apply, go on                   |
//
// On format version 2 devices every kset carries its seq, and replay requires them in order
// from key_tail's seq: a valid kset with another seq at the next position is not part of this
// log (the end). Where replay stops, it then looks for the log going on beyond that point — a
// valid kset further on in the same segment, or at the start of another segment, with a seq
// at or past the one expected and a durable_seq showing that the expected kset had been made
// durable before it was written. Finding one means the log was damaged, not cut short by a
// crash: the result says so (`damage`), and the cache refuses to open unless told to accept
// the loss (cache_open.ts). A crash only ever leaves ksets of the same unsynced batch behind a
// torn one, and their durable_seq is below it.
//
// Applying a kset: ZERO keys go into the index; a key whose generation is older than its
// segment's is stale (the segment was freed and reused since) and is skipped without taking a
// reference; every other key takes a reference on its segment and goes into the index, in log
// order, so later keys win. key_head is where replay stopped. dirty_tail must lie on the
// replayed chain. Replay writes nothing, so it is idempotent; the caller then zeroes the rest
// of key_head's segment, so a kset written after key_head before the crash (never
// acknowledged) can never be picked up by a later replay.

import { crc32c } from '../lib/crc32c.js';
import { PcacheError } from '../lib/errors.js';
import { KiB } from '../lib/units.js';
import { decodeKset, isDropKey, keyFlagClean, keyFlagZero, ksetBytesMax, ksetMagic, type KeyRecord } from '../ondisk/kset.js';
import type { CacheContext } from './cache_context.js';
import type { CacheMetadata } from './cache_metadata.js';
import { positionAfter, readKsetAt } from './cache_kset.js';
import { segmentKindData, segmentKindFree, segmentKindLog } from './cache_segment.js';
import { keyFromRecord, newIndexKey } from './cache_tree.js';
import { samePosition, type LogPos } from './cache_types.js';

export interface ReplayResult {
  readonly keyHead: LogPos;
  readonly dirtyTail: LogPos;
  readonly ksets: number;
  readonly keys: number;
  readonly staleKeys: number;
  /** Why replay stopped where it did (the normal end of a log reads "no kset magic" or similar). */
  readonly stopReason: string;
  /** Replay stopped at damage (a kset or key no pcache writes), not at a normal end of the log. */
  readonly stopDamage: boolean;
  /** Data CRC mismatches found while verifying replayed keys. */
  readonly dataCrcErrors: string[];
  /** The log went on durably past where replay stopped: it is damaged (version 2 devices only). */
  readonly damage: LogDamage | undefined;
  /**
   * Segments other than key_head's whose first kset belongs to this log's seqs at or past
   * key_head (left by a crash, or after damage). Accepting a damaged log retires them.
   */
  readonly strandedSegments: number[];
}

/** Where the log was damaged, and what proves it. */
export interface LogDamage {
  /** Where replay stopped, the seq it expected there, and why the kset there was refused. */
  readonly at: LogPos;
  readonly reason: string;
  /** A valid kset after the damage, written when the expected kset was already durable (if one was found). */
  readonly beyond: { readonly segment: number; readonly offsetBytes: number; readonly seq: number; readonly durableSeq: number } | undefined;
  /** The tails say every kset up to this seq was durable. */
  readonly knownDurableSeq: number;
}

/** Yield to the event loop every this many ksets during a long replay. */
const replayYieldKsets = 512;

/** What replay needs from the metadata besides key_tail (which the context holds). */
export interface ReplayStart {
  /** The persisted dirty_tail: it must lie on the replayed log. */
  readonly dirtyTail: { readonly segment: number; readonly offsetBytes: number };
  /** Every kset up to this seq was durable when a tail was last written (0 when unknown). */
  readonly knownDurableSeq: number;
}

/** The replay start of a cache's metadata. */
export function replayStartOf(metadata: CacheMetadata): ReplayStart {
  return { dirtyTail: metadata.dirtyTail.value, knownDurableSeq: Math.max(metadata.keyTail.value.durableSeq, metadata.dirtyTail.value.durableSeq) };
}

export async function replay(
  ctx: CacheContext,
  start: ReplayStart,
  onKey?: (record: KeyRecord, live: boolean) => void,
): Promise<ReplayResult> {
  const persistedDirtyTail = start.dirtyTail;
  const segments = ctx.segments;
  const scratch = new Uint8Array(ksetBytesMax);
  const inChain = new Uint8Array(segments.count);
  const key = newIndexKey();
  let pos = ctx.keyTail;
  segments.kind[pos.segment] = segmentKindLog;
  inChain[pos.segment] = 1;
  let dirtyTail: LogPos | undefined;
  let ksets = 0;
  let keys = 0;
  let staleKeys = 0;
  let stopReason = '';
  let stopDamage = false;
  const dataCrcErrors: string[] = [];
  const extended = ctx.dev.layout.extendedKsets;
  for (;;) {
    if (dirtyTail === undefined && samePosition(pos, persistedDirtyTail)) dirtyTail = pos;
    const kset = await readKsetAt(ctx, pos, scratch);
    if (!kset.ok) {
      stopReason = kset.problem;
      stopDamage = kset.damage;
      break;
    }
    if (extended && kset.seq !== pos.seq) {
      stopReason = `kset seq ${kset.seq} where ${pos.seq} was expected`;
      break;
    }
    if (kset.kind === 'last') {
      if (inChain[kset.next] === 1 || segments.kind[kset.next] !== segmentKindFree) {
        stopReason = `LAST kset at segment ${pos.segment} points at segment ${kset.next}, which is already in use (cycle or damage)`;
        stopDamage = true;
        break;
      }
      inChain[kset.next] = 1;
      segments.kind[kset.next] = segmentKindLog;
      pos = positionAfter(pos, kset);
      continue;
    }
    // An INVALIDATE marker: the clean copies before it were dropped (their segment references
    // stay until GC passes their keys, as for any key the index no longer holds).
    if (kset.invalidate) dropCleanKeys(ctx);
    const problem = keysProblem(ctx, kset.keys);
    if (problem !== undefined) {
      stopReason = problem;
      stopDamage = true;
      break;
    }
    for (const record of kset.keys) {
      keys++;
      const zero = (record.flags & keyFlagZero) !== 0;
      if (!zero && record.gen < (segments.gen[record.segment] ?? 0)) {
        staleKeys++;
        onKey?.(record, false);
        continue;
      }
      onKey?.(record, true);
      if (!zero) {
        segments.kind[record.segment] = segmentKindData;
        segments.get(record.segment);
        if ((record.flags & keyFlagClean) === 0) segments.noteDirty(record.segment, pos.seq);
        if (ctx.dataCrc) await verifyData(ctx, record, dataCrcErrors);
      }
      if (dirtyTail !== undefined && (record.flags & keyFlagClean) === 0) ctx.stats.dirtyBytes += record.lengthBytes;
      // A DROP key: the extent went to the backing device directly; what the cache held of it is gone.
      if (isDropKey(record.flags)) ctx.index.removeRange(keyFromRecord(key, record));
      else ctx.index.insert(keyFromRecord(key, record));
    }
    pos = positionAfter(pos, kset);
    ksets++;
    if (ksets % replayYieldKsets === 0) await ctx.timers.yieldToOthers();
  }
  const beyond = extended ? await logBeyond(ctx, pos, inChain) : { durable: undefined, stranded: [] };
  let damage: LogDamage | undefined;
  if (beyond.durable !== undefined) damage = { at: pos, reason: stopReason, beyond: beyond.durable, knownDurableSeq: start.knownDurableSeq };
  else if (extended && pos.seq <= start.knownDurableSeq) damage = { at: pos, reason: stopReason, beyond: undefined, knownDurableSeq: start.knownDurableSeq };
  if (damage !== undefined) stopDamage = true;
  if (dirtyTail === undefined) {
    const why = damage === undefined ? `replay stopped: ${stopReason}` : describeLogDamage(damage);
    throw new PcacheError('CORRUPT', `dirty_tail (segment ${persistedDirtyTail.segment} offset ${persistedDirtyTail.offsetBytes}) is not on the log between key_tail and the end of the log (${why})`, damage === undefined ? undefined : { reason: 'log-damaged' });
  }
  segments.rebuildFreePool();
  return { keyHead: pos, dirtyTail, ksets, keys, staleKeys, stopReason, stopDamage, dataCrcErrors, damage, strandedSegments: beyond.stranded };
}

/** One line for people: where the log is damaged and what proves it. */
export function describeLogDamage(damage: LogDamage): string {
  const { at, beyond } = damage;
  const proof = beyond !== undefined
    ? `the kset at segment ${beyond.segment} offset ${beyond.offsetBytes} (seq ${beyond.seq}) was written after every kset up to seq ${beyond.durableSeq} was durable`
    : `the tails record that every kset up to seq ${damage.knownDurableSeq} was durable`;
  return `the log is damaged at segment ${at.segment} offset ${at.offsetBytes}, where kset seq ${at.seq} was expected (${damage.reason}), yet the log went on: ${proof}`;
}

/**
 * How far past the end of the log replay looks, inside its segment, for the log going on: a
 * damaged stretch of up to this much, less a kset at each edge, is told from the end. (A
 * stretch running to the segment's end is found anyway, through the next segment's first
 * kset.) Bounded because every open pays for it — the crash simulator opens a cache half a
 * million times per run.
 */
export const damageScanWindowBytes = 256 * KiB;
/** The window is read this much at a time. */
const damageScanPieceBytes = 64 * KiB;
const ksetMagicBytes = Buffer.from(ksetMagic, 'ascii');

/**
 * Looks for this log's ksets past `end` (where replay stopped): in end's segment at every
 * 8-byte boundary up to damageScanWindowBytes on, and at the start of every segment outside
 * the replayed chain. A kset counts when it decodes as valid with its segment's generation and
 * carries a seq at or past end's. Returns the first one whose durable_seq reaches end's seq
 * (damage), and the segments other than end's whose first kset counts (stranded: a crash left
 * them, or damage).
 */
async function logBeyond(ctx: CacheContext, end: LogPos, inChain: Uint8Array): Promise<{ durable: LogDamage['beyond'] | undefined; stranded: number[] }> {
  const dev = ctx.dev;
  const stranded: number[] = [];
  let durable: LogDamage['beyond'] | undefined;
  /** Whether the kset at `bytes` is this log's ('counts'), and written after end's seq was durable ('durable'). */
  const consider = (bytes: Uint8Array, segment: number, offsetBytes: number): 'no' | 'counts' | 'durable' => {
    const kset = decodeKset(bytes, {
      extended: true,
      crcSeed: dev.crcSeed,
      logGen: ctx.segments.gen[segment] ?? 0,
      roomBytes: dev.dataSizeBytes - offsetBytes,
      segmentCount: dev.segmentCount,
      dataSizeBytes: dev.dataSizeBytes,
      backingSizeBytes: dev.sb.backingSizeBytes,
    });
    if (!kset.ok || kset.seq < end.seq) return 'no';
    if (kset.durableSeq < end.seq) return 'counts';
    durable ??= { segment, offsetBytes, seq: kset.seq, durableSeq: kset.durableSeq };
    return 'durable';
  };
  // The window is read a piece at a time into one buffer, each piece with a kset's worth of
  // the next behind it (so a kset starting in the piece is whole): every open and every check
  // scans here, and a buffer of the whole window per scan made the crash simulator, which
  // opens a cache millions of times, spend much of its time allocating and collecting.
  const start = end.offsetBytes + 8;
  const roomBytes = Math.max(0, dev.dataSizeBytes - start);
  const limit = Math.min(damageScanWindowBytes, roomBytes);
  // Not zero-filled: each read fills what is searched, or throws.
  const buffer = Buffer.allocUnsafe(Math.min(damageScanPieceBytes + ksetBytesMax, roomBytes));
  for (let pieceStart = 0; pieceStart < limit && durable === undefined; pieceStart += damageScanPieceBytes) {
    const piece = buffer.subarray(0, Math.min(buffer.length, roomBytes - pieceStart));
    const io = dev.readData(piece, end.segment, start + pieceStart);
    if (io !== undefined) await io;
    // The magic sits 8 bytes into a kset, and ksets start on 8-byte boundaries. A native
    // search finds candidates (a byte loop here cost a fifth of every open); one off the
    // boundary is skipped.
    for (let found = piece.indexOf(ksetMagicBytes, 8); found >= 0; found = piece.indexOf(ksetMagicBytes, found + 1)) {
      const at = found - 8;
      if (at >= damageScanPieceBytes || pieceStart + at >= limit) break;
      if (at % 8 === 0 && consider(piece.subarray(at), end.segment, start + pieceStart + at) === 'durable') break;
    }
  }
  const first = new Uint8Array(Math.min(ksetBytesMax, dev.dataSizeBytes));
  for (let segment = 0; segment < dev.segmentCount; segment++) {
    if (inChain[segment] === 1) continue;
    const io = dev.readData(first, segment, 0);
    if (io !== undefined) await io;
    if (ksetMagicBytes.equals(first.subarray(8, 16)) && consider(first, segment, 0) !== 'no') stranded.push(segment);
  }
  return { durable, stranded };
}

/** Removes every CLEAN key from the index; returns the bytes they covered. */
export function dropCleanKeys(ctx: CacheContext): number {
  let bytes = 0;
  ctx.index.sweep((subtree, index) => {
    if ((subtree.flags(index) & keyFlagClean) === 0) return false;
    bytes += subtree.length(index);
    return true;
  });
  return bytes;
}

/** A key no valid log can contain: newer than its segment, or pointing into the log. */
function keysProblem(ctx: CacheContext, records: readonly KeyRecord[]): string | undefined {
  for (const record of records) {
    if ((record.flags & keyFlagZero) !== 0) continue;
    const gen = ctx.segments.gen[record.segment] ?? 0;
    if (record.gen > gen) return `a key at ${record.offsetBytes} has generation ${record.gen}, newer than its segment ${record.segment}'s ${gen}`;
    if (record.gen === gen && ctx.segments.kind[record.segment] === segmentKindLog) {
      return `a key at ${record.offsetBytes} points into log segment ${record.segment}`;
    }
  }
  return undefined;
}

async function verifyData(ctx: CacheContext, record: KeyRecord, errors: string[]): Promise<void> {
  const data = new Uint8Array(record.lengthBytes);
  const io = ctx.dev.readData(data, record.segment, record.segmentOffsetBytes);
  if (io !== undefined) await io;
  if (crc32c(data) !== record.dataCrc) {
    ctx.stats.dataCrcErrors++;
    errors.push(`extent ${record.offsetBytes}+${record.lengthBytes} in segment ${record.segment}`);
  }
}
