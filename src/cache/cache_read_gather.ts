// Fragmented reads: whether a large read is cheaper as one backing read with the pieces not yet
// written back copied over it, and which pieces those are.
//
// Data laid down by random 4 KiB writes is cached in 4 KiB pieces scattered over the log, so a
// 1 MiB read costs 256 reads of the cache device (a profile of 1 MiB reads at QD8 spent nearly
// all the server's time in those preads: docs/performance.md, "Fragmented reads"). Once
// writeback has passed those pieces the backing device holds the same bytes, and one large
// backing read (on the thread pool, off the event loop) replaces them. The read path
// (cache_read.ts) asks planGather, and when there is a plan serves the read with gatherRead.
//
// A piece is clean when its key is CLEAN (a fill) or when every dirty key into its segment is in
// a kset that dirty_tail has passed (SegmentTable.dirtySeq < dirty_tail's seq). The plan is made
// in one synchronous pass over the index, so it describes one instant: the backing device then
// held every clean piece's bytes, and only writeback of keys newer than the plan (writes that
// came after the read began, which a concurrent read need not see) can change them. Pieces that
// are not clean, and ZERO keys, are the overlay. A gap, a placeholder (EMPTY) or a stale key in
// the request means no plan: the ordinary walk reads misses, fills them and removes stale keys.

import { isPcacheError } from '../lib/errors.js';
import { keyFlagClean, keyFlagEmpty, keyFlagZero } from '../ondisk/kset.js';
import type { CacheContext } from './cache_context.js';
import { subtreeEnd } from './cache_tree.js';

/** Reads smaller than this always take the ordinary walk (4 KiB hits must not pay for a plan). */
export const gatherRequestBytesMin = 64 * 1024;
/** A plan overlays at most this many pieces; a read with more takes the ordinary walk. */
export const gatherOverlayPiecesMax = 64;

/**
 * Whether a cached data piece (its key's flags and segment) is written back: a CLEAN key, or any
 * key into a segment whose newest dirty key is in a kset dirty_tail has passed (see the file
 * comment). The read walk asks it too (cache_read_rewrite.ts counts the pieces not written back).
 */
export function writtenBack(ctx: CacheContext, flags: number, segment: number): boolean {
  return (flags & keyFlagClean) !== 0 || (ctx.segments.dirtySeq[segment] ?? 0) < ctx.dirtyTail.seq;
}

/** A part of the request that is copied from the cache (or zeroed) over the backing read. */
export interface OverlayPiece {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  /** A ZERO key: zeroes, no I/O. */
  readonly zero: boolean;
  readonly segment: number;
  readonly segmentOffsetBytes: number;
  readonly genLow32: number;
}

/**
 * The overlay for reading [offsetBytes, offsetBytes + lengthBytes) from the backing device, or
 * undefined when the ordinary walk should serve it: the read is small, part of it is not cached,
 * fewer than `cleanPiecesMin` of its pieces are clean, or more than gatherOverlayPiecesMax are not.
 */
export function planGather(ctx: CacheContext, offsetBytes: number, lengthBytes: number, cleanPiecesMin: number): OverlayPiece[] | undefined {
  if (cleanPiecesMin <= 0 || lengthBytes < gatherRequestBytesMin || ctx.dataCrc || ctx.backingOfflineSinceMs !== undefined) return undefined;
  const segments = ctx.segments;
  const overlay: OverlayPiece[] = [];
  let cleanPieces = 0;
  const endBytes = offsetBytes + lengthBytes;
  for (let position = offsetBytes; position < endBytes;) {
    const end = Math.min(endBytes, subtreeEnd(position));
    const subtree = ctx.index.subtree(position, false);
    if (subtree === undefined) return undefined;
    for (let index = subtree.seek(position); position < end; index++) {
      if (index >= subtree.count || subtree.start(index) > position) return undefined; // a gap
      const pieceEnd = Math.min(subtree.end(index), end);
      const flags = subtree.flags(index);
      if ((flags & keyFlagEmpty) !== 0) return undefined;
      const segment = subtree.segment(index);
      const zero = (flags & keyFlagZero) !== 0;
      if (!zero && segments.genLow32(segment) !== subtree.genLow32(index)) return undefined; // stale
      if (!zero && writtenBack(ctx, flags, segment)) {
        cleanPieces++;
      } else {
        if (overlay.length === gatherOverlayPiecesMax) return undefined;
        overlay.push({
          offsetBytes: position, lengthBytes: pieceEnd - position, zero, segment,
          segmentOffsetBytes: subtree.segmentOffset(index) + (position - subtree.start(index)), genLow32: subtree.genLow32(index),
        });
      }
      position = pieceEnd;
    }
  }
  return cleanPieces >= cleanPiecesMin ? overlay : undefined;
}

/**
 * Serves a planned read: one backing read of the whole request, then the overlay's pieces copied
 * over it from the cache (ZERO pieces zeroed). An overlay piece whose segment was freed meanwhile
 * had been written back first, so the backing device holds it (read again: it may have landed
 * after our read). If the backing read fails, `walk` (the ordinary read) serves the request from
 * the cache alone.
 */
export async function gatherRead(
  ctx: CacheContext, target: Uint8Array, request: number, overlay: readonly OverlayPiece[], walk: () => Promise<void> | undefined,
): Promise<void> {
  try {
    await ctx.backing.read(target, request);
  } catch (error) {
    if (!isPcacheError(error)) throw error;
    ctx.stats.backingReadErrors++;
    if (error.code === 'ENODEV') ctx.backingOffline(error.message);
    const io = walk();
    if (io !== undefined) await io;
    return;
  }
  ctx.stats.readGathers++;
  ctx.stats.readHitRequests++;
  ctx.stats.readHitBytes += target.length;
  let reads: Promise<void>[] | undefined;
  let pending: OverlayPiece[] | undefined;
  for (const piece of overlay) {
    const part = target.subarray(piece.offsetBytes - request, piece.offsetBytes - request + piece.lengthBytes);
    if (piece.zero) part.fill(0);
    else if (ctx.segments.genLow32(piece.segment) !== piece.genLow32) (reads ??= []).push(ctx.backing.read(part, piece.offsetBytes));
    else {
      const io = ctx.dev.readData(part, piece.segment, piece.segmentOffsetBytes);
      if (io === undefined) continue;
      (reads ??= []).push(io);
      (pending ??= []).push(piece);
    }
  }
  if (reads !== undefined) await Promise.all(reads);
  // A piece read asynchronously is checked again, as the ordinary walk checks its hits.
  for (const piece of pending ?? []) {
    if (ctx.segments.genLow32(piece.segment) === piece.genLow32) continue;
    await ctx.backing.read(target.subarray(piece.offsetBytes - request, piece.offsetBytes - request + piece.lengthBytes), piece.offsetBytes);
  }
}
