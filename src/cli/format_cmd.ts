// `pcache format`: writes a fresh cache onto a device, and refuses anything it could destroy.
//
// What the device holds decides, before a single byte is written:
//
//   device holds                        without --force   --force     --force --discard-dirty
//   blank (first 8 KiB zero)            format            format      format
//   something that is not pcache        refuse            format      format
//   a pcache cache, nothing dirty       refuse            format      format
//   a pcache cache with dirty data      refuse            refuse (*)  format
//   a pcache cache too damaged to read  refuse            refuse (*)  format
//   anything, open in another process   refuse            refuse      refuse
//
// (*) The message gives the dirty byte count (or says it is unknown) and how to drain first:
// forcing never silently discards data the backing device does not have yet.

import fs from 'node:fs';
import { Cache } from '../cache/cache.js';
import { checkCacheDevice } from '../cache/cache_check.js';
import { pcacheRecordsFound, probeDevice, type FormatOptions } from '../cache/cache_metadata.js';
import { FileDevice } from '../device/file_device.js';
import { PcacheError } from '../lib/errors.js';
import { NbdRemoteDevice } from '../nbd/client/remote_device.js';
import { formatSize } from '../lib/units.js';
import { exitOk, type FormatArgs } from './args.js';
import { describeDevice, ensureDeviceFile, sizeFlagIgnored } from './devices.js';
import { refuseIfInUse } from './in_use.js';
import type { Terminal } from './terminal.js';

export async function formatCommand(args: FormatArgs, terminal: Terminal): Promise<number> {
  // The backing device opens first: a wrong backing path must not leave a new cache file
  // behind. Only its size and identity are read (an NBD export: one connection).
  const backing = args.backingIsUri
    ? await NbdRemoteDevice.open(args.backingPath, { connections: 1, readOnly: true, reconnect: { attemptsMax: 0 } })
    : await FileDevice.open(args.backingPath, { readOnly: true });
  let created = false;
  try {
    const ignored = sizeFlagIgnored(args.cachePath, args.cacheSizeBytes, '--cache-size');
    if (ignored !== undefined) terminal.err(`pcache: ${ignored}`);
    created = ensureDeviceFile(args.cachePath, args.cacheSizeBytes, '--cache-size');
    refuseIfInUse(args.cachePath, 'format');
    const device = await FileDevice.open(args.cachePath);
    try {
      const refusal = await refusalFor(device, args);
      if (refusal !== undefined) throw new PcacheError('FOREIGN', refusal);
      const options: FormatOptions = { dataCrc: args.dataCrc };
      if (args.segmentSizeBytes !== undefined) options.segmentSizeBytes = args.segmentSizeBytes;
      if (args.gcPercent !== undefined) options.gcPercent = args.gcPercent;
      await Cache.format(device, backing, options);
      const summary = (await checkCacheDevice(device)).summary;
      if (summary === undefined) throw new PcacheError('EIO', `${args.cachePath} does not read back as a cache after formatting`);
      terminal.out(
        `formatted ${describeDevice(args.cachePath, device.sizeBytes)}: ${summary.segmentCount} segments of ${formatSize(summary.segmentSizeBytes)}, ` +
        `gc_percent ${summary.gcPercent}${summary.dataCrc ? ', data CRC' : ''}, for backing device ${describeDevice(args.backingPath, backing.sizeBytes)}; ` +
        `cache uuid ${summary.cacheUuid}`,
      );
    } finally {
      await device.close();
    }
  } catch (error) {
    // A cache file this command created holds nothing of anyone's: a failed format removes it.
    if (created) fs.rmSync(args.cachePath, { force: true });
    throw error;
  } finally {
    await backing.close();
  }
  return exitOk;
}

/** Why `device` must not be formatted with these flags, or undefined when it may. */
async function refusalFor(device: FileDevice, args: FormatArgs): Promise<string | undefined> {
  const path = args.cachePath;
  const contents = await probeDevice(device);
  if (contents === 'blank') return undefined;
  if (contents === 'other') {
    // No superblock copy is readable, but other pcache records may be: then this is a damaged
    // cache that may hold data not yet written back, never something foreign.
    const found = await pcacheRecordsFound(device);
    if (found.length === 0) {
      return args.force ? undefined : `${path} is not blank and is not a pcache cache; refusing to overwrite it (add --force if its contents may go)`;
    }
    if (!args.force) return `${path} holds a damaged pcache cache (no readable superblock; found ${found.join(', ')}); refusing to overwrite it`;
    if (args.discardDirty) return undefined;
    return `${path} holds a damaged pcache cache (no readable superblock; found ${found.join(', ')}), so it may hold dirty data; ` +
      '`pcache check` explains; add --discard-dirty to overwrite it anyway';
  }
  if (!args.force) return `${path} already holds a pcache cache; refusing to overwrite it (add --force to replace it)`;
  if (args.discardDirty) return undefined;
  const report = await checkCacheDevice(device);
  if (report.summary === undefined) {
    return `${path} holds a pcache cache that cannot be read (${report.problems[0] ?? 'unknown damage'}), so it may hold dirty data; add --discard-dirty to overwrite it anyway`;
  }
  const dirtyBytes = report.summary.dirtyBytes;
  if (dirtyBytes === 0) return undefined;
  return `${path} holds ${dirtyBytes} bytes (${formatSize(dirtyBytes)}) of dirty data not yet written back to its backing device; ` +
    'drain it first (pcache serve --control SOCKET, then pcache drain --control SOCKET), or add --discard-dirty to lose it';
}
