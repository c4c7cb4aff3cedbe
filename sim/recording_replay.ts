// Replaying a recording (src/device/recording_device.ts) as a crash: the device state a power
// loss at any point of the recorded run could have left, built through a DeviceModel on top of
// the base image, and the helpers that read and write whole images for it.

import fs from 'node:fs';
import { assert } from '../src/lib/assert.js';
import { toPcacheError } from '../src/device/file_device.js';
import type { Recording } from '../src/device/recording_device.js';
import { DeviceModel, type CrashPoint } from './device_model.js';
import { isZero, pageSizeBytes, PageImage, type PageSource } from './page_image.js';

export interface ReplayOptions {
  /** Replay only the first `entryCount` entries (a crash at that point of the log). Default: all. */
  readonly entryCount?: number;
  /**
   * Whether a failed sync forgets the writes it covered, as Linux does (fsyncgate). Default
   * true, because the recordings come from real files.
   */
  readonly fsyncgate?: boolean;
  /** Names the crash point's device. Default 'recorded'. */
  readonly device?: string;
  readonly identity?: string;
}

/**
 * The crash point after replaying the log on top of `base` (the contents when recording
 * started; the image is forked, not changed). Feed it to the crash-state generators.
 */
export function recordingCrashPoint(recording: Recording, base: PageImage, options: ReplayOptions = {}): CrashPoint {
  assert(base.sizeBytes === recording.sizeBytes, 'the base image must match the recorded device size');
  const entryCount = options.entryCount ?? recording.entries.length;
  assert(entryCount >= 0 && entryCount <= recording.entries.length, `entry count ${entryCount} is out of range`);
  const model = new DeviceModel(base.fork());
  const dropDirty = options.fsyncgate ?? true;
  for (let index = 0; index < entryCount; index += 1) {
    const entry = recording.entries[index];
    assert(entry !== undefined, 'entry index is inside the recording');
    switch (entry.kind) {
      case 'writeIssue':
        model.issueWrite(entry.id, entry.offsetBytes, entry.lengthBytes, entry.data);
        break;
      case 'discardIssue':
        model.issueWrite(entry.id, entry.offsetBytes, entry.lengthBytes, undefined);
        break;
      case 'writeComplete':
        model.completeWrite(entry.id);
        break;
      case 'writeFail':
        model.failWrite(entry.id);
        break;
      case 'syncIssue':
        model.issueSync(entry.id);
        break;
      case 'syncComplete':
        model.completeSync(entry.id);
        break;
      case 'syncFail':
        model.failSync(entry.id, { dropDirty });
        break;
    }
  }
  return model.crashPoint(options.device ?? 'recorded', options.identity);
}

/** Reads the pages of an existing file (a copy of the device taken when recording started). */
export class FilePageSource implements PageSource {
  readonly sizeBytes: number;
  private fd: number | undefined;

  constructor(readonly path: string) {
    try {
      this.fd = fs.openSync(path, 'r');
      this.sizeBytes = fs.fstatSync(this.fd).size;
    } catch (error) {
      throw toPcacheError(error, `open the base image ${path}`);
    }
  }

  readPage(pageIndex: number, target: Uint8Array): void {
    assert(this.fd !== undefined, 'read from an open page source');
    assert(target.length === pageSizeBytes, 'read one page at a time');
    target.fill(0);
    const position = pageIndex * pageSizeBytes;
    const length = Math.max(0, Math.min(pageSizeBytes, this.sizeBytes - position));
    let done = 0;
    while (done < length) {
      const count = fs.readSync(this.fd, target, done, length - done, position + done);
      if (count === 0) break;
      done += count;
    }
  }

  close(): void {
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
  }
}

/**
 * Writes an image to a new (sparse) file, for starting a real server process on a crash
 * state. Zero pages are left as holes.
 */
export function saveImage(image: { sizeBytes: number; read(target: Uint8Array, offsetBytes: number): void }, path: string): void {
  let fd: number;
  try {
    fd = fs.openSync(path, 'wx');
  } catch (error) {
    throw toPcacheError(error, `create the image ${path}`);
  }
  try {
    fs.ftruncateSync(fd, image.sizeBytes);
    const page = new Uint8Array(pageSizeBytes);
    for (let offset = 0; offset < image.sizeBytes; offset += pageSizeBytes) {
      const length = Math.min(pageSizeBytes, image.sizeBytes - offset);
      image.read(page.subarray(0, length), offset);
      if (isZero(page.subarray(0, length))) continue;
      let done = 0;
      while (done < length) done += fs.writeSync(fd, page, done, length - done, offset + done);
    }
  } catch (error) {
    throw toPcacheError(error, `write the image ${path}`);
  } finally {
    fs.closeSync(fd);
  }
}
