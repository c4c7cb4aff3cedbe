// RecordingDevice: a pass-through BlockDevice that logs every write and sync to a side file,
// so that power-loss states of a real server process can be rebuilt offline
// (`pcache serve --record-dir`); and readRecording, the one decoder of that log.
//
// This is the userspace form of dm-log-writes. The server runs on RecordingDevices wrapped
// around its FileDevices and is killed with SIGKILL at a random moment. Its page cache survives
// the kill, and so does the side log, which therefore needs no fsync. Offline, readRecording
// parses the log, and the crash simulator (sim/recording_replay.ts) replays it through a
// DeviceModel on top of the base image (the device contents when recording started). The
// result is the durable prefix up to the last completed sync plus the volatile writes, which
// the crash-state generator turns into devices to restart on.
//
// Log format (little-endian). File header, 32 bytes: magic "PCRL", version u32, device size
// u64, reserved, crc32c of bytes 0..27 at 28. Then records: a 32-byte header {crc32c u32 over
// bytes 4..31 and the data, kind u8, 3 reserved, id u32, data length u32, offset u64, length
// u64} followed by the data of a write. Invariants: a record is appended with one write(2)
// before the operation it describes starts, and its completion record before the caller
// learns the outcome, so the log never claims less than what the client could have seen; a
// kill can cut only the last record short, and the reader stops at the first record whose
// length or CRC does not check out.

import fs from 'node:fs';
import { assert } from '../lib/assert.js';
import { crc32c } from '../lib/crc32c.js';
import { PcacheError } from '../lib/errors.js';
import { readU32LE, readU64LE, writeU32LE, writeU64LE } from '../lib/units.js';
import type { BlockDevice, BlockingIo } from './block_device.js';
import { toPcacheError } from './file_device.js';

const logMagic = 0x4c524350; // "PCRL" read as little-endian bytes
const logVersion = 1;
const fileHeaderBytes = 32;
const fileHeaderCrcOffset = 28;
const recordHeaderBytes = 32;
/** A single write larger than this is not a plausible device request; the reader stops there. */
const recordDataBytesMax = 256 * 1024 * 1024;

export type RecordKind = 'writeIssue' | 'writeComplete' | 'writeFail' | 'syncIssue' | 'syncComplete' | 'syncFail' | 'discardIssue';
const kindCodes: Record<RecordKind, number> = {
  writeIssue: 1,
  writeComplete: 2,
  writeFail: 3,
  syncIssue: 4,
  syncComplete: 5,
  syncFail: 6,
  discardIssue: 7,
};
const kindsByCode = new Map<number, RecordKind>(Object.entries(kindCodes).map(([kind, code]) => [code, kind as RecordKind]));

export interface RecordingEntry {
  readonly kind: RecordKind;
  readonly id: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  /** The bytes of a writeIssue record. */
  readonly data: Uint8Array | undefined;
}

export class RecordingDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly identity: string | undefined;
  readonly blocking: BlockingIo | undefined;
  readonly logPath: string;
  private logFd: number | undefined;
  private nextId = 1;

  private constructor(
    private readonly inner: BlockDevice,
    logPath: string,
    logFd: number,
  ) {
    this.sizeBytes = inner.sizeBytes;
    this.identity = inner.identity;
    this.logPath = logPath;
    this.logFd = logFd;
    const innerBlocking = inner.blocking;
    this.blocking =
      innerBlocking === undefined
        ? undefined
        : {
            readSync: (target, offsetBytes) => {
              innerBlocking.readSync(target, offsetBytes);
            },
            writeSync: (source, offsetBytes) => {
              this.writeSyncThrough(innerBlocking, source, offsetBytes);
            },
          };
  }

  /** Wraps `inner`, creating a new side log at `logPath` (an existing file is refused). */
  static create(inner: BlockDevice, logPath: string): RecordingDevice {
    let fd: number;
    try {
      fd = fs.openSync(logPath, 'wx');
    } catch (error) {
      throw toPcacheError(error, `cannot create the recording log ${logPath}`);
    }
    const header = new Uint8Array(fileHeaderBytes);
    writeU32LE(header, 0, logMagic);
    writeU32LE(header, 4, logVersion);
    writeU64LE(header, 8, inner.sizeBytes);
    writeU32LE(header, fileHeaderCrcOffset, crc32c(header.subarray(0, fileHeaderCrcOffset)));
    appendAll(fd, header, logPath);
    return new RecordingDevice(inner, logPath, fd);
  }

  read(target: Uint8Array, offsetBytes: number): Promise<void> {
    return this.inner.read(target, offsetBytes);
  }

  /** The inner device's: recording a run must not make its device look like another one. */
  fingerprint(): Promise<string | undefined> {
    return this.inner.fingerprint?.() ?? Promise.resolve(undefined);
  }

  async write(source: Uint8Array, offsetBytes: number): Promise<void> {
    const id = this.takeId();
    this.append('writeIssue', id, offsetBytes, source.length, source);
    try {
      await this.inner.write(source, offsetBytes);
    } catch (error) {
      this.append('writeFail', id, offsetBytes, source.length, undefined);
      throw error;
    }
    this.append('writeComplete', id, offsetBytes, source.length, undefined);
  }

  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    const id = this.takeId();
    this.append('discardIssue', id, offsetBytes, lengthBytes, undefined);
    try {
      if (this.inner.discard !== undefined) {
        await this.inner.discard(offsetBytes, lengthBytes);
      } else {
        // The BlockDevice contract only asks that the range read back as zeroes.
        await this.inner.write(new Uint8Array(lengthBytes), offsetBytes);
      }
    } catch (error) {
      this.append('writeFail', id, offsetBytes, lengthBytes, undefined);
      throw error;
    }
    this.append('writeComplete', id, offsetBytes, lengthBytes, undefined);
  }

  async sync(): Promise<void> {
    const id = this.takeId();
    this.append('syncIssue', id, 0, 0, undefined);
    try {
      await this.inner.sync();
    } catch (error) {
      this.append('syncFail', id, 0, 0, undefined);
      throw error;
    }
    this.append('syncComplete', id, 0, 0, undefined);
  }

  async close(): Promise<void> {
    const fd = this.logFd;
    this.logFd = undefined;
    if (fd !== undefined) fs.closeSync(fd);
    await this.inner.close();
  }

  private writeSyncThrough(blocking: BlockingIo, source: Uint8Array, offsetBytes: number): void {
    const id = this.takeId();
    this.append('writeIssue', id, offsetBytes, source.length, source);
    try {
      blocking.writeSync(source, offsetBytes);
    } catch (error) {
      this.append('writeFail', id, offsetBytes, source.length, undefined);
      throw error;
    }
    this.append('writeComplete', id, offsetBytes, source.length, undefined);
  }

  private append(kind: RecordKind, id: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | undefined): void {
    const fd = this.logFd;
    if (fd === undefined) throw new PcacheError('ENODEV', `${this.logPath}: recording device is closed`);
    const dataBytes = data?.length ?? 0;
    const record = new Uint8Array(recordHeaderBytes + dataBytes);
    record[4] = kindCodes[kind];
    writeU32LE(record, 8, id);
    writeU32LE(record, 12, dataBytes);
    writeU64LE(record, 16, offsetBytes);
    writeU64LE(record, 24, lengthBytes);
    if (data !== undefined) record.set(data, recordHeaderBytes);
    writeU32LE(record, 0, crc32c(record.subarray(4)));
    appendAll(fd, record, this.logPath);
  }

  private takeId(): number {
    const id = this.nextId;
    assert(id <= 0xffff_ffff, 'recording ids are 32-bit');
    this.nextId += 1;
    return id;
  }
}

function appendAll(fd: number, bytes: Uint8Array, path: string): void {
  let done = 0;
  try {
    while (done < bytes.length) done += fs.writeSync(fd, bytes, done, bytes.length - done);
  } catch (error) {
    throw toPcacheError(error, `append to the recording log ${path}`);
  }
}

export interface Recording {
  readonly sizeBytes: number;
  readonly entries: readonly RecordingEntry[];
  /** Bytes after the last whole record (a record cut short by the kill, usually 0). */
  readonly trailingBytes: number;
}

/** Parses a side log. A damaged file header is CORRUPT; a damaged tail is reported, not fatal. */
export function readRecording(logPath: string): Recording {
  let bytes: Uint8Array;
  try {
    bytes = fs.readFileSync(logPath);
  } catch (error) {
    throw toPcacheError(error, `read the recording log ${logPath}`);
  }
  if (bytes.length < fileHeaderBytes) throw new PcacheError('CORRUPT', `${logPath}: too short for a recording log`);
  if (readU32LE(bytes, 0) !== logMagic) throw new PcacheError('CORRUPT', `${logPath}: not a recording log`);
  if (readU32LE(bytes, fileHeaderCrcOffset) !== crc32c(bytes.subarray(0, fileHeaderCrcOffset))) {
    throw new PcacheError('CORRUPT', `${logPath}: recording log header fails its CRC`);
  }
  if (readU32LE(bytes, 4) !== logVersion) throw new PcacheError('CORRUPT', `${logPath}: unknown recording log version`);
  const sizeBytes = readU64LE(bytes, 8);
  const entries: RecordingEntry[] = [];
  let offset = fileHeaderBytes;
  while (offset + recordHeaderBytes <= bytes.length) {
    const dataBytes = readU32LE(bytes, offset + 12);
    if (dataBytes > recordDataBytesMax || offset + recordHeaderBytes + dataBytes > bytes.length) break;
    const record = bytes.subarray(offset, offset + recordHeaderBytes + dataBytes);
    if (readU32LE(record, 0) !== crc32c(record.subarray(4))) break;
    const kind = kindsByCode.get(record[4] ?? 0);
    const recordOffset = readU64LE(record, 16);
    const lengthBytes = readU64LE(record, 24);
    // Bounds-check what the CRC vouches for: a record describing an impossible request ends
    // the usable log just like a torn one.
    if (kind === undefined || recordOffset + lengthBytes > sizeBytes) break;
    if (dataBytes !== (kind === 'writeIssue' ? lengthBytes : 0)) break;
    entries.push({
      kind,
      id: readU32LE(record, 8),
      offsetBytes: recordOffset,
      lengthBytes,
      data: kind === 'writeIssue' ? record.subarray(recordHeaderBytes) : undefined,
    });
    offset += recordHeaderBytes + dataBytes;
  }
  return { sizeBytes, entries, trailingBytes: bytes.length - offset };
}
