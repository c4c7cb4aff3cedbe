// Repairing metadata copies offline (`pcache check --repair`): a record with one valid copy
// gets its other copy rewritten from it.
//
// Every small record is stored twice, in different 4 KiB blocks (version 2), so the loss of one
// block leaves each record readable; but the next loss of the other copy's block would not.
// Repair restores the redundancy: for the superblock, cache_info, key_tail, dirty_tail and each
// segment's seg_info and generation, a copy that fails its checks (or was never written) is
// rewritten with the value of the valid one, under the same seq, then the device is synced.
// Nothing is guessed: a record with no valid copy is left alone (the checker reports it), and a
// valid copy is never written. Each repair is one write of one copy, so a crash during repair
// leaves the valid copy as it was.

import { isPcacheError } from '../lib/errors.js';
import type { BlockDevice } from '../device/block_device.js';
import { encodeCacheInfo } from '../ondisk/cache_info.js';
import { encodeCachePos } from '../ondisk/cache_pos.js';
import { blockBytes, cacheInfoOffsetsBytes, lastBlockOffsetBytes, layoutFor, segmentInfoOffsetsBytes, segmentOffsetBytes, superblockOffsetBytes } from '../ondisk/layout.js';
import type { DualCopyChoice } from '../ondisk/meta_header.js';
import { encodeSegmentGen } from '../ondisk/segment_gen.js';
import { encodeSegmentInfo } from '../ondisk/segment_info.js';
import { encodeSuperblock } from '../ondisk/superblock.js';
import { readCacheMetadata, type CacheMetadata } from './cache_metadata.js';

/**
 * Rewrites every damaged copy that has a valid twin; returns what was rewritten (empty: nothing
 * needed it, or the metadata cannot be read at all, which the checker then reports).
 */
export async function repairCacheDevice(device: BlockDevice): Promise<string[]> {
  let metadata: CacheMetadata;
  try {
    metadata = await readCacheMetadata(device);
  } catch (error) {
    if (isPcacheError(error) && (error.code === 'CORRUPT' || error.code === 'FOREIGN')) return [];
    throw error;
  }
  const { sb } = metadata;
  const version = sb.formatVersion;
  const layout = layoutFor(version);
  const repaired: string[] = [];
  const write = async (what: string, bytes: Uint8Array, at: number): Promise<void> => {
    await device.write(bytes, at);
    repaired.push(what);
  };
  for (const copy of metadata.superblockBadCopies) {
    const area = new Uint8Array(blockBytes);
    area.set(encodeSuperblock(sb));
    await write(`superblock copy ${copy}`, area, copy === 0 ? superblockOffsetBytes : lastBlockOffsetBytes(device.sizeBytes));
  }
  const pair = async <T>(name: string, choice: DualCopyChoice<T>, offsets: readonly [number, number], encode: (value: T, seq: number) => Uint8Array): Promise<void> => {
    if (choice.value === undefined) return;
    for (const copy of [0, 1] as const) {
      if (choice.copiesValid[copy]) continue;
      await write(`${name} copy ${copy}`, encode(choice.value, choice.latestSeq), offsets[copy]);
    }
  };
  await pair('cache_info', metadata.cacheInfo, cacheInfoOffsetsBytes, (value, seq) => encodeCacheInfo(value, seq, version));
  await pair('key_tail', metadata.keyTail, layout.keyTailOffsetsBytes, (value, seq) => encodeCachePos(value, seq, version));
  await pair('dirty_tail', metadata.dirtyTail, layout.dirtyTailOffsetsBytes, (value, seq) => encodeCachePos(value, seq, version));
  for (let segment = 0; segment < sb.segmentCount; segment++) {
    const start = segmentOffsetBytes(segment, sb.segmentSizeBytes);
    const at = (offsets: readonly [number, number]): [number, number] => [start + offsets[0], start + offsets[1]];
    const info = metadata.segmentInfos[segment];
    const gen = metadata.gens[segment];
    if (info !== undefined) await pair(`segment ${segment} seg_info`, info, at(segmentInfoOffsetsBytes), (value, seq) => encodeSegmentInfo(value, seq, version));
    if (gen !== undefined) await pair(`segment ${segment} gen`, gen, at(layout.segmentGenOffsetsBytes), (value, seq) => encodeSegmentGen(value, seq, version));
  }
  if (repaired.length > 0) await device.sync();
  return repaired;
}
