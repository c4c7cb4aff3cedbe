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

/** "path (8 GiB)" */
export function describeDevice(path: string, sizeBytes: number): string {
  return `${path} (${formatSize(sizeBytes)})`;
}
