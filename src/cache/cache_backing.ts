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
// and the usual wholesale rewrites. The fingerprint is a 16-byte digest, so any length of
// description fits the record.

import { createHash } from 'node:crypto';
import { crc32c } from '../lib/crc32c.js';
import { KiB } from '../lib/units.js';
import type { BlockDevice } from '../device/block_device.js';
import { backingFingerprintBytes } from '../ondisk/cache_info.js';

/** Blocks read to fingerprint a device that cannot describe itself. */
export const fingerprintSampleBlocks = 16;
const sampleBlockBytes = 4 * KiB;

/** The backing device's fingerprint now (reads a few blocks of a device that has no description of its own). */
export async function backingFingerprint(backing: BlockDevice, cacheUuid: Uint8Array): Promise<Uint8Array> {
  const description = (await backing.fingerprint?.()) ?? `sampled:${await sampledBlocks(backing, cacheUuid)}`;
  return createHash('sha256').update(`size=${backing.sizeBytes};${description}`).digest().subarray(0, backingFingerprintBytes);
}

export function sameFingerprint(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a).equals(Buffer.from(b));
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
