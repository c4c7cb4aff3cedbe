// The offline check of a pool (cache_pool.ts): its superblock and volume table (both copies),
// unit ownership across the volumes, and each volume's share as a cache of its own
// (cache_check.ts), read through the same VolumeDevice the engine uses.
//
// Ownership is checked twice: the table's own validation refuses a unit owned twice, and no
// volume's cache may have more segments than the table gives it units (it would read or write
// another volume's units). A blank share (a format cut short) is reported as a warning: the
// server formats it again when it opens the volume.

import type { BlockDevice } from '../device/block_device.js';
import { isPcacheError } from '../lib/errors.js';
import { volumeUnits } from '../ondisk/volume_table.js';
import { checkCacheDevice, type CheckReport } from './cache_check.js';
import { probeDevice } from './cache_metadata.js';
import { CachePool } from './cache_pool.js';

export interface PoolCheckReport {
  readonly problems: string[];
  readonly warnings: string[];
  readonly pool: { readonly segments: number; readonly segmentSizeBytes: number; readonly segmentsFree: number; readonly tableGeneration: number } | undefined;
  readonly volumes: readonly { readonly name: string; readonly backing: string; readonly segments: number; readonly report: CheckReport }[];
}

export async function checkPoolDevice(device: BlockDevice): Promise<PoolCheckReport> {
  let pool: CachePool;
  try {
    pool = await CachePool.open(device);
  } catch (error) {
    if (!isPcacheError(error)) throw error;
    return { problems: [error.message], warnings: [], pool: undefined, volumes: [] };
  }
  const problems: string[] = [];
  // A damaged copy with a valid twin loses nothing yet; the next table change rewrites both.
  const warnings = pool.damage.map((damage) => `${damage} (the other copy is valid)`);
  const volumes: PoolCheckReport['volumes'][number][] = [];
  for (const entry of pool.table.volumes) {
    const share = pool.volumeDevice(entry);
    const units = volumeUnits(entry);
    if (await probeDevice(share) === 'blank') {
      warnings.push(`volume ${entry.name}: its share is blank (a resize was cut short after it was written back); the server formats it again when it opens the volume`);
      continue;
    }
    const report = await checkCacheDevice(share);
    for (const problem of report.problems) problems.push(`volume ${entry.name}: ${problem}`);
    for (const warning of report.warnings) warnings.push(`volume ${entry.name}: ${warning}`);
    // Fewer segments than units is what a resize cut short by a crash leaves (cache_pool.ts):
    // consistent, the rest unused. More would reach into units the volume does not own.
    const segments = report.summary?.segmentCount;
    if (segments !== undefined && segments > units) problems.push(`volume ${entry.name}: its cache has ${segments} segments, but the volume table gives it only ${units} units`);
    if (segments !== undefined && segments < units) warnings.push(`volume ${entry.name}: its cache uses ${segments} of its ${units} units (a resize was cut short; resize it again to use them)`);
    volumes.push({ name: entry.name, backing: entry.backing, segments: units, report });
  }
  return {
    problems,
    warnings,
    pool: { segments: pool.sb.unitCount, segmentSizeBytes: pool.segmentSizeBytes, segmentsFree: pool.freeUnitCount(), tableGeneration: pool.table.generation },
    volumes,
  };
}
