// The offline check of a pool (cache_pool.ts): its superblock and volume table (both copies),
// unit ownership across the volumes, and each volume's share as a cache of its own
// (cache_check.ts), read through the same VolumeDevice the engine uses.
//
// Ownership is checked twice: the table's own validation refuses a unit owned twice, and each
// volume's cache must have exactly as many segments as the table gives it units (a share that
// disagrees with the table would make the engine read or write another volume's units).

import type { BlockDevice } from '../device/block_device.js';
import { isPcacheError } from '../lib/errors.js';
import { volumeUnits } from '../ondisk/volume_table.js';
import { checkCacheDevice, type CheckReport } from './cache_check.js';
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
    const report = await checkCacheDevice(pool.volumeDevice(entry));
    const units = volumeUnits(entry);
    for (const problem of report.problems) problems.push(`volume ${entry.name}: ${problem}`);
    for (const warning of report.warnings) warnings.push(`volume ${entry.name}: ${warning}`);
    if (report.summary !== undefined && report.summary.segmentCount !== units) {
      problems.push(`volume ${entry.name}: its cache has ${report.summary.segmentCount} segments, but the volume table gives it ${units} units`);
    }
    volumes.push({ name: entry.name, backing: entry.backing, segments: units, report });
  }
  return {
    problems,
    warnings,
    pool: { segments: pool.sb.unitCount, segmentSizeBytes: pool.segmentSizeBytes, segmentsFree: pool.freeUnitCount(), tableGeneration: pool.table.generation },
    volumes,
  };
}
