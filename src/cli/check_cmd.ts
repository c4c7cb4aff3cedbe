// `pcache check`: the offline structural checker (src/cache/cache_check.ts) on a cache device,
// opened read-only. Problems are inconsistencies (exit status 1); warnings are states a crash
// leaves behind normally (exit status 0). Refuses a device another process has open, whose log
// could change while it is read. With --repair it first rewrites damaged metadata copies from
// their valid twins (src/cache/cache_repair.ts), the only writes this command ever makes.

import { checkCacheDevice, type CheckReport } from '../cache/cache_check.js';
import { repairCacheDevice } from '../cache/cache_repair.js';
import { holdsPool } from '../cache/cache_pool.js';
import { checkPoolDevice, type PoolCheckReport } from '../cache/cache_pool_check.js';
import { PcacheError } from '../lib/errors.js';
import { FileDevice } from '../device/file_device.js';
import { exitFailure, exitOk, type CheckArgs } from './args.js';
import { refuseIfInUse } from './in_use.js';
import type { Terminal } from './terminal.js';

export async function checkCommand(args: CheckArgs, terminal: Terminal): Promise<number> {
  refuseIfInUse(args.cachePath, args.repair ? 'repair' : 'check');
  const device = await FileDevice.open(args.cachePath, { readOnly: !args.repair });
  if (await holdsPool(device)) return checkPool(device, args, terminal);
  let report: CheckReport;
  let repaired: string[] = [];
  try {
    if (args.repair) repaired = await repairCacheDevice(device);
    report = await checkCacheDevice(device);
  } finally {
    await device.close();
  }
  const ok = report.problems.length === 0;
  if (args.json) {
    const repairs = args.repair ? { repaired } : {};
    terminal.out(JSON.stringify({ cachePath: args.cachePath, ok, ...repairs, problems: report.problems, warnings: report.warnings, summary: report.summary ?? null }, null, 2));
  } else {
    for (const what of repaired) terminal.out(`repaired: ${what}`);
    if (args.repair && repaired.length === 0) terminal.out('repaired: nothing needed it');
    for (const problem of report.problems) terminal.out(`problem: ${problem}`);
    for (const warning of report.warnings) terminal.out(`warning: ${warning}`);
    const summary = report.summary;
    if (summary !== undefined) {
      terminal.out(
        `${args.cachePath}: ${summary.segmentCount} segments (${summary.logSegments} log, ${summary.dataSegments} data, ${summary.freeSegments} free), ` +
        `${summary.ksets} ksets, ${summary.keys} keys, ${summary.dirtyBytes} dirty bytes; log ends: ${summary.logEnd}`,
      );
    }
    terminal.out(ok ? `ok: no problems (${report.warnings.length} warnings)` : `${report.problems.length} problem(s) found`);
  }
  return ok ? exitOk : exitFailure;
}

/** A cache device of volumes: the pool's records, ownership, and every volume's cache. */
async function checkPool(device: FileDevice, args: CheckArgs, terminal: Terminal): Promise<number> {
  let report: PoolCheckReport;
  try {
    if (args.repair) throw new PcacheError('ENOTSUP', 'check --repair does not repair a cache device of volumes yet: check it without --repair');
    report = await checkPoolDevice(device);
  } finally {
    await device.close();
  }
  const ok = report.problems.length === 0;
  if (args.json) {
    const volumes = report.volumes.map((volume) => ({ name: volume.name, backing: volume.backing, segments: volume.segments, summary: volume.report.summary ?? null }));
    terminal.out(JSON.stringify({ cachePath: args.cachePath, ok, problems: report.problems, warnings: report.warnings, pool: report.pool ?? null, volumes }, null, 2));
    return ok ? exitOk : exitFailure;
  }
  for (const problem of report.problems) terminal.out(`problem: ${problem}`);
  for (const warning of report.warnings) terminal.out(`warning: ${warning}`);
  if (report.pool !== undefined) {
    terminal.out(`${args.cachePath}: volumes of one cache device, ${report.pool.segments} segments of ${report.pool.segmentSizeBytes} bytes (${report.pool.segmentsFree} free), volume table generation ${report.pool.tableGeneration}`);
  }
  for (const volume of report.volumes) {
    const summary = volume.report.summary;
    terminal.out(`  volume ${volume.name} (${volume.backing}): ${volume.segments} segments` +
      (summary === undefined ? '' : ` (${summary.logSegments} log, ${summary.dataSegments} data, ${summary.freeSegments} free), ${summary.keys} keys, ${summary.dirtyBytes} dirty bytes`));
  }
  terminal.out(ok ? `ok: no problems (${report.warnings.length} warnings)` : `${report.problems.length} problem(s) found`);
  return ok ? exitOk : exitFailure;
}
