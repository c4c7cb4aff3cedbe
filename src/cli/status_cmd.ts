// `pcache status`: a cache's state, from a running server (--control) or from an idle cache
// device (--cache, read-only, through the structural checker).
//
// Both sources produce the same shape, so scripts need one parser:
//   { source: 'server' | 'device', dmStatusLine, cache: { <dm-pcache's nine fields>, state,
//     dirtyBytes, ... }, ... }
// The table starts with dm-pcache's nine fields in dm-pcache's order (sb_flags seg_total
// cache_segs segs_used gc_percent cache_flags key_head dirty_tail key_tail), then the rest.
// Offline, the device must be idle: a device another process has open is refused, because its
// log could change while it is read (ask that server with --control instead).

import { checkCacheDevice } from '../cache/cache_check.js';
import { probeDevice } from '../cache/cache_metadata.js';
import { FileDevice } from '../device/file_device.js';
import { PcacheError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { cacheInfoFlagDataCrc, cacheInfoFlagInitDone, cacheModes } from '../ondisk/cache_info.js';
import { exitOk, type StatusArgs } from './args.js';
import { controlRequest } from './control_client.js';
import { refuseIfInUse } from './in_use.js';
import type { Terminal } from './terminal.js';

/** dm-pcache's status fields, in its order, with the names its documentation uses. */
const dmFields = [
  ['sb_flags', 'sbFlags'], ['seg_total', 'segTotal'], ['cache_segs', 'cacheSegs'], ['segs_used', 'segsUsed'],
  ['gc_percent', 'gcPercent'], ['cache_flags', 'cacheFlags'], ['key_head', 'keyHead'], ['dirty_tail', 'dirtyTail'],
  ['key_tail', 'keyTail'],
] as const;

type Fields = Record<string, unknown>;

export async function statusCommand(args: StatusArgs, terminal: Terminal): Promise<number> {
  const report = 'controlPath' in args ? await serverStatus(args.controlPath) : await deviceStatus(args.cachePath);
  terminal.out(args.json ? JSON.stringify(report, null, 2) : table(report));
  return exitOk;
}

async function serverStatus(controlPath: string): Promise<Fields> {
  const result = await controlRequest(controlPath, 'status');
  if (typeof result !== 'object' || result === null) throw new PcacheError('EIO', `${controlPath} answered status with something that is not an object`);
  return { source: 'server', ...result };
}

async function deviceStatus(cachePath: string): Promise<Fields> {
  refuseIfInUse(cachePath, 'read the status of');
  const device = await FileDevice.open(cachePath, { readOnly: true });
  try {
    const contents = await probeDevice(device);
    if (contents !== 'pcache') throw new PcacheError('FOREIGN', `${cachePath} holds no pcache cache (it is ${contents === 'blank' ? 'blank' : 'something else'})`);
    const report = await checkCacheDevice(device);
    const summary = report.summary;
    if (summary === undefined) throw new PcacheError('CORRUPT', `${cachePath}: cannot read the cache: ${report.problems.join('; ')}`);
    const flags = (summary.dataCrc ? cacheInfoFlagDataCrc : 0) | cacheInfoFlagInitDone | (cacheModes.indexOf(summary.mode) << 2) | (summary.gcPercent << 6);
    const cache = {
      sbFlags: 0,
      segTotal: summary.segmentCount,
      cacheSegs: summary.segmentCount,
      segsUsed: summary.logSegments + summary.dataSegments,
      gcPercent: summary.gcPercent,
      cacheFlags: flags,
      keyHead: summary.keyHead,
      dirtyTail: summary.dirtyTail,
      keyTail: summary.keyTail,
      state: 'stopped',
      mode: summary.mode,
      formatVersion: summary.formatVersion,
      dataCrc: summary.dataCrc,
      cacheUuid: summary.cacheUuid,
      segmentSizeBytes: summary.segmentSizeBytes,
      backingSizeBytes: summary.backingSizeBytes,
      backingIdentity: summary.backingIdentity,
      dirtyBytes: summary.dirtyBytes,
      indexKeys: summary.keys,
      ksets: summary.ksets,
      logSegments: summary.logSegments,
      dataSegments: summary.dataSegments,
      freeSegments: summary.freeSegments,
      logEnd: summary.logEnd,
    };
    const line = dmFields.map(([, key]) => (key === 'sbFlags' || key === 'cacheFlags' ? cache[key].toString(16) : String(cache[key]))).join(' ');
    return { source: 'device', cachePath, dmStatusLine: line, cache, problems: report.problems, warnings: report.warnings };
  } finally {
    await device.close();
  }
}

function table(report: Fields): string {
  const rows: [string, string][] = [];
  const cache = report.cache as Fields | null | undefined;
  if (report.source === 'server') {
    rows.push(['server', `pid ${String(report.pid)}, up ${Math.round(Number(report.uptimeMs) / 1000)} s, ${String(report.uri)}`]);
  } else {
    rows.push(['device', String(report.cachePath)]);
  }
  const volumes = report.volumes as Fields[] | undefined;
  if (volumes !== undefined) return render([...rows, ...volumeRows(report, volumes)]);
  if (cache === null || cache === undefined) {
    rows.push(['cache', 'none (served with --no-cache)']);
    return render(rows);
  }
  for (const [name, key] of dmFields) {
    const value = cache[key];
    rows.push([name, key === 'sbFlags' || key === 'cacheFlags' ? `0x${Number(value).toString(16)}` : String(value)]);
  }
  rows.push(['dm status line', String(report.dmStatusLine)]);
  const reason = cache.stateReason;
  rows.push(['state', `${String(cache.state)}${typeof reason === 'string' ? ` (${reason})` : ''}`]);
  rows.push(['mode', String(cache.mode)]);
  rows.push(['dirty', bytes(cache.dirtyBytes)]);
  if (report.source === 'server') rows.push(...serverRows(report, cache));
  rows.push(['segment size', bytes(cache.segmentSizeBytes)]);
  rows.push(['backing size', bytes(cache.backingSizeBytes)]);
  rows.push(['data crc', String(cache.dataCrc)]);
  rows.push(['cache uuid', String(cache.cacheUuid)]);
  rows.push(['index keys', String(cache.indexKeys)]);
  const counters = cache.counters as Fields | undefined;
  if (counters !== undefined) {
    for (const [name, value] of Object.entries(counters)) rows.push([name, String(value)]);
  }
  const nbd = report.nbd as Fields | undefined;
  if (nbd !== undefined) {
    for (const [name, value] of Object.entries(nbd)) rows.push([`nbd ${name}`, String(value)]);
  }
  const problems = report.problems as string[] | undefined;
  for (const problem of problems ?? []) rows.push(['problem', problem]);
  return render(rows);
}

/** A server of volumes: the pool, then each volume's state, share, dirty bytes, reads and writeback. */
function volumeRows(report: Fields, volumes: readonly Fields[]): [string, string][] {
  const pool = (report.pool ?? {}) as Fields;
  const rows: [string, string][] = [['pool', `${String(report.cachePath)}: ${String(pool.segments)} segments of ${formatSize(Number(pool.segmentSizeBytes))}, ${formatSize(Number(pool.freeBytes))} free, volume table generation ${String(pool.tableGeneration)}`]];
  if (volumes.length === 0) rows.push(['volumes', 'none (pcache volume add)']);
  for (const volume of volumes) {
    const name = `volume ${String(volume.name)}`;
    if (volume.failure !== null && volume.failure !== undefined) {
      rows.push([name, `failed: ${typeof volume.failure === 'string' ? volume.failure : 'unknown'}`]);
      continue;
    }
    const cache = (volume.cache ?? {}) as Fields;
    rows.push([name, `${String(volume.state)}, ${String(cache.mode)}, share ${formatSize(Number(volume.shareBytes))} (${String(volume.segmentsUsed)}/${String(volume.segments)} segments used), ` +
      `${formatSize(Number(volume.dirtyBytes))} dirty, ${String(volume.connections)} clients; ${String(volume.backing)}; ${String(volume.uri)}`]);
    for (const [what, value] of serverRows({ backingPath: volume.backing, backingRemote: null }, cache).filter(([row]) => row !== 'backing')) rows.push([`  ${what}`, value]);
  }
  return rows;
}

/** Backing device, reads, writeback and errors of a running server, one line each. */
function serverRows(report: Fields, cache: Fields): [string, string][] {
  const rows: [string, string][] = [];
  const remote = report.backingRemote as { connectionsConnected?: number; connectionsWanted?: number; offlineSince?: string; lastError?: string } | null | undefined;
  let backing = String(report.backingPath);
  if (remote !== null && remote !== undefined) {
    backing += remote.offlineSince === undefined
      ? `, ${String(remote.connectionsConnected)}/${String(remote.connectionsWanted)} connections`
      : `, offline since ${remote.offlineSince}${remote.lastError === undefined ? '' : ` (${remote.lastError})`}`;
  }
  rows.push(['backing', backing]);
  const counters = (cache.counters ?? {}) as Record<string, number | undefined>;
  const reads = counters.readRequests ?? 0;
  const hits = counters.readHitRequests ?? 0;
  const ratio = reads === 0 ? '' : ` (${((100 * hits) / reads).toFixed(1)}%)`;
  rows.push(['reads', `${reads} requests: ${hits} hits${ratio}, ${counters.readMissRequests ?? 0} misses; ` +
    `${formatSize(counters.readHitBytes ?? 0)} of hits (${counters.readGathers ?? 0} fragmented ones gathered from the backing device, ${counters.threadReadBatches ?? 0} read in pieces off the event loop, ${counters.fragmentRewrites ?? 0} stored again as one piece), ${formatSize(counters.readMissBytes ?? 0)} of misses`]);
  rows.push(['policy', `${counters.bypassCutoffRequests ?? 0} requests past the sequential cutoff (${formatSize(counters.bypassCutoffBytes ?? 0)}), ` +
    `${counters.bypassModeRequests ?? 0} past the cache by the mode (${formatSize(counters.bypassModeBytes ?? 0)}), ${counters.bypassFallbacks ?? 0} cached over dirty data; ` +
    `fills ${counters.fillsStored ?? 0} admitted, ${(counters.fillsSkipped ?? 0) + (counters.fillsNotAdmitted ?? 0)} rejected`]);
  const writeback = (cache.writeback ?? {}) as { active?: boolean; lastError?: string; oldestDirtyAgeMs?: number; backoffMs?: number };
  const age = writeback.oldestDirtyAgeMs === undefined ? 'nothing dirty' : `oldest dirty data ${(writeback.oldestDirtyAgeMs / 1000).toFixed(1)} s old`;
  const failing = writeback.lastError === undefined ? '' : `; failing: ${writeback.lastError}`;
  rows.push(['writeback', `${writeback.active === true ? 'running' : 'idle'}, ${age}, ${formatSize(counters.writebackBytes ?? 0)} written back${failing}`]);
  const errorNames = ['cacheIoErrors', 'backingReadErrors', 'backingWriteErrors', 'dataCrcErrors', 'writebackErrors', 'gcErrors'];
  const errors = errorNames.filter((name) => (counters[name] ?? 0) > 0).map((name) => `${name} ${String(counters[name])}`);
  rows.push(['errors', errors.length === 0 ? 'none' : errors.join(', ')]);
  return rows;
}

function bytes(value: unknown): string {
  const count = Number(value);
  return `${formatSize(count)} (${count} bytes)`;
}

function render(rows: [string, string][]): string {
  const width = Math.max(...rows.map(([name]) => name.length));
  return rows.map(([name, value]) => `${name.padEnd(width)}  ${value}`).join('\n');
}
