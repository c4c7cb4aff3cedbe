// Toy systems under test for the crash harness, and deliberately broken mutants of them.
//
// They exist to prove the harness: the correct ones must produce zero violations, and every
// mutant carries one classic crash-consistency bug that the harness must catch.
// - WriteThroughTarget: writes go straight to the backing device; FLUSH and FUA sync it.
// - LogCacheTarget: a tiny write-back cache. The cache device holds a header (two CRC'd,
//   sequence-numbered slots) and an append-only log of CRC'd, chained records; FLUSH syncs the
//   cache device; a writeback step copies the oldest record to the backing device, syncs it,
//   and only then advances the persisted tail; GC resets a fully written-back log under a new
//   generation so stale records of an earlier lap are never parsed.

import { assert } from '../../src/lib/assert.js';
import { crc32c } from '../../src/lib/crc32c.js';
import { PcacheError } from '../../src/lib/errors.js';
import { readU32LE, readU64LE, sectorSizeBytes, writeU32LE, writeU64LE } from '../../src/lib/units.js';
import type { BlockDevice } from '../../src/device/block_device.js';
import { runExhaustive, runRandomized, type CrashTarget, type HarnessReport, type OpenTarget } from '../../sim/harness.js';

export type WriteThroughMutant = 'none' | 'flushWithoutSync' | 'fuaWithoutSync' | 'reorderedFlush';

/**
 * Write-through. The 'reorderedFlush' mutant holds writes in memory (reads see them) and at
 * FLUSH applies them newest first, so an older write lands over a newer one.
 */
export class WriteThroughTarget implements CrashTarget {
  constructor(readonly mutant: WriteThroughMutant = 'none') {}

  open(_cache: BlockDevice, backing: BlockDevice): Promise<OpenTarget> {
    return Promise.resolve(new OpenWriteThrough(backing, this.mutant));
  }
}

class OpenWriteThrough implements OpenTarget {
  private held: { data: Uint8Array; offsetBytes: number }[] = [];

  constructor(
    private readonly backing: BlockDevice,
    private readonly mutant: WriteThroughMutant,
  ) {}

  async read(target: Uint8Array, offsetBytes: number): Promise<void> {
    await this.backing.read(target, offsetBytes);
    for (const write of this.held) overlay(target, offsetBytes, write.data, write.offsetBytes);
  }

  async write(source: Uint8Array, offsetBytes: number, options: { fua: boolean }): Promise<void> {
    if (this.mutant === 'reorderedFlush' && !options.fua) {
      this.held.push({ data: source.slice(), offsetBytes });
      return;
    }
    await this.backing.write(source, offsetBytes);
    if (options.fua && this.mutant !== 'fuaWithoutSync') await this.backing.sync();
  }

  async flush(): Promise<void> {
    const held = this.held.reverse();
    this.held = [];
    for (const write of held) await this.backing.write(write.data, write.offsetBytes);
    if (this.mutant !== 'flushWithoutSync') await this.backing.sync();
  }

  trim(offsetBytes: number, lengthBytes: number, options: { fua: boolean }): Promise<void> {
    return this.writeZeroes(offsetBytes, lengthBytes, { fua: options.fua, fastZero: false });
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options: { fua: boolean; fastZero: boolean }): Promise<void> {
    await this.write(new Uint8Array(lengthBytes), offsetBytes, { fua: options.fua });
  }

  writebackStep(): Promise<void> {
    return Promise.resolve();
  }

  gcStep(): Promise<void> {
    return Promise.resolve();
  }

  drain(): Promise<void> {
    return this.flush();
  }

  check(): Promise<string[]> {
    return Promise.resolve([]);
  }

  close(): Promise<void> {
    return this.flush();
  }

  abandon(): void {
    this.held = [];
  }
}

export type LogCacheMutant =
  | 'none'
  /** Persists the advanced tail before syncing the backing device. */
  | 'tailBeforeBackingSync'
  /** Replays records without checking their data CRC. */
  | 'trustRecordData'
  /** Writes back the newest record first. */
  | 'newestFirstWriteback'
  /** Writes back every pending record, oldest first, then syncs the backing device once. */
  | 'batchedWriteback'
  /** Flush acknowledges without syncing the cache device. */
  | 'flushWithoutSync'
  /** Recovery writes the log back and resets it, persisting the reset before the data. */
  | 'recoveryResetFirst';

/*
 * Cache device layout (all little-endian):
 *   [0, 512)        header slot 0 ┐ {crc u32, magic u32, seq u32, generation u32,
 *   [512, 1024)     header slot 1 ┘  tail u32, reserved}; the valid slot with the larger seq wins
 *   [4096, end)     log: records of one 512-byte header sector then the data sectors
 * Record header: {crc u32 (over bytes 4..511), magic u32, generation u32, position u32,
 *   kind u32 (1 data, 2 zeroes), dataCrc u32, previousCrc u32, offset u64, length u32}.
 * Records are parsed from `tail`; parsing stops at the first record with a bad magic, CRC,
 * generation, position, chain link (previousCrc) or data CRC, or one that overruns the log.
 */
const headerMagic = 0x54534554; // "TEST"
const recordMagic = 0x44524f43; // "CORD"
const logStartBytes = 4096;
const kindData = 1;
const kindZeroes = 2;

interface RecordInfo {
  /** Byte position on the cache device; also stored in the record, so a misplaced one is refused. */
  readonly position: number;
  readonly kind: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly headerCrc: number;
  readonly totalBytes: number;
}

export class LogCacheTarget implements CrashTarget {
  constructor(readonly mutant: LogCacheMutant = 'none') {}

  async open(cache: BlockDevice, backing: BlockDevice): Promise<OpenTarget> {
    const blocking = cache.blocking;
    assert(blocking !== undefined, 'the toy log cache uses the blocking cache-device interface');
    const opened = new OpenLogCache(cache, backing, this.mutant);
    await opened.recover();
    return opened;
  }
}

class OpenLogCache implements OpenTarget {
  private generation = 0;
  private seq = 0;
  private tail = logStartBytes;
  private head = logStartBytes;
  private records: RecordInfo[] = [];
  /** Per 512-byte sector of the export: where its newest cached copy lives, or 'zero'. */
  private readonly index = new Map<number, number | 'zero'>();
  private lastCrc = 0;
  private abandoned = false;

  constructor(
    private readonly cache: BlockDevice,
    private readonly backing: BlockDevice,
    private readonly mutant: LogCacheMutant,
  ) {}

  async recover(): Promise<void> {
    const header = this.readHeader();
    if (header === undefined) {
      // A blank device: format it.
      this.generation = 1;
      this.writeHeader();
      await this.cache.sync();
      return;
    }
    this.generation = header.generation;
    this.seq = header.seq;
    this.tail = header.tail;
    this.head = this.tail;
    this.scan();
    if (this.mutant === 'recoveryResetFirst' && this.records.length > 0) {
      const records = this.records;
      this.generation += 1;
      this.tail = logStartBytes;
      this.head = logStartBytes;
      this.writeHeader();
      await this.cache.sync();
      for (const record of records) await this.writeBack(record);
      await this.backing.sync();
      this.records = [];
      this.index.clear();
      this.lastCrc = 0;
    }
  }

  async read(target: Uint8Array, offsetBytes: number): Promise<void> {
    await this.backing.read(target, offsetBytes);
    const blocking = this.blocking();
    for (let sector = 0; sector * sectorSizeBytes < target.length; sector += 1) {
      const where = this.index.get(offsetBytes / sectorSizeBytes + sector);
      if (where === undefined) continue;
      const piece = target.subarray(sector * sectorSizeBytes, (sector + 1) * sectorSizeBytes);
      if (where === 'zero') piece.fill(0);
      else blocking.readSync(piece, where);
    }
  }

  async write(source: Uint8Array, offsetBytes: number, options: { fua: boolean }): Promise<void> {
    this.append(kindData, offsetBytes, source.length, source);
    if (options.fua) await this.cache.sync();
  }

  async flush(): Promise<void> {
    if (this.mutant !== 'flushWithoutSync') await this.cache.sync();
  }

  trim(offsetBytes: number, lengthBytes: number, options: { fua: boolean }): Promise<void> {
    return this.writeZeroes(offsetBytes, lengthBytes, { fua: options.fua, fastZero: false });
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options: { fua: boolean; fastZero: boolean }): Promise<void> {
    this.append(kindZeroes, offsetBytes, lengthBytes, undefined);
    if (options.fua) await this.cache.sync();
  }

  async writebackStep(): Promise<void> {
    if (this.records.length === 0 || this.abandoned) return;
    // Only durable records may be written back: a crash must never leave the backing device
    // ahead of the cache log. Sync the cache first, which makes every appended record durable.
    await this.cache.sync();
    if (this.mutant === 'newestFirstWriteback' || this.mutant === 'batchedWriteback') {
      const batch = this.mutant === 'batchedWriteback' ? [...this.records] : [...this.records].reverse();
      for (const record of batch) await this.writeBack(record);
      await this.backing.sync();
      this.tail = this.head;
      this.records = [];
    } else {
      const record = this.records[0];
      assert(record !== undefined, 'a record waits for writeback');
      await this.writeBack(record);
      if (this.mutant === 'tailBeforeBackingSync') {
        this.tail = record.position + record.totalBytes;
        this.writeHeader();
        await this.cache.sync();
        await this.backing.sync();
      } else {
        await this.backing.sync();
        this.tail = record.position + record.totalBytes;
        this.writeHeader();
      }
      this.records.shift();
    }
    await this.cache.sync();
  }

  async gcStep(): Promise<void> {
    if (this.records.length > 0 || this.head === logStartBytes || this.abandoned) return;
    // Everything is written back and the backing device synced: start a new lap. The new
    // generation makes every old record unparseable, so the reset header is all it takes.
    this.generation += 1;
    this.tail = logStartBytes;
    this.head = logStartBytes;
    this.lastCrc = 0;
    this.index.clear();
    this.writeHeader();
    await this.cache.sync();
  }

  async drain(): Promise<void> {
    while (this.records.length > 0) await this.writebackStep();
  }

  check(): Promise<string[]> {
    const problems: string[] = [];
    const header = this.readHeader();
    if (header === undefined) problems.push('no valid header slot');
    else if (header.tail > this.head) problems.push(`tail ${header.tail} is past head ${this.head}`);
    for (const record of this.records) {
      if (record.position < this.tail || record.position + record.totalBytes > this.head) problems.push(`record at ${record.position} lies outside [tail, head)`);
    }
    return Promise.resolve(problems);
  }

  async close(): Promise<void> {
    await this.cache.sync();
  }

  abandon(): void {
    this.abandoned = true;
  }

  private append(kind: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | undefined): void {
    assert(!this.abandoned, 'an abandoned cache takes no writes');
    const dataBytes = data?.length ?? 0;
    const totalBytes = sectorSizeBytes + dataBytes;
    if (this.head + totalBytes > this.cache.sizeBytes) throw new PcacheError('ENOSPC', 'toy log is full');
    const bytes = new Uint8Array(totalBytes);
    if (data !== undefined) bytes.set(data, sectorSizeBytes);
    const position = this.head;
    writeU32LE(bytes, 4, recordMagic);
    writeU32LE(bytes, 8, this.generation);
    writeU32LE(bytes, 12, position);
    writeU32LE(bytes, 16, kind);
    writeU32LE(bytes, 20, data === undefined ? 0 : crc32c(data));
    writeU32LE(bytes, 24, this.lastCrc);
    writeU64LE(bytes, 28, offsetBytes);
    writeU32LE(bytes, 36, lengthBytes);
    const headerCrc = crc32c(bytes.subarray(4, sectorSizeBytes));
    writeU32LE(bytes, 0, headerCrc);
    this.blocking().writeSync(bytes, position);
    this.head += totalBytes;
    this.lastCrc = headerCrc;
    this.noteRecord({ position, kind, offsetBytes, lengthBytes, headerCrc, totalBytes });
  }

  private scan(): void {
    const blocking = this.blocking();
    const header = new Uint8Array(sectorSizeBytes);
    let position = this.tail;
    let previousCrc: number | undefined;
    while (position + sectorSizeBytes <= this.cache.sizeBytes) {
      blocking.readSync(header, position);
      const headerCrc = readU32LE(header, 0);
      if (readU32LE(header, 4) !== recordMagic || headerCrc !== crc32c(header.subarray(4))) break;
      if (readU32LE(header, 8) !== this.generation || readU32LE(header, 12) !== position) break;
      if (previousCrc !== undefined && readU32LE(header, 24) !== previousCrc) break;
      const kind = readU32LE(header, 16);
      const offsetBytes = readU64LE(header, 28);
      const lengthBytes = readU32LE(header, 36);
      const dataBytes = kind === kindData ? lengthBytes : 0;
      if ((kind !== kindData && kind !== kindZeroes) || offsetBytes + lengthBytes > this.backing.sizeBytes) break;
      if (position + sectorSizeBytes + dataBytes > this.cache.sizeBytes) break;
      if (kind === kindData && this.mutant !== 'trustRecordData') {
        const data = new Uint8Array(dataBytes);
        blocking.readSync(data, position + sectorSizeBytes);
        if (crc32c(data) !== readU32LE(header, 20)) break;
      }
      const totalBytes = sectorSizeBytes + dataBytes;
      this.noteRecord({ position, kind, offsetBytes, lengthBytes, headerCrc, totalBytes });
      previousCrc = headerCrc;
      this.lastCrc = headerCrc;
      position += totalBytes;
    }
    this.head = position;
  }

  private noteRecord(record: RecordInfo): void {
    this.records.push(record);
    const firstSector = record.offsetBytes / sectorSizeBytes;
    for (let sector = 0; sector * sectorSizeBytes < record.lengthBytes; sector += 1) {
      this.index.set(firstSector + sector, record.kind === kindZeroes ? 'zero' : record.position + (sector + 1) * sectorSizeBytes);
    }
  }

  private async writeBack(record: RecordInfo): Promise<void> {
    if (record.kind === kindZeroes) {
      await this.backing.write(new Uint8Array(record.lengthBytes), record.offsetBytes);
      return;
    }
    const data = new Uint8Array(record.lengthBytes);
    this.blocking().readSync(data, record.position + sectorSizeBytes);
    await this.backing.write(data, record.offsetBytes);
  }

  private readHeader(): { seq: number; generation: number; tail: number } | undefined {
    const blocking = this.blocking();
    let best: { seq: number; generation: number; tail: number } | undefined;
    for (let slot = 0; slot < 2; slot += 1) {
      const bytes = new Uint8Array(sectorSizeBytes);
      blocking.readSync(bytes, slot * sectorSizeBytes);
      if (readU32LE(bytes, 4) !== headerMagic || readU32LE(bytes, 0) !== crc32c(bytes.subarray(4))) continue;
      const candidate = { seq: readU32LE(bytes, 8), generation: readU32LE(bytes, 12), tail: readU32LE(bytes, 16) };
      if (candidate.tail < logStartBytes || candidate.tail > this.cache.sizeBytes) continue;
      if (best === undefined || candidate.seq > best.seq) best = candidate;
    }
    return best;
  }

  /** Overwrites the older slot, so the newest valid header is never the one being written. */
  private writeHeader(): void {
    this.seq += 1;
    const bytes = new Uint8Array(sectorSizeBytes);
    writeU32LE(bytes, 4, headerMagic);
    writeU32LE(bytes, 8, this.seq);
    writeU32LE(bytes, 12, this.generation);
    writeU32LE(bytes, 16, this.tail);
    writeU32LE(bytes, 0, crc32c(bytes.subarray(4)));
    this.blocking().writeSync(bytes, (this.seq % 2) * sectorSizeBytes);
  }

  private blocking(): NonNullable<BlockDevice['blocking']> {
    const blocking = this.cache.blocking;
    assert(blocking !== undefined, 'the cache device offers blocking I/O');
    return blocking;
  }
}

function overlay(target: Uint8Array, targetOffset: number, data: Uint8Array, dataOffset: number): void {
  const start = Math.max(targetOffset, dataOffset);
  const end = Math.min(targetOffset + target.length, dataOffset + data.length);
  if (start >= end) return;
  target.set(data.subarray(start - dataOffset, end - dataOffset), start - targetOffset);
}

/** Every toy target and mutant by name, so a replay spec can find the one that failed. */
export const toyTargets: Readonly<Record<string, () => CrashTarget>> = {
  'write-through': () => new WriteThroughTarget(),
  'write-through.flushWithoutSync': () => new WriteThroughTarget('flushWithoutSync'),
  'write-through.fuaWithoutSync': () => new WriteThroughTarget('fuaWithoutSync'),
  'write-through.reorderedFlush': () => new WriteThroughTarget('reorderedFlush'),
  'log-cache': () => new LogCacheTarget(),
  'log-cache.tailBeforeBackingSync': () => new LogCacheTarget('tailBeforeBackingSync'),
  'log-cache.trustRecordData': () => new LogCacheTarget('trustRecordData'),
  'log-cache.newestFirstWriteback': () => new LogCacheTarget('newestFirstWriteback'),
  'log-cache.batchedWriteback': () => new LogCacheTarget('batchedWriteback'),
  'log-cache.flushWithoutSync': () => new LogCacheTarget('flushWithoutSync'),
  'log-cache.recoveryResetFirst': () => new LogCacheTarget('recoveryResetFirst'),
};

export function toyTarget(name: string): CrashTarget {
  const make = toyTargets[name];
  assert(make !== undefined, `no toy target named ${name}`);
  return make();
}

/** The one command that replays a toy harness failure. */
export function toyReplayCommand(spec: string): string {
  return `npm run build && PCACHE_SIM_REPLAY='${spec}' node --test dist/test/sim/replay.test.js`;
}

/** Exhaustive-mode shape for the toys: 4 KiB blocks, 16 KiB checked, a 128 KiB cache device. */
export const toyExhaustiveShape = {
  cacheSizeBytes: 128 * 1024,
  backingSizeBytes: 16 * 1024,
  blockCount: 2,
  valueCount: 2,
  replayCommand: toyReplayCommand,
} as const;

/** Randomized-mode shape: a 4 MiB cache device (the toy log only resets once drained). */
export const toyRandomizedShape = {
  cacheSizeBytes: 4 * 1024 * 1024,
  backingSizeBytes: 64 * 1024,
  blockCount: 16,
  opsPerSegment: 120,
  segmentsPerRun: 3,
  replayCommand: toyReplayCommand,
} as const;

/** The spec inside a printed replay command. */
export function replaySpecOf(command: string): string {
  const match = /PCACHE_SIM_REPLAY='([^']*)'/.exec(command);
  assert(match?.[1] !== undefined, `no replay spec in: ${command}`);
  return match[1];
}

/** Reruns exactly what a toy replay spec names, with the shape the original run used. */
export function replayToy(spec: string, log: (line: string) => void): Promise<HarnessReport> {
  const fields = new Map(spec.trim().split(/\s+/).map((part) => [part.slice(0, part.indexOf('=')), part.slice(part.indexOf('=') + 1)]));
  const name = fields.get('target') ?? '';
  const seed = Number(fields.get('seed'));
  const common = { name, target: toyTarget(name), seed, replay: spec, log };
  return fields.get('mode') === 'exhaustive' ? runExhaustive({ ...toyExhaustiveShape, ...common }) : runRandomized({ ...toyRandomizedShape, ...common });
}
