// `serve --pid-file PATH`: the server's PID, written once it listens (so the file's appearance
// also says "ready", as nbdkit's -P does) and removed when it stops.
//
// Invariants: the file is written whole or not at all (a temporary file renamed over it), so
// a reader never sees a partial number; it is removed only while it still holds our PID (a
// newer server may have taken the path over); a failure to write is a PcacheError 'EINVAL'.

import fs from 'node:fs';
import path from 'node:path';
import { PcacheError } from '../lib/errors.js';

/** A PID file is world-readable, like every PID file under /run: it is no secret. */
const pidFileMode = 0o644;

/** Writes `process.pid` to `file` and returns the function that removes it again. */
export function writePidFile(file: string): () => void {
  const text = `${process.pid}\n`;
  const temporary = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  try {
    fs.writeFileSync(temporary, text, { mode: pidFileMode });
    fs.renameSync(temporary, file);
  } catch (error) {
    fs.rmSync(temporary, { force: true });
    throw new PcacheError('EINVAL', `cannot write the PID file ${file}: ${(error as Error).message}`, { cause: error });
  }
  return () => {
    try {
      if (fs.readFileSync(file, 'utf8') === text) fs.rmSync(file, { force: true });
    } catch {
      // Gone already, or replaced by someone else's: nothing of ours to remove.
    }
  };
}
