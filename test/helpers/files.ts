// Files for tests: temporary directories removed after the test (small ones under os.tmpdir(),
// room for GiBs of data in /dev/shm when it has it), random data files, and byte-for-byte
// comparison of files too large to read whole.

import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { GiB, MiB } from '../../src/lib/units.js';

/** A fresh temporary directory under os.tmpdir(), removed after the test. */
export function tempDir(t: TestContext, prefix = 'pcache-test-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.after(() => { fs.rmSync(dir, { recursive: true, force: true }); });
  return dir;
}

/**
 * A fresh directory with at least `bytesNeeded` free, removed after the test: in /dev/shm
 * (memory: fast, and the tests' timing does not depend on a disk) when it has the room, else
 * under os.tmpdir(); fails when neither has.
 */
export function scratchDir(t: TestContext, bytesNeeded: number, prefix: string): string {
  const candidates = ['/dev/shm', os.tmpdir()];
  const room: string[] = [];
  for (const candidate of candidates) {
    let freeBytes: number;
    try {
      const stats = fs.statfsSync(candidate);
      freeBytes = stats.bavail * stats.bsize;
      fs.accessSync(candidate, fs.constants.W_OK);
    } catch {
      continue;
    }
    room.push(`${candidate}: ${(freeBytes / GiB).toFixed(1)} GiB free`);
    // Keep a margin: other tests and the page cache share the space.
    if (freeBytes < bytesNeeded + 512 * MiB) continue;
    const dir = fs.mkdtempSync(path.join(candidate, prefix));
    t.after(() => { fs.rmSync(dir, { recursive: true, force: true }); });
    return dir;
  }
  return assert.fail(`this test needs ${(bytesNeeded / GiB).toFixed(1)} GiB of free space in /dev/shm or ${os.tmpdir()} (${room.join('; ') || 'neither is usable'})`);
}

const chunkBytes = 16 * MiB;

/** Writes `bytes` of random data to `file` (cryptographic random: no block repeats another). */
export function writeRandomFile(file: string, bytes: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    const chunk = Buffer.alloc(chunkBytes);
    for (let done = 0; done < bytes; done += chunkBytes) {
      const length = Math.min(chunkBytes, bytes - done);
      randomFillSync(chunk, 0, length);
      fs.writeSync(fd, chunk, 0, length, done);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Asserts two files are byte for byte equal, naming the first MiB where they differ. */
export function assertFilesEqual(actual: string, expected: string, what: string): void {
  const size = fs.statSync(expected).size;
  assert.equal(fs.statSync(actual).size, size, `${what}: sizes`);
  const a = fs.openSync(actual, 'r');
  const b = fs.openSync(expected, 'r');
  try {
    const bufA = Buffer.alloc(chunkBytes);
    const bufB = Buffer.alloc(chunkBytes);
    for (let offset = 0; offset < size; offset += chunkBytes) {
      const length = Math.min(chunkBytes, size - offset);
      fs.readSync(a, bufA, 0, length, offset);
      fs.readSync(b, bufB, 0, length, offset);
      if (bufA.subarray(0, length).equals(bufB.subarray(0, length))) continue;
      let at = 0;
      while (bufA[at] === bufB[at]) at++;
      assert.fail(`${what}: the files differ from byte ${offset + at} (MiB ${Math.floor((offset + at) / MiB)}) on`);
    }
  } finally {
    fs.closeSync(a);
    fs.closeSync(b);
  }
}
