// `pcache volume add|list|remove`: the volumes of a running server, through its control socket
// (control_api.ts's /volumes routes).

import { PcacheError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { exitOk } from './args.js';
import type { VolumeArgs } from './args_volume.js';
import { controlRequest } from './control_client.js';
import type { Terminal } from './terminal.js';

export async function volumeCommand(args: VolumeArgs, terminal: Terminal): Promise<number> {
  if (args.action === 'list') {
    const volumes = await controlRequest(args.controlPath, 'volumes');
    if (!Array.isArray(volumes)) throw new PcacheError('EIO', `${args.controlPath} answered volume list with something unexpected`);
    terminal.out(args.json ? JSON.stringify(volumes) : table(volumes as Record<string, unknown>[]));
    return exitOk;
  }
  if (args.action === 'add') {
    const body = { name: args.name, backing: args.backing, cacheSizeBytes: args.cacheSizeBytes, dataCrc: args.dataCrc, ...(args.gcPercent === undefined ? {} : { gcPercent: args.gcPercent }) };
    // Formatting a share writes its segment headers: seconds for a large one.
    const added = await controlRequest(args.controlPath, 'volumeAdd', { body, timeoutMs: undefined }) as Record<string, unknown>;
    terminal.out(args.json ? JSON.stringify(added) : `added volume ${args.name}: ${args.backing} with ${formatSize(Number(added.shareBytes ?? 0))} of cache, exported at ${typeof added.uri === 'string' ? added.uri : '?'}`);
    return exitOk;
  }
  if (args.action === 'resize') {
    const resized = await controlRequest(args.controlPath, 'volumeResize', { body: { name: args.name, cacheSizeBytes: args.cacheSizeBytes }, timeoutMs: undefined }) as Record<string, unknown>;
    terminal.out(args.json ? JSON.stringify(resized) : `resized volume ${args.name}: its share is ${formatSize(Number(resized.shareBytes ?? 0))} (everything was written back; it starts with nothing cached)`);
    return exitOk;
  }
  const removed = await controlRequest(args.controlPath, 'volumeRemove', { body: { name: args.name, drain: args.drain, disconnect: args.disconnect }, timeoutMs: undefined }) as Record<string, unknown>;
  terminal.out(args.json ? JSON.stringify(removed) : `removed volume ${args.name}: ${formatSize(Number(removed.freedBytes ?? 0))} of the cache device are free again`);
  return exitOk;
}

function table(volumes: readonly Record<string, unknown>[]): string {
  if (volumes.length === 0) return 'no volumes (add one with: pcache volume add --control PATH --name NAME --backing PATH --cache-size SIZE)';
  const text = (value: unknown): string => (typeof value === 'string' || typeof value === 'number' ? String(value) : '-');
  const rows = [['NAME', 'STATE', 'SHARE', 'USED', 'DIRTY', 'HITS', 'MISSES', 'CLIENTS', 'BACKING', 'URI']];
  for (const volume of volumes) {
    rows.push([
      text(volume.name), text(volume.state), formatSize(Number(volume.shareBytes ?? 0)), `${text(volume.segmentsUsed)}/${text(volume.segments)}`,
      volume.dirtyBytes === null ? '-' : formatSize(Number(volume.dirtyBytes)), text(volume.readHits), text(volume.readMisses), text(volume.connections), text(volume.backing), text(volume.uri),
    ]);
  }
  const widths = (rows[0] ?? []).map((_, column) => Math.max(...rows.map((row) => (row[column] ?? '').length)));
  const lines = rows.map((row) => row.map((cell, column) => cell.padEnd(widths[column] ?? 0)).join('  ').trimEnd());
  const failed = volumes.filter((volume) => volume.failure !== null && volume.failure !== undefined);
  return [...lines, ...failed.map((volume) => `${text(volume.name)} failed: ${text(volume.failure)}`)].join('\n');
}
