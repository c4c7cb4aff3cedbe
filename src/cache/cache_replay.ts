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
// Applying a kset: ZERO keys go into the index; a key whose generation is older than its
// segment's is stale (the segment was freed and reused since) and is skipped without taking a
// reference; every other key takes a reference on its segment and goes into the index, in log
// order, so later keys win. key_head is where replay stopped. dirty_tail must lie on the
// replayed chain. Replay writes nothing, so it is idempotent; the caller then zeroes the rest
// of key_head's segment, so a kset written after key_head before the crash (never
// acknowledged) can never be picked up by a later replay.

import { crc32c } from '../lib/crc32c.js';
import { PcacheError } from '../lib/errors.js';
import { keyFlagClean, keyFlagZero, ksetBytesMax, type KeyRecord } from '../ondisk/kset.js';
import type { CacheContext } from './cache_context.js';
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
}

/** Yield to the event loop every this many ksets during a long replay. */
const replayYieldKsets = 512;

export async function replay(
  ctx: CacheContext,
  persistedDirtyTail: { segment: number; offsetBytes: number },
  onKey?: (record: KeyRecord, live: boolean) => void,
): Promise<ReplayResult> {
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
  for (;;) {
    if (dirtyTail === undefined && samePosition(pos, persistedDirtyTail)) dirtyTail = pos;
    const kset = await readKsetAt(ctx, pos, scratch);
    if (!kset.ok) {
      stopReason = kset.problem;
      stopDamage = kset.damage;
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
        if (ctx.dataCrc) await verifyData(ctx, record, dataCrcErrors);
      }
      if (dirtyTail !== undefined && (record.flags & keyFlagClean) === 0) ctx.stats.dirtyBytes += record.lengthBytes;
      ctx.index.insert(keyFromRecord(key, record));
    }
    pos = positionAfter(pos, kset);
    ksets++;
    if (ksets % replayYieldKsets === 0) await ctx.timers.yieldToOthers();
  }
  if (dirtyTail === undefined) {
    throw new PcacheError('CORRUPT', `dirty_tail (segment ${persistedDirtyTail.segment} offset ${persistedDirtyTail.offsetBytes}) is not on the log between key_tail and the end of the log (replay stopped: ${stopReason})`);
  }
  segments.rebuildFreePool();
  return { keyHead: pos, dirtyTail, ksets, keys, staleKeys, stopReason, stopDamage, dataCrcErrors };
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
