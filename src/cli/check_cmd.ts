// `pcache check`: the offline structural checker (src/cache/cache_check.ts) on a cache device,
// opened read-only. Problems are inconsistencies (exit status 1); warnings are states a crash
// leaves behind normally (exit status 0). Refuses a device another process has open, whose log
// could change while it is read. With --repair it first rewrites damaged metadata copies from
// their valid twins (src/cache/cache_repair.ts), the only writes this command ever makes.

import { checkCacheDevice, type CheckReport } from '../cache/cache_check.js';
import { repairCacheDevice } from '../cache/cache_repair.js';
import { FileDevice } from '../device/file_device.js';
import { exitFailure, exitOk, type CheckArgs } from './args.js';
import { refuseIfInUse } from './in_use.js';
import type { Terminal } from './terminal.js';

export async function checkCommand(args: CheckArgs, terminal: Terminal): Promise<number> {
  refuseIfInUse(args.cachePath, args.repair ? 'repair' : 'check');
  const device = await FileDevice.open(args.cachePath, { readOnly: !args.repair });
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
