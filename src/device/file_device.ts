// FileDevice: a BlockDevice over a regular file or a block device node.
//
// Two I/O styles, chosen when the device is opened:
// - blocking: reads and writes are synchronous pread/pwrite on the event-loop thread. Right
//   for the fast cache device (persistent memory, page cache, tmpfs, NVMe with a warm page
//   cache), where one call costs about a microsecond.
// - asynchronous: reads and writes go through libuv's thread pool, so a slow backing device
//   keeps many requests in flight without stalling the event loop.
// `sync` is always fdatasync on the thread pool. Batches of writes (writeMany) go to a writer
// thread of the file's own (file_writer.ts) in the asynchronous style. System errors become PcacheErrors here, in
// one place, so nothing above the device layer ever sees an errno.

import fs from 'node:fs';
import { assert } from '../lib/assert.js';
import { PcacheError, type PcacheErrorCode } from '../lib/errors.js';
import { MiB } from '../lib/units.js';
import { rangeProblem, type BlockDevice, type BlockingIo, type DeviceCopy, type DeviceRead, type DeviceWrite } from './block_device.js';
import { FileWriter } from './file_writer.js';

export interface FileDeviceOptions {
  /** Use synchronous positional I/O (see the file comment). Default false. */
  blocking?: boolean;
  /** Open without write access; writes then fail with EPERM. Default false. */
  readOnly?: boolean;
}

const zeroChunkBytes = 1 * MiB;
/** Files created here (serve and format with --cache-size, --backing-size) are the owner's alone: they hold a disk. */
const createdFileMode = 0o600;
let zeroChunk: Uint8Array | undefined;

export class FileDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly identity: string | undefined;
  readonly blocking: BlockingIo | undefined;
  readonly path: string;
  readonly readOnly: boolean;
  private fd: number | undefined;
  /** Started by the first writeMany. */
  private writer: FileWriter | undefined;
  private closing = false;

  private constructor(path: string, fd: number, info: { sizeBytes: number; identity: string | undefined }, options: FileDeviceOptions) {
    this.path = path;
    this.fd = fd;
    this.sizeBytes = info.sizeBytes;
    this.identity = info.identity;
    this.readOnly = options.readOnly ?? false;
    this.blocking = options.blocking === true
      ? {
        readSync: (t, o) => { this.readSync(t, o); },
        writeSync: (s, o) => { this.writeSync(s, o); },
        writevSync: (s, o) => { this.writevSync(s, o); },
        locate: (o, l) => ({ fd: this.check(o, l), offsetBytes: o }),
      }
      : undefined;
  }

  static async open(path: string, options: FileDeviceOptions = {}): Promise<FileDevice> {
    const fd = await new Promise<number>((resolve, reject) => {
      fs.open(path, options.readOnly === true ? 'r' : 'r+', (error, handle) => {
        if (error === null) resolve(handle);
        else reject(toPcacheError(error, `cannot open ${path}`));
      });
    });
    try {
      const info = describe(path, fd);
      return new FileDevice(path, fd, info, options);
    } catch (error) {
      fs.closeSync(fd);
      throw error;
    }
  }

  /**
   * Creates a sparse regular file of `sizeBytes`, readable and writable by its owner only (it
   * holds a disk's data); refuses to replace an existing one.
   */
  static create(path: string, sizeBytes: number): void {
    assert(Number.isSafeInteger(sizeBytes) && sizeBytes > 0, 'file size must be positive');
    let fd: number;
    try {
      fd = fs.openSync(path, 'wx', createdFileMode);
    } catch (error) {
      throw toPcacheError(error, `cannot create ${path}`);
    }
    try {
      fs.ftruncateSync(fd, sizeBytes);
    } catch (error) {
      throw toPcacheError(error, `cannot size ${path} to ${sizeBytes} bytes`);
    } finally {
      fs.closeSync(fd);
    }
  }

  // The promise-returning methods report every failure as a rejection, never a synchronous throw.

  async read(target: Uint8Array, offsetBytes: number): Promise<void> {
    const fd = this.check(offsetBytes, target.length);
    await transfer('read', fd, target, offsetBytes, this.path);
  }

  async write(source: Uint8Array, offsetBytes: number): Promise<void> {
    const fd = this.checkWritable(offsetBytes, source.length);
    await transfer('write', fd, source, offsetBytes, this.path);
  }

  async writeMany(writes: readonly DeviceWrite[]): Promise<void> {
    if (this.closing) throw new PcacheError('ENODEV', `${this.path} is closing`);
    let fd = this.check(0, 0);
    for (const w of writes) fd = this.checkWritable(w.offsetBytes, w.source.length);
    if (this.blocking !== undefined) {
      for (const w of writes) this.writeSync(w.source, w.offsetBytes);
      return;
    }
    await this.writerFor(fd).write(writes);
  }

  /** On the file's own thread, whatever the I/O style: the caller wants the reads off its thread. */
  async readMany(reads: readonly DeviceRead[]): Promise<void> {
    if (this.closing) throw new PcacheError('ENODEV', `${this.path} is closing`);
    let fd = this.check(0, 0);
    for (const r of reads) fd = this.check(r.offsetBytes, r.target.length);
    await this.writerFor(fd).read(reads);
  }

  private writerFor(fd: number): FileWriter {
    this.writer ??= new FileWriter(this.path, fd, (failure, kind) => toPcacheError(
      Object.assign(new Error(failure.message), { code: failure.code }),
      kind === 'read' ? `read ${this.path} at ${failure.offsetBytes}`
        : failure.reading ? `copy to ${this.path}: reading the source at ${failure.offsetBytes}` : `write ${this.path} at ${failure.offsetBytes}`,
    ));
    return this.writer;
  }

  async copyMany(copies: readonly DeviceCopy[]): Promise<void> {
    if (this.closing) throw new PcacheError('ENODEV', `${this.path} is closing`);
    let fd = this.check(0, 0);
    for (const copy of copies) {
      let lengthBytes = 0;
      for (const source of copy.sources) lengthBytes += source.lengthBytes;
      fd = this.checkWritable(copy.offsetBytes, lengthBytes);
    }
    await this.writerFor(fd).copy(copies);
  }

  async sync(): Promise<void> {
    if (this.readOnly) return;
    const fd = this.check(0, 0);
    await new Promise<void>((resolve, reject) => {
      fs.fdatasync(fd, (error) => {
        if (error === null) resolve();
        else reject(toPcacheError(error, `fdatasync ${this.path}`));
      });
    });
  }

  /**
   * A regular file describes itself: any write moves its modification and change times, which
   * the kernel keeps in nanoseconds. A block device has no such times (undefined: sampled).
   */
  fingerprint(): Promise<string | undefined> {
    const stat = fs.fstatSync(this.check(0, 0), { bigint: true });
    if (!stat.isFile()) return Promise.resolve(undefined);
    return Promise.resolve(`file:dev=${stat.dev},ino=${stat.ino},size=${stat.size},mtime=${stat.mtimeNs},ctime=${stat.ctimeNs}`);
  }

  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    // Node offers no fallocate(PUNCH_HOLE); writing zeroes meets the discard contract.
    this.checkWritable(offsetBytes, lengthBytes);
    zeroChunk ??= new Uint8Array(zeroChunkBytes);
    for (let done = 0; done < lengthBytes; done += zeroChunkBytes) {
      const length = Math.min(zeroChunkBytes, lengthBytes - done);
      await this.write(zeroChunk.subarray(0, length), offsetBytes + done);
    }
  }

  async close(): Promise<void> {
    // The writer thread finishes what it was given before the descriptor goes.
    this.closing = true;
    const writer = this.writer;
    this.writer = undefined;
    if (writer !== undefined) await writer.close();
    const fd = this.fd;
    this.fd = undefined;
    if (fd === undefined) return;
    await new Promise<void>((resolve, reject) => {
      fs.close(fd, (error) => {
        if (error === null) resolve();
        else reject(toPcacheError(error, `close ${this.path}`));
      });
    });
  }

  private readSync(target: Uint8Array, offsetBytes: number): void {
    const fd = this.check(offsetBytes, target.length);
    let done = 0;
    try {
      while (done < target.length) {
        const n = fs.readSync(fd, target, done, target.length - done, offsetBytes + done);
        if (n === 0) throw new PcacheError('EIO', `${this.path}: unexpected end of file at ${offsetBytes + done}`);
        done += n;
      }
    } catch (error) {
      throw toPcacheError(error, `read ${this.path} at ${offsetBytes + done}`);
    }
  }

  private writeSync(source: Uint8Array, offsetBytes: number): void {
    const fd = this.checkWritable(offsetBytes, source.length);
    let done = 0;
    try {
      while (done < source.length) {
        done += fs.writeSync(fd, source, done, source.length - done, offsetBytes + done);
      }
    } catch (error) {
      throw toPcacheError(error, `write ${this.path} at ${offsetBytes + done}`);
    }
  }

  /** One pwritev for several buffers (the write path groups a turn's writes into one call). */
  private writevSync(sources: readonly Uint8Array[], offsetBytes: number): void {
    let total = 0;
    for (const source of sources) total += source.length;
    const fd = this.checkWritable(offsetBytes, total);
    let done: number;
    try {
      done = fs.writevSync(fd, sources, offsetBytes);
    } catch (error) {
      throw toPcacheError(error, `write ${this.path} at ${offsetBytes}`);
    }
    // A short write (rare on regular files) is finished buffer by buffer.
    let at = 0;
    for (const source of sources) {
      const end = at + source.length;
      if (end > done) this.writeSync(source.subarray(Math.max(0, done - at)), offsetBytes + Math.max(done, at));
      at = end;
    }
  }

  private check(offsetBytes: number, lengthBytes: number): number {
    if (this.fd === undefined) throw new PcacheError('ENODEV', `${this.path} is closed`);
    const problem = rangeProblem(this, offsetBytes, lengthBytes);
    if (problem !== undefined) assert(false, this.path, problem);
    return this.fd;
  }

  private checkWritable(offsetBytes: number, lengthBytes: number): number {
    if (this.readOnly) throw new PcacheError('EPERM', `${this.path} is open read-only`);
    return this.check(offsetBytes, lengthBytes);
  }
}

function transfer(kind: 'read' | 'write', fd: number, bytes: Uint8Array, offsetBytes: number, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (error: NodeJS.ErrnoException | null, n: number): void => {
      if (error !== null) {
        reject(toPcacheError(error, `${kind} ${path} at ${offsetBytes + done}`));
        return;
      }
      if (n === 0 && kind === 'read') {
        reject(new PcacheError('EIO', `${path}: unexpected end of file at ${offsetBytes + done}`));
        return;
      }
      done += n;
      if (done === bytes.length) resolve();
      else issue();
    };
    const issue = (): void => {
      if (kind === 'read') fs.read(fd, bytes, done, bytes.length - done, offsetBytes + done, step);
      else fs.write(fd, bytes, done, bytes.length - done, offsetBytes + done, step);
    };
    if (bytes.length === 0) resolve();
    else issue();
  });
}

/** Size and identity of an open file or block device. */
function describe(path: string, fd: number): { sizeBytes: number; identity: string | undefined } {
  const stat = fs.fstatSync(fd);
  if (stat.isFile()) return { sizeBytes: stat.size, identity: `file:ino=${stat.ino}` };
  if (!stat.isBlockDevice()) throw new PcacheError('EINVAL', `${path} is neither a regular file nor a block device`);
  // Linux's dev_t encoding: 12 bits of major and 20 of minor, split across the word.
  const major = Math.floor(stat.rdev / 256) & 0xfff;
  const minor = (stat.rdev & 0xff) | ((Math.floor(stat.rdev / 4096) & 0xfff00));
  const sysfs = `/sys/dev/block/${major}:${minor}`;
  const sectors = Number(readSysfs(`${sysfs}/size`));
  if (!Number.isSafeInteger(sectors) || sectors <= 0) throw new PcacheError('EIO', `cannot read the size of ${path} from ${sysfs}/size`);
  return { sizeBytes: sectors * 512, identity: blockDeviceIdentity(sysfs) };
}

/** The most stable name sysfs offers for a block device, or undefined if none is stable. */
function blockDeviceIdentity(sysfs: string): string | undefined {
  const candidates: [string, string][] = [
    ['wwid', `${sysfs}/device/wwid`],
    ['serial', `${sysfs}/device/serial`],
    ['dm-uuid', `${sysfs}/dm/uuid`],
    ['loop', `${sysfs}/loop/backing_file`],
  ];
  for (const [kind, file] of candidates) {
    const value = readSysfs(file);
    if (value !== undefined && value !== '') return `blockdev:${kind}=${value}`;
  }
  return undefined;
}

function readSysfs(file: string): string | undefined {
  try {
    return fs.readFileSync(file, 'utf8').trim();
  } catch {
    return undefined;
  }
}

const errnoCodes: Partial<Record<string, PcacheErrorCode>> = {
  ENOSPC: 'ENOSPC',
  EDQUOT: 'ENOSPC',
  EFBIG: 'ENOSPC',
  ENODEV: 'ENODEV',
  ENXIO: 'ENODEV',
  ENOENT: 'ENODEV',
  EBADF: 'ENODEV',
  EACCES: 'EPERM',
  EPERM: 'EPERM',
  EROFS: 'EPERM',
  EISDIR: 'EINVAL',
};

/** The one place where system errors become pcache's operating errors. */
export function toPcacheError(error: unknown, context: string): PcacheError {
  if (error instanceof PcacheError) return error;
  const errno = (error as NodeJS.ErrnoException | undefined)?.code;
  const code = (errno !== undefined ? errnoCodes[errno] : undefined) ?? 'EIO';
  const detail = error instanceof Error ? error.message : String(error);
  return new PcacheError(code, `${context}: ${detail}`, { cause: error });
}
