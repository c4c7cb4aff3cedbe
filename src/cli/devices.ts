// Device files for the commands: creating a missing file on request and describing devices
// in messages. Opening itself is FileDevice's job (src/device/file_device.ts).

import fs from 'node:fs';
import { PcacheError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { FileDevice } from '../device/file_device.js';

/**
 * Makes sure `path` exists: an existing file or device is left alone; a missing one is created
 * as a sparse file of `createBytes`, or refused (naming `sizeFlag`) when no size was given.
 * Returns whether the file was created.
 */
export function ensureDeviceFile(path: string, createBytes: number | undefined, sizeFlag: string): boolean {
  if (fs.existsSync(path)) return false;
  if (createBytes === undefined) throw new PcacheError('ENODEV', `${path} does not exist (give ${sizeFlag} SIZE to create it)`);
  FileDevice.create(path, createBytes);
  return true;
}

/**
 * When `path` exists and `requestedBytes` (a --cache-size or --backing-size) differs from its
 * size: a line saying the flag was not applied (pcache never resizes an existing device).
 */
export function sizeFlagIgnored(path: string, requestedBytes: number | undefined, sizeFlag: string): string | undefined {
  if (requestedBytes === undefined || !fs.existsSync(path)) return undefined;
  const actual = fs.statSync(path).isFile() ? fs.statSync(path).size : undefined;
  if (actual === undefined || actual === requestedBytes) return undefined;
  return `${sizeFlag} ${formatSize(requestedBytes)} is not applied: ${path} already exists with ${formatSize(actual)}, and pcache never resizes an existing device`;
}

/** "path (8 GiB)" */
export function describeDevice(path: string, sizeBytes: number): string {
  return `${path} (${formatSize(sizeBytes)})`;
}
