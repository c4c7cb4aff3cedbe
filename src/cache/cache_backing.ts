// The backing device's fingerprint: how pcache notices, at start, that something else changed
// its backing device while it was stopped.
//
// Clean cached copies are right only while pcache is the backing device's one writer. At a
// clean stop pcache records a fingerprint of the device (cache_info's backing_state 'clean');
// at the next start it takes one again and compares. A file describes itself exactly and
// cheaply — its size, device, inode and change times (BlockDevice.fingerprint) — and any write
// moves its times. Devices that cannot (block devices, NBD exports, memory) are sampled: their
// size and the CRCs of a fixed set of 4 KiB blocks spread over them, chosen from the cache's
// uuid. A sample misses changes outside its blocks; it catches a device replaced by another
// and the usual wholesale rewrites.
//
// The 16-byte record holds two 8-byte digests: the device's own description (or its sample,
// when it has none), compared at every start; and always the sample of its contents, compared
// instead when the operator declared the device a copy of the recorded one (serve
// --force-backing): a copied file has another inode and other change times, but a faithful
// copy has the same contents.

import { createHash } from 'node:crypto';
import { crc32c } from '../lib/crc32c.js';
import { KiB } from '../lib/units.js';
import type { BlockDevice } from '../device/block_device.js';
import { backingFingerprintBytes } from '../ondisk/cache_info.js';

/** Blocks read to fingerprint a device that cannot describe itself. */
export const fingerprintSampleBlocks = 16;
const sampleBlockBytes = 4 * KiB;

const halfBytes = backingFingerprintBytes / 2;

/** The backing device's fingerprint now: description digest, then sample digest (reads 16 blocks). */
export async function backingFingerprint(backing: BlockDevice, cacheUuid: Uint8Array): Promise<Uint8Array> {
  const sample = `sampled:${await sampledBlocks(backing, cacheUuid)}`;
  const description = (await backing.fingerprint?.()) ?? sample;
  const fingerprint = new Uint8Array(backingFingerprintBytes);
  fingerprint.set(digest(backing.sizeBytes, description), 0);
  fingerprint.set(digest(backing.sizeBytes, sample), halfBytes);
  return fingerprint;
}

/**
 * Whether two fingerprints describe the same device state. `asCopy`: the device is declared a
 * copy of the recorded one, so only the contents' sample can match.
 */
export function sameFingerprint(recorded: Uint8Array, now: Uint8Array, asCopy: boolean): boolean {
  const from = asCopy ? halfBytes : 0;
  const to = asCopy ? backingFingerprintBytes : halfBytes;
  return Buffer.from(recorded.subarray(from, to)).equals(now.subarray(from, to));
}

function digest(sizeBytes: number, description: string): Uint8Array {
  return createHash('sha256').update(`size=${sizeBytes};${description}`).digest().subarray(0, halfBytes);
}

/** CRCs of the first and last blocks and of blocks picked from the uuid in between. */
async function sampledBlocks(backing: BlockDevice, cacheUuid: Uint8Array): Promise<string> {
  const blocks = Math.floor(backing.sizeBytes / sampleBlockBytes);
  if (blocks === 0) return 'empty';
  const picks = new Set<number>([0, blocks - 1]);
  for (let index = 0; picks.size < Math.min(fingerprintSampleBlocks, blocks) && index < 4 * fingerprintSampleBlocks; index++) {
    picks.add(crc32c(Uint8Array.of(index), crc32c(cacheUuid)) % blocks);
  }
  const buffer = new Uint8Array(sampleBlockBytes);
  const crcs: string[] = [];
  for (const block of [...picks].sort((a, b) => a - b)) {
    await backing.read(buffer, block * sampleBlockBytes);
    crcs.push(`${block}:${crc32c(buffer).toString(16)}`);
  }
  return crcs.join(',');
}
