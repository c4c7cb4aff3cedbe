// The structural checker: proves a cache device is consistent, without writing to it.
//
// It reads every metadata record, replays the log exactly as recovery does (same code, on a
// read-only engine), and then checks what replay cannot: the segment chain, that replay
// stopped at a normal end of log rather than at damage, that dirty_tail lies on the log, that
// no two live extents share cache space, that segment kinds, references and generations agree,
// that no segment's generation went back behind a kset it holds, and (with DATA_CRC) every live
// extent's CRC. `pcache check`, Cache.check() and the crash
// simulator all use it. Problems are inconsistencies; warnings are states a crash leaves
// behind normally (for example one torn copy of a dual-copy record).

import { PcacheError, isPcacheError } from '../lib/errors.js';
import { ManualTimers } from '../lib/timers.js';
import type { BlockDevice } from '../device/block_device.js';
import { crcCheckedKsetLogGen, keyFlagZero, ksetBytesMax } from '../ondisk/kset.js';
import type { CacheMode } from '../ondisk/cache_info.js';
import { uuidToString } from '../ondisk/superblock.js';
import { CacheContext } from './cache_context.js';
import { readCacheMetadata, segmentChainProblems, type CacheMetadata } from './cache_metadata.js';
import type { CacheEngine } from './cache_engine.js';
import { positionAfter, readKsetAt } from './cache_kset.js';
import { describeLogDamage, replay, replayStartOf, type LogDamage, type ReplayResult } from './cache_replay.js';
import { segmentKindData, segmentKindFree, segmentKindLog } from './cache_segment.js';
import { defaultTuning } from './cache_tuning.js';
import { formatPosition } from './cache_types.js';

export interface CheckSummary {
  readonly formatVersion: number;
  readonly cacheUuid: string;
  readonly segmentCount: number;
  readonly segmentSizeBytes: number;
  readonly backingSizeBytes: number;
  readonly backingIdentity: string;
  readonly dataCrc: boolean;
  readonly gcPercent: number;
  /** The write mode stored in cache_info. */
  readonly mode: CacheMode;
  readonly keyTail: string;
  readonly dirtyTail: string;
  readonly keyHead: string;
  readonly ksets: number;
  readonly keys: number;
  readonly staleKeys: number;
  readonly logSegments: number;
  readonly dataSegments: number;
  readonly freeSegments: number;
  readonly dirtyBytes: number;
  readonly logEnd: string;
}

export interface CheckReport {
  readonly problems: string[];
  readonly warnings: string[];
  readonly summary: CheckSummary | undefined;
  /** The read-only state rebuilt by the check (for comparing with a live cache). */
  readonly rebuilt: CacheContext | undefined;
  readonly replay: ReplayResult | undefined;
}

const unusableBacking: BlockDevice = {
  sizeBytes: 0,
  identity: undefined,
  blocking: undefined,
  read: () => Promise.reject(new PcacheError('EPERM', 'the checker never reads the backing device')),
  write: () => Promise.reject(new PcacheError('EPERM', 'the checker never writes')),
  sync: () => Promise.resolve(),
  close: () => Promise.resolve(),
};

/** Ksets past a damage walked to describe what accepting the loss would drop (a bound on the walk). */
const lossKsetsMax = 100_000;
/** Ranges named one by one in the description; the rest are counted. */
const lossRangesShown = 8;

/**
 * What accepting a damaged log would lose, as far as the device tells: the keys of the kset
 * at the damage are unreadable, but the ksets found beyond it can be walked, and their keys
 * name the backing ranges whose acknowledged writes would be dropped.
 */
async function describeLoss(ctx: CacheContext, damage: LogDamage): Promise<string> {
  if (damage.beyond === undefined) {
    return `accepting the loss drops ksets seq ${damage.at.seq} to ${damage.knownDurableSeq}, which are unreadable: the ranges they cover cannot be named`;
  }
  const scratch = new Uint8Array(ksetBytesMax);
  const ranges: { start: number; end: number }[] = [];
  let pos = { segment: damage.beyond.segment, offsetBytes: damage.beyond.offsetBytes, lsn: 0, seq: damage.beyond.seq };
  let ksets = 0;
  for (; ksets < lossKsetsMax; ksets++) {
    const kset = await readKsetAt(ctx, pos, scratch);
    if (!kset.ok || kset.seq !== pos.seq) break;
    if (kset.kind === 'keys') for (const key of kset.keys) ranges.push({ start: key.offsetBytes, end: key.offsetBytes + key.lengthBytes });
    pos = positionAfter(pos, kset);
  }
  ranges.sort((a, b) => a.start - b.start);
  const merged: { start: number; end: number }[] = [];
  for (const range of ranges) {
    const last = merged[merged.length - 1];
    if (last !== undefined && range.start <= last.end) last.end = Math.max(last.end, range.end);
    else merged.push({ ...range });
  }
  const bytes = merged.reduce((sum, range) => sum + range.end - range.start, 0);
  const shown = merged.slice(0, lossRangesShown).map((range) => `${range.start}+${range.end - range.start}`).join(', ');
  const more = merged.length > lossRangesShown ? ` and ${merged.length - lossRangesShown} more` : '';
  return `accepting the loss drops the damaged kset (seq ${damage.at.seq}, its ranges unreadable) and the ${ksets} kset(s) found after it, ` +
    `which cover ${merged.length} backing range(s), ${bytes} bytes${merged.length > 0 ? `: ${shown}${more}` : ''}`;
}

export async function checkCacheDevice(device: BlockDevice): Promise<CheckReport> {
  const problems: string[] = [];
  const warnings: string[] = [];
  let metadata: CacheMetadata;
  try {
    metadata = await readCacheMetadata(device);
  } catch (error) {
    if (!isPcacheError(error)) throw error;
    return { problems: [error.message], warnings, summary: undefined, rebuilt: undefined, replay: undefined };
  }
  for (const problem of metadata.superblockDamage) warnings.push(`${problem} (the other copy is used)`);
  for (const choice of [metadata.cacheInfo, metadata.keyTail, metadata.dirtyTail, ...metadata.segmentInfos, ...metadata.gens]) {
    for (const problem of choice.damage) warnings.push(`${problem} (the other copy is used)`);
  }
  if (metadata.sb.formatVersion === 1) warnings.push('format version 1: the two copies of key_tail, of dirty_tail and of each segment generation share a 4 KiB block, and the superblock has one copy; drain the cache and format it again for version 2');
  problems.push(...segmentChainProblems(metadata));

  const ctx = new CacheContext(device, { ...unusableBacking, sizeBytes: metadata.sb.backingSizeBytes }, metadata, {
    readOnly: true,
    background: false,
    timers: new ManualTimers(),
    tuning: defaultTuning,
  });
  const liveExtents: { segment: number; start: number; end: number; offset: number }[] = [];
  let result: ReplayResult;
  try {
    result = await replay(ctx, replayStartOf(metadata), (record, live) => {
      if (live && (record.flags & keyFlagZero) === 0) {
        liveExtents.push({ segment: record.segment, start: record.segmentOffsetBytes, end: record.segmentOffsetBytes + record.lengthBytes, offset: record.offsetBytes });
      }
    });
  } catch (error) {
    if (!isPcacheError(error)) throw error;
    problems.push(error.message);
    return { problems, warnings, summary: undefined, rebuilt: undefined, replay: undefined };
  }
  if (result.damage !== undefined) {
    problems.push(describeLogDamage(result.damage));
    problems.push(await describeLoss(ctx, result.damage));
  } else if (result.stopDamage) {
    problems.push(`the log ends at damage: ${result.stopReason}`);
  }
  for (const extent of result.dataCrcErrors) problems.push(`data CRC mismatch: ${extent}`);

  liveExtents.sort((a, b) => a.segment - b.segment || a.start - b.start);
  for (let index = 1; index < liveExtents.length; index++) {
    const previous = liveExtents[index - 1];
    const extent = liveExtents[index];
    if (previous !== undefined && extent !== undefined && previous.segment === extent.segment && extent.start < previous.end) {
      problems.push(`live extents share cache space in segment ${extent.segment}: backing ${previous.offset} and ${extent.offset}`);
    }
  }

  const segments = ctx.segments;
  let logSegments = 0;
  let dataSegments = 0;
  let freeSegments = 0;
  for (let segment = 0; segment < segments.count; segment++) {
    const kind = segments.kind[segment];
    const refs = segments.refs[segment] ?? 0;
    if (kind === segmentKindLog) {
      logSegments++;
      if ((segments.gen[segment] ?? 0) < 1) problems.push(`log segment ${segment} has generation 0, so it was never handed out`);
    } else if (kind === segmentKindData) {
      dataSegments++;
      if (refs === 0) problems.push(`data segment ${segment} has no references`);
    } else {
      freeSegments++;
    }
    if (kind !== segmentKindData && refs !== 0) problems.push(`segment ${segment} is not a data segment but has ${refs} references`);
  }
  problems.push(...(await generationsGoneBack(ctx)));
  if (segments.freeCount !== freeSegments) problems.push(`free pool holds ${segments.freeCount} segments, ${freeSegments} are free`);
  if (logSegments + dataSegments + freeSegments !== segments.count) problems.push('segment accounting does not add up');
  if (!(ctx.keyTail.lsn <= result.dirtyTail.lsn && result.dirtyTail.lsn <= result.keyHead.lsn)) {
    problems.push('key_tail, dirty_tail and key_head are out of order');
  }
  return {
    problems,
    warnings,
    summary: {
      formatVersion: metadata.sb.formatVersion,
      cacheUuid: uuidToString(metadata.sb.cacheUuid),
      segmentCount: metadata.sb.segmentCount,
      segmentSizeBytes: metadata.sb.segmentSizeBytes,
      backingSizeBytes: metadata.sb.backingSizeBytes,
      backingIdentity: metadata.sb.backingIdentity,
      dataCrc: metadata.cacheInfo.value.dataCrc,
      gcPercent: metadata.cacheInfo.value.gcPercent,
      mode: metadata.cacheInfo.value.mode,
      keyTail: formatPosition(ctx.keyTail),
      dirtyTail: formatPosition(result.dirtyTail),
      keyHead: formatPosition(result.keyHead),
      ksets: result.ksets,
      keys: result.keys,
      staleKeys: result.staleKeys,
      logSegments,
      dataSegments,
      freeSegments,
      dirtyBytes: ctx.stats.dirtyBytes,
      logEnd: result.stopReason,
    },
    rebuilt: ctx,
    replay: result,
  };
}

/**
 * Segments whose first kset carries a newer log_gen than the segment's generation. A segment's
 * generation only grows, and it is durable before any kset of that generation is written into
 * the segment, so a valid kset (left from any earlier use) never carries a newer one. If one
 * does, a generation record went back (both copies lost their newest value: a write over the
 * newest copy caught by the crash), and once the generation climbs back to that kset's, replay
 * could take the stale kset for part of the log. Only offset 0 is read: every log segment's
 * first kset is there. Generations are compared in their low 32 bits, as ksets store them.
 */
async function generationsGoneBack(ctx: CacheContext): Promise<string[]> {
  const problems: string[] = [];
  const dev = ctx.dev;
  // Only the header and CRC matter here: decoding (and validating every key of) each
  // segment's first kset was most of what a structural check cost on a full log.
  const bytes = new Uint8Array(Math.min(dev.dataSizeBytes, ksetBytesMax));
  const header = { extended: dev.layout.extendedKsets, crcSeed: dev.crcSeed, roomBytes: dev.dataSizeBytes };
  for (let segment = 0; segment < ctx.segments.count; segment++) {
    const io = dev.readData(bytes, segment, 0);
    if (io !== undefined) await io;
    const logGen = crcCheckedKsetLogGen(bytes, header);
    const gen = ctx.segments.genLow32(segment);
    if (logGen !== undefined && logGen > gen) problems.push(`segment ${segment} holds a kset of generation ${logGen}, newer than its own generation ${gen}: a generation record went back`);
  }
  return problems;
}

/**
 * Compares what the checker rebuilt from the device with a running engine's own state; returns
 * the report's problems plus every difference. The engine must be quiesced (everything
 * committed, writeback and GC idle), or the two differ legitimately.
 */
export function compareWithEngine(report: CheckReport, engine: CacheEngine): string[] {
  const problems = [...report.problems];
  const rebuilt = report.rebuilt;
  if (rebuilt === undefined || report.replay === undefined) return problems;
  const ctx = engine.ctx;
  const same = (what: string, mine: string | number, theirs: string | number): void => {
    if (mine !== theirs) problems.push(`${what}: the running cache has ${mine}, the device says ${theirs}`);
  };
  same('key_tail', formatPosition(ctx.keyTail), formatPosition(rebuilt.keyTail));
  same('dirty_tail', formatPosition(ctx.dirtyTail), formatPosition(report.replay.dirtyTail));
  same('key_head', formatPosition(engine.log.durableHead), formatPosition(report.replay.keyHead));
  same('dirty bytes', ctx.stats.dirtyBytes, rebuilt.stats.dirtyBytes);
  const headSegment = engine.head.segment;
  for (let segment = 0; segment < ctx.segments.count; segment++) {
    const refs = (ctx.segments.refs[segment] ?? 0) - (segment === headSegment ? 1 : 0);
    // The data head's segment holds no key yet until its first write lands: free on disk.
    const kind = segment === headSegment && refs === 0 ? segmentKindFree : ctx.segments.kind[segment] ?? -1;
    same(`segment ${segment} kind`, kind, rebuilt.segments.kind[segment] ?? -1);
    same(`segment ${segment} references`, refs, rebuilt.segments.refs[segment] ?? 0);
  }
  return problems;
}
