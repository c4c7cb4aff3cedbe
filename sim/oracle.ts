// Oracle: what each sector may hold after a crash, from the client's request history alone.
//
// It knows nothing about the cache (docs/testing.md, "The oracle"). Writes carry self-describing
// 512-byte sectors {magic, crc32c, lba, payloadId, sectorIndex, filler}, so any sector read
// back maps to exactly one (write, sector), or to zeroes, or is garbage or misplaced. The CRC
// sits near the front and covers the bytes after it. It must not sit at the end: a CRC32C
// followed by its own value leaves the CRC register in a fixed residue, so the CRC32C of any
// run of such sectors would be one constant, and a system under test that checksums its data
// with CRC32C (as pcache does) could not tell stale payload sectors from the real ones. A
// RequestHistory records when each request was issued and answered, both in its own logical
// time (a counter that orders every issue and reply) and in device-event time (the crash
// simulator's boundary index). Cutting the history at a crash boundary gives an OracleView:
//
// - a write (or WRITE_ZEROES) is *required* if it succeeded with FUA, or succeeded before a
//   successful FLUSH was issued, both answered before the crash;
// - allowed(s) = the values of every request to s issued before the crash that did not
//   finish before some required request to s was issued, plus the initial value when s has
//   no required request. A TRIM contributes "zero"; it never supersedes anything, so the
//   value it trimmed ("unchanged") stays allowed;
// - floor(s) = the newest required values (several if they overlapped in time).
// With no concurrency this is the textbook rule: floor plus everything sent after it.
//
// Invariants: requests are 512-byte aligned (the NBD layer guarantees it); logical times
// strictly increase; device-event times never decrease; a view never changes the history.

import { assert } from '../src/lib/assert.js';
import { crc32c } from '../src/lib/crc32c.js';
import { readU64LE, sectorSizeBytes, writeU32LE, writeU64LE } from '../src/lib/units.js';
import { isZero } from './page_image.js';

/** Little-endian "PCOR" (pcache oracle record) at the start of every payload sector. */
const payloadMagic = 0x524f4350;
const magicOffset = 0;
const crcOffset = 4;
/** The CRC covers everything after its own field. */
const crcCoveredOffset = 8;
const lbaOffset = 8;
const payloadIdOffset = 16;
const sectorIndexOffset = 20;
const fillerOffset = 24;

/** Value keys: 0 is zeroes, positive keys are (payloadId, sectorIndex), negatives never match. */
export const zeroValue = 0;
export const garbageValue = -1;
export const misplacedValue = -2;
/** sectorIndex must fit below this (a request of up to 64 MiB), so keys stay exact. */
const sectorIndexLimit = 2 ** 17;
const payloadIdMax = 0xffff_ffff;
const requestsMaxDefault = 1_000_000;
const zeroChunkBytes = 4096;
const zeroChunk = new Uint8Array(zeroChunkBytes);

/** Writes one self-describing sector. */
export function writePayloadSector(target: Uint8Array, lba: number, payloadId: number, sectorIndex: number): void {
  assert(target.length === sectorSizeBytes, 'a payload sector is 512 bytes');
  assert(Number.isInteger(payloadId) && payloadId >= 1 && payloadId <= payloadIdMax, `payload id out of range: ${payloadId}`);
  assert(Number.isInteger(sectorIndex) && sectorIndex >= 0 && sectorIndex < sectorIndexLimit - 1, `sector index out of range: ${sectorIndex}`);
  writeU32LE(target, magicOffset, payloadMagic);
  writeU64LE(target, lbaOffset, lba);
  writeU32LE(target, payloadIdOffset, payloadId);
  writeU32LE(target, sectorIndexOffset, sectorIndex);
  // Filler that differs per sector and per write, so no two payload sectors are alike and an
  // engine cannot pass by accident (xorshift32 seeded from the sector's identity).
  let state = (Math.imul(payloadId, 0x9e3779b1) ^ Math.imul(lba + 1, 0x85ebca6b) ^ sectorIndex) | 1;
  for (let offset = fillerOffset; offset < sectorSizeBytes; offset += 4) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    writeU32LE(target, offset, state >>> 0);
  }
  writeU32LE(target, crcOffset, crc32c(target.subarray(crcCoveredOffset)));
}

/** Fills `target` (sector multiple) as the payload of write `payloadId` at `offsetBytes`. */
export function fillPayload(target: Uint8Array, offsetBytes: number, payloadId: number): void {
  assert(target.length % sectorSizeBytes === 0, 'payloads are whole sectors');
  assert(offsetBytes % sectorSizeBytes === 0, 'payloads are sector aligned');
  const firstLba = offsetBytes / sectorSizeBytes;
  for (let index = 0; index * sectorSizeBytes < target.length; index += 1) {
    writePayloadSector(target.subarray(index * sectorSizeBytes, (index + 1) * sectorSizeBytes), firstLba + index, payloadId, index);
  }
}

export function payloadValue(payloadId: number, sectorIndex: number): number {
  return payloadId * sectorIndexLimit + sectorIndex + 1;
}

export type SectorContent =
  | { readonly kind: 'zero' }
  | { readonly kind: 'payload'; readonly payloadId: number; readonly sectorIndex: number }
  | { readonly kind: 'misplaced'; readonly lba: number; readonly payloadId: number; readonly sectorIndex: number }
  | { readonly kind: 'garbage' };

/** What one 512-byte sector read from logical block `lba` holds. */
export function decodeSector(bytes: Uint8Array, lba: number): SectorContent {
  assert(bytes.length === sectorSizeBytes, 'decode one sector at a time');
  if (isZero(bytes)) return { kind: 'zero' };
  if (u32(bytes, magicOffset) !== payloadMagic) return { kind: 'garbage' };
  if (u32(bytes, crcOffset) !== crc32c(bytes.subarray(crcCoveredOffset))) return { kind: 'garbage' };
  const foundLba = readU64LE(bytes, lbaOffset);
  const payloadId = u32(bytes, payloadIdOffset);
  const sectorIndex = u32(bytes, sectorIndexOffset);
  if (payloadId === 0 || sectorIndex >= sectorIndexLimit - 1) return { kind: 'garbage' };
  if (foundLba !== lba) return { kind: 'misplaced', lba: foundLba, payloadId, sectorIndex };
  return { kind: 'payload', payloadId, sectorIndex };
}

/** decodeSector as a value key, without allocating (the oracle decodes every sector it checks). */
export function sectorValue(bytes: Uint8Array, lba: number): number {
  assert(bytes.length === sectorSizeBytes, 'decode one sector at a time');
  if (isZero(bytes)) return zeroValue;
  return nonZeroSectorValue(bytes, lba);
}

function nonZeroSectorValue(bytes: Uint8Array, lba: number): number {
  if (u32(bytes, magicOffset) !== payloadMagic) return garbageValue;
  if (u32(bytes, crcOffset) !== crc32c(bytes.subarray(crcCoveredOffset))) return garbageValue;
  const payloadId = u32(bytes, payloadIdOffset);
  const sectorIndex = u32(bytes, sectorIndexOffset);
  if (payloadId === 0 || sectorIndex >= sectorIndexLimit - 1) return garbageValue;
  const lbaMatches = u32(bytes, lbaOffset) === lba % 0x1_0000_0000 && u32(bytes, lbaOffset + 4) === Math.floor(lba / 0x1_0000_0000);
  return lbaMatches ? payloadValue(payloadId, sectorIndex) : misplacedValue;
}

function u32(bytes: Uint8Array, offset: number): number {
  return ((bytes[offset] ?? 0) | ((bytes[offset + 1] ?? 0) << 8) | ((bytes[offset + 2] ?? 0) << 16) | ((bytes[offset + 3] ?? 0) << 24)) >>> 0;
}

export function describeValue(value: number): string {
  if (value === zeroValue) return 'zero';
  if (value === garbageValue) return 'garbage';
  if (value === misplacedValue) return 'misplaced';
  assert(value > 0, `unknown value key ${value}`);
  const payloadId = Math.floor((value - 1) / sectorIndexLimit);
  return `write#${payloadId}[${(value - 1) % sectorIndexLimit}]`;
}

/** Decodes every sector of `bytes`, read from `offsetBytes`, into value keys. */
export function sectorValues(bytes: Uint8Array, offsetBytes: number): Float64Array {
  assert(bytes.length % sectorSizeBytes === 0 && offsetBytes % sectorSizeBytes === 0, 'whole, aligned sectors');
  const firstLba = offsetBytes / sectorSizeBytes;
  const values = new Float64Array(bytes.length / sectorSizeBytes);
  // Most sectors of a checked range were never written: skip zero runs a chunk at a time with
  // a native compare before decoding sector by sector.
  for (let chunkStart = 0; chunkStart < bytes.length; chunkStart += zeroChunkBytes) {
    const chunkEnd = Math.min(chunkStart + zeroChunkBytes, bytes.length);
    const chunk = bytes.subarray(chunkStart, chunkEnd);
    if (Buffer.compare(chunk, zeroChunk.subarray(0, chunk.length)) === 0) continue;
    for (let offset = chunkStart; offset < chunkEnd; offset += sectorSizeBytes) {
      const index = offset / sectorSizeBytes;
      values[index] = sectorValue(bytes.subarray(offset, offset + sectorSizeBytes), firstLba + index);
    }
  }
  return values;
}

export type RequestKind = 'read' | 'write' | 'flush' | 'trim' | 'writeZeroes';

export interface HistoryRequest {
  readonly serial: number;
  readonly kind: RequestKind;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly fua: boolean;
  /** For writes: the payload id the data was filled with. */
  readonly payloadId: number;
  /** Logical times: every issue and reply takes the next one. */
  readonly issueTime: number;
  replyTime: number | undefined;
  /** Device-event times (crash boundaries) at issue and reply. */
  readonly issueClock: number;
  replyClock: number | undefined;
  ok: boolean | undefined;
}

export type ViolationReason = 'garbage' | 'misplaced' | 'stale' | 'unexpected' | 'unstable' | 'not-a-prefix';

export interface SectorViolation {
  readonly sector: number;
  readonly reason: ViolationReason;
  readonly found: string;
  readonly expected: readonly string[];
}

export function formatViolation(violation: SectorViolation): string {
  return `sector ${violation.sector}: found ${violation.found}, expected one of {${violation.expected.join(', ')}} (${violation.reason})`;
}

export interface RequestHistoryOptions {
  readonly sizeBytes: number;
  /** Device-event time; default: always 0 (no crash simulator). */
  readonly clock?: () => number;
  /** Value key of each sector before the first request; default zeroes. */
  readonly initial?: (sector: number) => number;
  readonly requestsMax?: number;
}

export class RequestHistory {
  readonly sizeBytes: number;
  readonly requestsMax: number;
  private readonly clock: () => number;
  private readonly initial: (sector: number) => number;
  private readonly requests: HistoryRequest[] = [];
  /** Per sector: the write, trim and write-zeroes requests touching it, in issue order. */
  private readonly bySector = new Map<number, HistoryRequest[]>();
  private readonly flushes: HistoryRequest[] = [];
  private time = 0;

  constructor(options: RequestHistoryOptions) {
    assert(options.sizeBytes % sectorSizeBytes === 0, 'the device is whole sectors');
    this.sizeBytes = options.sizeBytes;
    this.requestsMax = options.requestsMax ?? requestsMaxDefault;
    this.clock = options.clock ?? (() => 0);
    this.initial = options.initial ?? (() => zeroValue);
  }

  get length(): number {
    return this.requests.length;
  }

  get all(): readonly HistoryRequest[] {
    return this.requests;
  }

  issueWrite(offsetBytes: number, lengthBytes: number, payloadId: number, options: { fua: boolean }): HistoryRequest {
    assert(payloadId >= 1, 'writes carry a payload id');
    return this.issue('write', offsetBytes, lengthBytes, options.fua, payloadId);
  }

  issueFlush(): HistoryRequest {
    return this.issue('flush', 0, 0, false, 0);
  }

  issueTrim(offsetBytes: number, lengthBytes: number, options: { fua: boolean }): HistoryRequest {
    return this.issue('trim', offsetBytes, lengthBytes, options.fua, 0);
  }

  issueWriteZeroes(offsetBytes: number, lengthBytes: number, options: { fua: boolean }): HistoryRequest {
    return this.issue('writeZeroes', offsetBytes, lengthBytes, options.fua, 0);
  }

  issueRead(offsetBytes: number, lengthBytes: number): HistoryRequest {
    return this.issue('read', offsetBytes, lengthBytes, false, 0);
  }

  reply(request: HistoryRequest, ok: boolean): void {
    assert(request.replyTime === undefined, `request ${request.serial} answered twice`);
    this.time += 1;
    request.replyTime = this.time;
    request.replyClock = this.clock();
    request.ok = ok;
  }

  /** The oracle for a crash at device-event boundary `clock` (the state after `clock` events). */
  cut(clock: number): OracleView {
    return new OracleView(this, clock);
  }

  /** The oracle with no crash: everything answered so far counts. */
  now(): OracleView {
    return new OracleView(this, Number.POSITIVE_INFINITY);
  }

  /**
   * Checks a completed read during normal operation: each sector must hold a value no older
   * than the last write that finished before the read was issued.
   */
  checkRead(read: HistoryRequest, bytes: Uint8Array): SectorViolation[] {
    assert(read.kind === 'read' && read.replyTime !== undefined, 'check a read once it has been answered');
    assert(bytes.length === read.lengthBytes, 'the bytes are the read');
    const replyTime = read.replyTime;
    const violations: SectorViolation[] = [];
    const firstSector = read.offsetBytes / sectorSizeBytes;
    for (let index = 0; index * sectorSizeBytes < bytes.length; index += 1) {
      const sector = firstSector + index;
      const candidates = this.requestsAt(sector).filter((request) => request.issueTime < replyTime);
      const required = candidates.filter((request) => succeeded(request) && supersedes(request) && (request.replyTime ?? Infinity) < read.issueTime);
      const allowed = this.allowedAmong(sector, candidates, required);
      const found = sectorValue(bytes.subarray(index * sectorSizeBytes, (index + 1) * sectorSizeBytes), sector);
      if (!allowed.has(found)) violations.push(this.violation(sector, found, allowed, candidates));
    }
    return violations;
  }

  /** @internal */
  initialValue(sector: number): number {
    return this.initial(sector);
  }

  /** @internal Requests touching `sector`, in issue order. */
  requestsAt(sector: number): readonly HistoryRequest[] {
    return this.bySector.get(sector) ?? [];
  }

  /** @internal Flushes in issue order. */
  flushList(): readonly HistoryRequest[] {
    return this.flushes;
  }

  /** @internal allowed = candidates not finished before a required one was issued, plus initial. */
  allowedAmong(sector: number, candidates: readonly HistoryRequest[], required: readonly HistoryRequest[]): Set<number> {
    let newestRequiredIssue = -1;
    for (const request of required) newestRequiredIssue = Math.max(newestRequiredIssue, request.issueTime);
    const allowed = new Set<number>();
    if (required.length === 0) allowed.add(this.initial(sector));
    for (const request of candidates) {
      if (request.replyTime !== undefined && request.replyTime < newestRequiredIssue) continue;
      allowed.add(valueAt(request, sector));
    }
    return allowed;
  }

  /** @internal */
  violation(sector: number, found: number, allowed: ReadonlySet<number>, candidates: readonly HistoryRequest[]): SectorViolation {
    let reason: ViolationReason;
    if (found === garbageValue) reason = 'garbage';
    else if (found === misplacedValue) reason = 'misplaced';
    else if (found === this.initial(sector) || candidates.some((request) => valueAt(request, sector) === found)) reason = 'stale';
    else reason = 'unexpected';
    return { sector, reason, found: describeValue(found), expected: [...allowed].map(describeValue) };
  }

  private issue(kind: RequestKind, offsetBytes: number, lengthBytes: number, fua: boolean, payloadId: number): HistoryRequest {
    assert(this.requests.length < this.requestsMax, `more than ${this.requestsMax} requests in one history`);
    assert(offsetBytes % sectorSizeBytes === 0 && lengthBytes % sectorSizeBytes === 0, 'requests are sector aligned');
    assert(offsetBytes >= 0 && offsetBytes + lengthBytes <= this.sizeBytes, `request ${offsetBytes}+${lengthBytes} is out of range`);
    assert(lengthBytes / sectorSizeBytes < sectorIndexLimit - 1 || kind !== 'write', 'a write is at most 64 MiB');
    this.time += 1;
    const request: HistoryRequest = {
      serial: this.requests.length + 1,
      kind,
      offsetBytes,
      lengthBytes,
      fua,
      payloadId,
      issueTime: this.time,
      replyTime: undefined,
      issueClock: this.clock(),
      replyClock: undefined,
      ok: undefined,
    };
    this.requests.push(request);
    if (kind === 'flush') this.flushes.push(request);
    if (kind === 'write' || kind === 'trim' || kind === 'writeZeroes') {
      const first = offsetBytes / sectorSizeBytes;
      for (let sector = first; sector < first + lengthBytes / sectorSizeBytes; sector += 1) {
        let list = this.bySector.get(sector);
        if (list === undefined) {
          list = [];
          this.bySector.set(sector, list);
        }
        list.push(request);
      }
    }
    return request;
  }
}

/** Epoch k's limits: writes answered before `requiredBefore` are in; those issued after `nextReply` are out. */
interface EpochBounds {
  readonly requiredBefore: number;
  readonly nextReply: number;
}

/**
 * Sector values (from sector 0) given as a base plus the sectors where they may differ: how
 * the crash simulator describes the many crash states built on one durable image, each of
 * which differs from it only where its applied writes landed.
 */
export interface SectorValuesDelta {
  /** Values of the shared image; never changed (checks cache what they learn per base). */
  readonly base: Float64Array;
  /** Sectors whose value may differ from the base, increasing. */
  readonly sectors: Int32Array;
  /** Their values. */
  readonly values: Float64Array;
}

/** The values a delta describes, as one array. */
export function expandDelta(delta: SectorValuesDelta): Float64Array {
  const values = delta.base.slice();
  for (let index = 0; index < delta.sectors.length; index += 1) values[delta.sectors[index] ?? 0] = delta.values[index] ?? garbageValue;
  return values;
}

/** How far one base has been scanned for sectors that do not fit one epoch, and those found. */
interface MisfitScan {
  readonly misfits: number[];
  next: number;
}

/** The oracle for one crash boundary. Cheap to build; computes per sector on demand. */
export class OracleView {
  private readonly flushIssueMax: number;
  private readonly candidateCache = new Map<number, HistoryRequest[]>();
  /** Per base of checkEpochPrefixDelta, per epoch: the misfit scan so far. */
  private readonly misfitScans = new WeakMap<Float64Array, MisfitScan[]>();

  constructor(
    private readonly history: RequestHistory,
    readonly clock: number,
  ) {
    let flushIssueMax = -1;
    for (const flush of history.flushList()) {
      if (this.answeredOk(flush)) flushIssueMax = Math.max(flushIssueMax, flush.issueTime);
    }
    this.flushIssueMax = flushIssueMax;
  }

  /** Required values: the newest writes to `sector` that must have survived. */
  floor(sector: number): number[] {
    const required = this.required(sector);
    if (required.length === 0) return [...this.history.allowedAmong(sector, [], [])];
    let newestIssue = -1;
    for (const request of required) newestIssue = Math.max(newestIssue, request.issueTime);
    const newest = required.filter((request) => !((request.replyTime ?? Infinity) < newestIssue));
    return [...new Set(newest.map((request) => valueAt(request, sector)))];
  }

  allowed(sector: number): Set<number> {
    return this.history.allowedAmong(sector, this.candidates(sector), this.required(sector));
  }

  /** Checks sectors read after recovery (from `offsetBytes`) against allowed(s). */
  checkSectors(bytes: Uint8Array, offsetBytes: number): SectorViolation[] {
    return this.checkValues(sectorValues(bytes, offsetBytes), offsetBytes / sectorSizeBytes);
  }

  /** As checkSectors, for values already decoded with sectorValues. */
  checkValues(values: Float64Array, firstSector: number): SectorViolation[] {
    const violations: SectorViolation[] = [];
    for (let index = 0; index < values.length; index += 1) {
      const sector = firstSector + index;
      const found = values[index] ?? garbageValue;
      const candidates = this.candidates(sector);
      // Fast path for sectors nobody wrote: they must read as the initial value.
      if (candidates.length === 0 && found === this.history.initialValue(sector)) continue;
      const allowed = this.history.allowedAmong(sector, candidates, this.required(sector));
      if (!allowed.has(found)) violations.push(this.history.violation(sector, found, allowed, candidates));
    }
    return violations;
  }

  /**
   * The backing device alone must hold a prefix of the flush epochs: for some k, every write
   * finished before flush k was issued is there (or superseded), nothing issued after flush
   * k+1 was answered is there, and anything in between may or may not be. Returns the largest
   * such k, or the violations for the k that comes closest.
   */
  checkEpochPrefix(values: Float64Array, firstSector: number): { epoch: number | undefined; violations: SectorViolation[] } {
    const flushes = this.epochFlushes();
    // The common case is a valid prefix: test each epoch without allocating, newest first.
    for (let epoch = flushes.length; epoch >= 0; epoch -= 1) {
      const epochBounds = this.epochBounds(flushes, epoch);
      let fits = true;
      for (let index = 0; index < values.length && fits; index += 1) fits = this.fitsEpoch(firstSector + index, values[index] ?? garbageValue, epochBounds);
      if (fits) return { epoch, violations: [] };
    }
    return this.describeNoPrefix(values, firstSector, flushes);
  }

  /**
   * checkEpochPrefix of `expandDelta(delta)` (sectors from 0), with the same answer, at the
   * cost of the sectors the delta lists: an epoch fits when every sector of the base that
   * does not fit it is listed and every listed value fits. The base's misfits are found by a
   * scan that stops at the first unlisted one and is kept for the next delta on the same
   * base, so the states of a drain, which share a few bases, scan each base about once.
   */
  checkEpochPrefixDelta(delta: SectorValuesDelta): { epoch: number | undefined; violations: SectorViolation[] } {
    const flushes = this.epochFlushes();
    let scans = this.misfitScans.get(delta.base);
    if (scans === undefined) {
      scans = [];
      this.misfitScans.set(delta.base, scans);
    }
    for (let epoch = flushes.length; epoch >= 0; epoch -= 1) {
      const epochBounds = this.epochBounds(flushes, epoch);
      let scan = scans[epoch];
      if (scan === undefined) {
        scan = { misfits: [], next: 0 };
        scans[epoch] = scan;
      }
      if (this.deltaFits(delta, scan, epochBounds)) return { epoch, violations: [] };
    }
    return this.describeNoPrefix(expandDelta(delta), 0, flushes);
  }

  private deltaFits(delta: SectorValuesDelta, scan: MisfitScan, bounds: EpochBounds): boolean {
    const { base, sectors, values } = delta;
    // Every misfit of the base must be among the listed sectors (both lists increase).
    let listed = 0;
    for (let index = 0; ; index += 1) {
      while (scan.misfits.length <= index && scan.next < base.length) {
        const sector = scan.next;
        scan.next += 1;
        if (!this.fitsEpoch(sector, base[sector] ?? garbageValue, bounds)) scan.misfits.push(sector);
      }
      const misfit = scan.misfits[index];
      if (misfit === undefined) break;
      while (listed < sectors.length && (sectors[listed] ?? 0) < misfit) listed += 1;
      if (sectors[listed] !== misfit) return false;
    }
    for (let index = 0; index < sectors.length; index += 1) {
      if (!this.fitsEpoch(sectors[index] ?? 0, values[index] ?? garbageValue, bounds)) return false;
    }
    return true;
  }

  /** The flushes issued before the crash: flush k closes epoch k. */
  private epochFlushes(): HistoryRequest[] {
    return this.history.flushList().filter((flush) => flush.issueClock <= this.clock);
  }

  private epochBounds(flushes: readonly HistoryRequest[], epoch: number): EpochBounds {
    const closing = epoch >= 1 ? flushes[epoch - 1] : undefined;
    const next = flushes[epoch];
    return {
      requiredBefore: closing === undefined ? -1 : closing.issueTime,
      nextReply: next !== undefined && this.answered(next) ? (next.replyTime ?? Infinity) : Infinity,
    };
  }

  /** No epoch fits `values`: the violations of the epoch with the fewest bad sectors. */
  private describeNoPrefix(values: Float64Array, firstSector: number, flushes: readonly HistoryRequest[]): { epoch: number | undefined; violations: SectorViolation[] } {
    const bounds = (epoch: number): EpochBounds => this.epochBounds(flushes, epoch);
    // No epoch fits: describe the one with the fewest bad sectors.
    let best = { epoch: 0, failures: Number.POSITIVE_INFINITY };
    for (let epoch = flushes.length; epoch >= 0; epoch -= 1) {
      const epochBounds = bounds(epoch);
      let failures = 0;
      for (let index = 0; index < values.length && failures < best.failures; index += 1) {
        if (!this.fitsEpoch(firstSector + index, values[index] ?? garbageValue, epochBounds)) failures += 1;
      }
      if (failures < best.failures) best = { epoch, failures };
    }
    const epochBounds = bounds(best.epoch);
    const violations: SectorViolation[] = [];
    for (let index = 0; index < values.length; index += 1) {
      const sector = firstSector + index;
      const found = values[index] ?? garbageValue;
      if (this.fitsEpoch(sector, found, epochBounds)) continue;
      const all = this.candidates(sector);
      const candidates = all.filter((request) => request.issueTime < epochBounds.nextReply);
      const required = candidates.filter((request) => this.requiredForEpoch(request, epochBounds));
      const violation = this.history.violation(sector, found, this.history.allowedAmong(sector, candidates, required), all);
      const reason = violation.reason === 'garbage' || violation.reason === 'misplaced' ? violation.reason : 'not-a-prefix';
      violations.push({ ...violation, reason, expected: [...violation.expected, `(closest: epoch ${best.epoch})`] });
    }
    return { epoch: undefined, violations };
  }

  /** Whether `found` may be at `sector` when the device holds epochs before k and part of k. */
  private fitsEpoch(sector: number, found: number, bounds: EpochBounds): boolean {
    const candidates = this.candidates(sector);
    let newestRequiredIssue = -1;
    for (const request of candidates) {
      if (request.issueTime < bounds.nextReply && this.requiredForEpoch(request, bounds)) newestRequiredIssue = Math.max(newestRequiredIssue, request.issueTime);
    }
    if (newestRequiredIssue < 0 && found === this.history.initialValue(sector)) return true;
    for (const request of candidates) {
      if (request.issueTime >= bounds.nextReply) continue;
      if (request.replyTime !== undefined && request.replyTime < newestRequiredIssue) continue;
      if (valueAt(request, sector) === found) return true;
    }
    return false;
  }

  private requiredForEpoch(request: HistoryRequest, bounds: EpochBounds): boolean {
    return succeeded(request) && supersedes(request) && this.answered(request) && (request.replyTime ?? Infinity) < bounds.requiredBefore;
  }

  /**
   * The history behind one sector, for violation reports: every request to it and every
   * flush, in issue order, with logical issue/reply times and device-event clocks.
   */
  explainSector(sector: number, linesMax = 24): string[] {
    const touching = new Set(this.candidates(sector));
    const flushes = this.history.flushList().filter((flush) => flush.issueClock <= this.clock);
    const relevant = [...touching, ...flushes].sort((a, b) => a.issueTime - b.issueTime);
    const lines = relevant.map((request) => {
      const reply = request.replyTime === undefined || !this.answered(request) ? 'no reply before the crash' : `replied ${request.ok === true ? 'ok' : 'with an error'} at t=${request.replyTime}`;
      const what = request.kind === 'flush' ? 'flush' : `${request.kind}${request.fua ? '+fua' : ''} ${request.kind === 'write' ? `#${request.payloadId} ` : ''}[${request.offsetBytes / sectorSizeBytes}, +${request.lengthBytes / sectorSizeBytes})`;
      return `  request ${request.serial}: ${what} issued at t=${request.issueTime} (event ${request.issueClock}), ${reply}`;
    });
    const shown = lines.length > linesMax ? [...lines.slice(0, 4), `  ... ${lines.length - linesMax} more ...`, ...lines.slice(-(linesMax - 4))] : lines;
    return [`history of sector ${sector} (initial ${describeValue(this.history.initialValue(sector))}):`, ...shown];
  }

  private candidates(sector: number): readonly HistoryRequest[] {
    const all = this.history.requestsAt(sector);
    if (all.length === 0) return all;
    // A view is checked against many crash states: filter each sector's requests once.
    let cut = this.candidateCache.get(sector);
    if (cut === undefined) {
      cut = all.filter((request) => request.issueClock <= this.clock);
      this.candidateCache.set(sector, cut);
    }
    return cut;
  }

  private required(sector: number): HistoryRequest[] {
    return this.candidates(sector).filter(
      (request) => supersedes(request) && this.answeredOk(request) && (request.fua || (request.replyTime ?? Infinity) < this.flushIssueMax),
    );
  }

  private answered(request: HistoryRequest): boolean {
    return request.replyClock !== undefined && request.replyClock <= this.clock;
  }

  private answeredOk(request: HistoryRequest): boolean {
    return this.answered(request) && request.ok === true;
  }
}

/** Compares two reads of the same range (after two recoveries, say); lists the differences. */
export function compareReads(first: Uint8Array, second: Uint8Array, offsetBytes: number): SectorViolation[] {
  assert(first.length === second.length, 'compare reads of one range');
  const violations: SectorViolation[] = [];
  if (Buffer.compare(first, second) === 0) return violations;
  const firstLba = offsetBytes / sectorSizeBytes;
  for (let index = 0; index * sectorSizeBytes < first.length; index += 1) {
    const a = first.subarray(index * sectorSizeBytes, (index + 1) * sectorSizeBytes);
    const b = second.subarray(index * sectorSizeBytes, (index + 1) * sectorSizeBytes);
    if (Buffer.compare(a, b) === 0) continue;
    const lba = firstLba + index;
    violations.push({ sector: lba, reason: 'unstable', found: describeValue(sectorValue(b, lba)), expected: [describeValue(sectorValue(a, lba))] });
  }
  return violations;
}

function succeeded(request: HistoryRequest): boolean {
  return request.ok === true;
}

/** Writes and WRITE_ZEROES replace what was there; a TRIM may leave it ("unchanged"). */
function supersedes(request: HistoryRequest): boolean {
  return request.kind === 'write' || request.kind === 'writeZeroes';
}

function valueAt(request: HistoryRequest, sector: number): number {
  if (request.kind !== 'write') return zeroValue;
  return payloadValue(request.payloadId, sector - request.offsetBytes / sectorSizeBytes);
}
