// What one writeback round writes: the window of the log it covers, and the extents of that
// window that still need to reach the backing device.
//
// The window runs from dirty_tail over durable ksets, never past the durable log head, up to a
// number of ksets and of dirty bytes; under strict ordering it also ends at the first kset
// that ends a flush epoch (EPOCH_END). Its keys are merged in a private index, newest first,
// so of every range only the window's newest data is left.
//
// Superseded ranges: a range the window's newest data covers may have been written again
// after the window (the live index then maps it to other data). Such a part need not be
// written back now: the newer data will be, when writeback reaches it. Skipping it is only
// sound when
// - the newer key is durable before the round's dirty_tail is: otherwise a crash could lose
//   the newer key (it was never flushed, so that is allowed) while dirty_tail already passed
//   the skipped one, and the cache would end up holding data the backing device never got. The
//   round makes the log durable up to every key appended so far (KsetLog.commitAppended)
//   before it persists dirty_tail;
// - under strict ordering, the newer key belongs to the same flush epoch as the skipped one,
//   which holds when no EPOCH_END was sealed at or after the window's start (the window then
//   lies in the epoch still open, and so does every key after it). The backing device then
//   holds, for the skipped range, a value from before that epoch or from earlier in it, and
//   the epoch is not complete on the backing device until writeback passes its EPOCH_END,
//   which it only does having written the epoch's newest data. So the backing device alone
//   still holds a prefix of the flush epochs, the last one in part. Under relaxed ordering
//   any newer key will do, and the backing device alone is only consistent at an epoch end
//   that writeback has fully caught up with (docs/design.md §6).
// Parts the live index does not show as superseded by a data or ZERO key (no key there, an
// EMPTY placeholder, a CLEAN copy, or a ZERO key over a ZERO key) are written: writing the
// window's own newest data is always correct.

import { assert } from '../lib/assert.js';
import { PcacheError } from '../lib/errors.js';
import type { Timers } from '../lib/timers.js';
import { keyFlagClean, keyFlagEmpty, keyFlagZero, type KeyRecord } from '../ondisk/kset.js';
import type { CacheContext } from './cache_context.js';
import { positionAfter, readKsetAt, type KsetLog } from './cache_kset.js';
import { KeyIndex } from './cache_index.js';
import { keyFromRecord, newIndexKey, type IndexKey, type Subtree } from './cache_tree.js';
import type { LogPos } from './cache_types.js';

/**
 * Reading and planning run on the event loop between client requests: after this many ksets
 * read, or keys planned, other work gets a turn (a window can hold tens of thousands of keys).
 */
const windowKsetsPerTurn = 64;
const planKeysPerTurn = 2048;

export interface WindowLimits {
  readonly ksetsMax: number;
  readonly dirtyBytesMax: number;
  /** End at the first EPOCH_END (strict ordering). */
  readonly stopAtEpochEnd: boolean;
  /** The log position not to read past (the durable head, or a checkpoint's hold), asked before every kset. */
  readonly endLsn: () => number;
}

/** Where a window lies in the log, and what it holds. */
export interface WindowBounds {
  readonly start: LogPos;
  readonly end: LogPos;
  /** Log bytes of dirty keys in the window (what dirtyBytes drops by). */
  readonly dirtyBytes: number;
  readonly ksets: number;
}

export interface Window extends WindowBounds {
  readonly keys: KeyIndex;
}

/**
 * Reads the window's ksets from `start` (see the file comment) and hands each key record to
 * `visit`, in log order; undefined as soon as `visit` returns false.
 */
async function scanWindow(ctx: CacheContext, log: KsetLog, start: LogPos, limits: WindowLimits, scratch: Uint8Array, visit: (record: KeyRecord) => boolean): Promise<WindowBounds | undefined> {
  let pos = start;
  let ksets = 0;
  let dirtyBytes = 0;
  while (ksets < limits.ksetsMax && dirtyBytes < limits.dirtyBytesMax && pos.lsn < limits.endLsn()) {
    const kset = await readKsetAt(ctx, pos, scratch);
    if (!kset.ok) {
      throw new PcacheError('CORRUPT', `writeback: the kset at segment ${pos.segment} offset ${pos.offsetBytes} is invalid: ${kset.problem}`);
    }
    pos = positionAfter(pos, kset);
    if (kset.kind === 'last') continue;
    ksets++;
    if (ksets % windowKsetsPerTurn === 0) await ctx.timers.yieldToOthers();
    const paced = ctx.timers.pace();
    if (paced !== undefined) await paced;
    for (const record of kset.keys) {
      if ((record.flags & keyFlagZero) === 0 && record.gen !== ctx.segments.gen[record.segment]) {
        throw new PcacheError('CORRUPT', `writeback: a dirty key at ${record.offsetBytes} points at a reused segment ${record.segment}`);
      }
      if ((record.flags & keyFlagClean) === 0) dirtyBytes += record.lengthBytes;
      if (!visit(record)) return undefined;
    }
    if (kset.epochEnd && limits.stopAtEpochEnd) break;
  }
  assert(pos.lsn <= log.durableHead.lsn, 'writeback read past the durable log head');
  return { start, end: pos, dirtyBytes, ksets };
}

/** Reads the window of ksets from `start` into a private index, newest first (see the file comment). */
export async function readWindow(ctx: CacheContext, log: KsetLog, start: LogPos, limits: WindowLimits, scratch: Uint8Array): Promise<Window> {
  const keys = new KeyIndex();
  const key = newIndexKey();
  const bounds = await scanWindow(ctx, log, start, limits, scratch, (record) => {
    keys.insert(keyFromRecord(key, record));
    return true;
  });
  assert(bounds !== undefined, 'a window scan that keeps every key stopped');
  return { ...bounds, keys };
}

export interface WritePlan {
  /** Dirty data and ZERO extents to write, in offset order, never overlapping. */
  readonly parts: IndexKey[];
  readonly bytes: number;
  /** Bytes left out because newer keys supersede them. */
  readonly skippedBytes: number;
}

/**
 * The window's newest dirty and ZERO extents, in offset order, less (while `skipAllowed()`)
 * every part the live index maps to newer data. Other work runs between turns, so the live
 * index may move on meanwhile: `skipAllowed` is asked again after every break (under strict
 * ordering an EPOCH_END sealed meanwhile ends skipping), and a key appended during planning
 * only means that less is skipped than could be. Every key a skip relies on was appended
 * before planning ended, which is what the caller's commit (KsetLog.commitAppended) covers.
 */
export async function planWrites(window: Window, live: KeyIndex, skipAllowed: () => boolean, timers: Pick<Timers, 'yieldToOthers' | 'pace'>): Promise<WritePlan> {
  const parts: IndexKey[] = [];
  let bytes = 0;
  let skippedBytes = 0;
  const emit = (key: IndexKey, offsetBytes: number, lengthBytes: number): void => {
    parts.push(partOf(key, offsetBytes, lengthBytes));
    bytes += lengthBytes;
  };
  let keysThisTurn = 0;
  // Read into one scratch key: emit copies what it keeps, and nothing awaits while it is used.
  const scratch = newIndexKey();
  for (const subtree of window.keys.inOrder()) {
    for (let index = 0; index < subtree.count; index++) {
      if (++keysThisTurn >= planKeysPerTurn) {
        keysThisTurn = 0;
        await timers.yieldToOthers();
      }
      const paced = timers.pace();
      if (paced !== undefined) await paced;
      const key = subtree.read(index, scratch);
      if ((key.flags & keyFlagClean) !== 0) continue;
      // Looked up per key: the live subtree may be dropped or replaced during a break.
      const liveSubtree = skipAllowed() ? live.subtree(subtree.baseBytes, false) : undefined;
      if (liveSubtree === undefined) {
        emit(key, key.offsetBytes, key.lengthBytes);
        continue;
      }
      skippedBytes += emitLive(liveSubtree, key, emit);
    }
  }
  return { parts, bytes, skippedBytes };
}

/** Emits the parts of `key` that `live` does not show as superseded; returns the bytes skipped. */
function emitLive(live: Subtree, key: IndexKey, emit: (key: IndexKey, offsetBytes: number, lengthBytes: number) => void): number {
  const end = key.offsetBytes + key.lengthBytes;
  let from = key.offsetBytes; // start of the stretch not yet emitted or skipped
  let skipped = 0;
  for (let index = live.seek(key.offsetBytes); index < live.count && live.start(index) < end; index++) {
    if (!supersedes(live, index, key)) continue;
    const cutStart = Math.max(live.start(index), key.offsetBytes);
    const cutEnd = Math.min(live.end(index), end);
    if (cutStart > from) emit(key, from, cutStart - from);
    skipped += cutEnd - cutStart;
    from = cutEnd;
  }
  if (end > from) emit(key, from, end - from);
  return skipped;
}

/** Whether live key `index` holds newer data than the window's `key` (see the file comment). */
function supersedes(live: Subtree, index: number, key: IndexKey): boolean {
  const flags = live.flags(index);
  if ((flags & (keyFlagEmpty | keyFlagClean)) !== 0) return false;
  const liveZero = (flags & keyFlagZero) !== 0;
  const keyZero = (key.flags & keyFlagZero) !== 0;
  if (liveZero || keyZero) return liveZero !== keyZero;
  return live.segment(index) !== key.segment || live.genLow32(index) !== key.gen % 0x1_0000_0000 ||
    live.segmentOffset(index) - live.start(index) !== key.segmentOffsetBytes - key.offsetBytes;
}

/**
 * The window and its plan in one pass, from the live index instead of a private one: the fast
 * path while superseded data may be skipped (planWrites' `skipAllowed`). Undefined when the
 * live index cannot decide the plan alone; the caller then reads the window again with
 * readWindow and plans it with planWrites, which is always right.
 *
 * Why it gives planWrites' plan: every byte of a dirty key in the window is, in the live index,
 * either this key's own data (then this key is the newest of all for that byte, so also the
 * window's newest, and planWrites writes it: "holds" below) or newer data or ZERO from another
 * key, in the window or after it (planWrites writes nothing there: the window's newest is
 * superseded too, or is that other key, which is written when its own turn comes). Anything
 * else (no key, an EMPTY placeholder, a CLEAN copy, a ZERO key over a ZERO key, which could
 * be either) would need the window's own order, which only a private index has: undefined.
 * So does skipping becoming forbidden before the window is planned (an EPOCH_END sealed
 * meanwhile under strict ordering), unless no more bytes needed skipping by then. A key read
 * after a break sees the live index as it is then, as planWrites does; keys appended
 * meanwhile only make it skip more, and the round's commit covers them.
 *
 * What it saves: under overwrites, half a window's keys or more are superseded, and merging
 * every key into a private index first (tens of thousands of inserts per round) was about a quarter
 * of writeback's work on the event loop (docs/performance.md).
 */
export async function readWindowPlan(
  ctx: CacheContext, log: KsetLog, start: LogPos, limits: WindowLimits, scratch: Uint8Array,
  live: KeyIndex, skipAllowed: () => boolean,
): Promise<{ window: WindowBounds; plan: WritePlan } | undefined> {
  const parts: IndexKey[] = [];
  let bytes = 0;
  let skippedBytes = 0;
  // Each record is read into one scratch key: partOf copies what it keeps.
  const key = newIndexKey();
  const window = await scanWindow(ctx, log, start, limits, scratch, (record) => {
    // CLEAN keys (and DROP keys) are never written back; whatever they shadow in the window
    // shows in the live index as a key that neither holds nor supersedes: undecided below.
    if ((record.flags & keyFlagClean) !== 0) return true;
    const skipped = planKeyFromLive(live, keyFromRecord(key, record), parts, skipAllowed);
    if (skipped === undecided) return false;
    skippedBytes += skipped;
    bytes += record.lengthBytes - skipped;
    return true;
  });
  if (window === undefined) return undefined;
  parts.sort(byOffset);
  for (let index = 1; index < parts.length; index++) {
    const previous = parts[index - 1] as IndexKey;
    // Two window keys mapping the same data (the log holds one key twice): let the private index decide.
    if ((parts[index] as IndexKey).offsetBytes < previous.offsetBytes + previous.lengthBytes) return undefined;
  }
  return { window, plan: { parts, bytes, skippedBytes } };
}

const undecided = -1;

function byOffset(a: IndexKey, b: IndexKey): number {
  return a.offsetBytes - b.offsetBytes;
}

/**
 * Appends to `parts` the parts of dirty key `key` (a whole key record) the live index holds as
 * its data, and returns the bytes it skips as superseded, or `undecided` (readWindowPlan says
 * when). A key never crosses its subtree (cache_index.ts), so one subtree holds all of it:
 *
 *   key           |=======================|
 *   live       |=====|  |====|      |========|
 *              holds  ^ gap:  undecided
 *   live       |=====|=======|======|========|
 *              holds  other   holds  other: superseded (skipped) or undecided
 */
function planKeyFromLive(live: KeyIndex, key: IndexKey, parts: IndexKey[], skipAllowed: () => boolean): number {
  const subtree = live.subtree(key.offsetBytes, false);
  if (subtree === undefined) return undecided;
  const end = key.offsetBytes + key.lengthBytes;
  let from = key.offsetBytes;
  let skipped = 0;
  for (let index = subtree.seek(from); from < end; index++) {
    if (index >= subtree.count || subtree.start(index) > from) return undecided;
    const partEnd = Math.min(subtree.end(index), end);
    if (holds(subtree, index, key)) parts.push(partOf(key, from, partEnd - from));
    else if (supersedes(subtree, index, key) && skipAllowed()) skipped += partEnd - from;
    else return undecided;
    from = partEnd;
  }
  return skipped;
}

/** Whether live key `index` maps data key `key`'s own data (the key is the newest there). */
function holds(live: Subtree, index: number, key: IndexKey): boolean {
  if (((live.flags(index) | key.flags) & (keyFlagEmpty | keyFlagClean | keyFlagZero)) !== 0) return false;
  return live.segment(index) === key.segment && live.genLow32(index) === key.gen % 0x1_0000_0000 &&
    live.segmentOffset(index) - live.start(index) === key.segmentOffsetBytes - key.offsetBytes;
}

/** The part [offsetBytes, +lengthBytes) of `key`, which lies inside it: data keys move their data pointer along. */
function partOf(key: IndexKey, offsetBytes: number, lengthBytes: number): IndexKey {
  const delta = offsetBytes - key.offsetBytes;
  return {
    offsetBytes,
    lengthBytes,
    flags: key.flags,
    segment: key.segment,
    segmentOffsetBytes: (key.flags & keyFlagZero) === 0 ? key.segmentOffsetBytes + delta : key.segmentOffsetBytes,
    gen: key.gen,
    crc: key.crc,
    crcDeltaBytes: key.crcDeltaBytes + delta,
    crcLengthBytes: key.crcLengthBytes,
  };
}
