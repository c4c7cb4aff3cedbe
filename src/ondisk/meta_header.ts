// The header every small metadata record starts with, and the dual-copy rule.
//
//   offset  size  field
//   0       4     crc      CRC32C of the record's bytes from offset 4 to its end
//   4       1     seq      sequence number of this copy (8-bit, wraps around)
//   5       1     version  format version of the device the record belongs to
//   6       2     reserved zero
//
// Small records are stored twice. A reader takes the valid copy (CRC matches, fields in
// bounds) with the later seq, comparing with 8-bit wrap-around: a is later than b iff
// (int8)(a - b) > 0. A writer always overwrites the older or invalid copy with seq = newest + 1,
// so the newest valid copy is never the one being written: a write torn by power loss leaves
// the previous value readable.

import { crc32c } from '../lib/crc32c.js';
import { isAllZero, readU32LE, writeU32LE } from '../lib/units.js';
import type { FormatVersion } from './layout.js';

/** The version byte: a cache's format version, or the volume pool's (pool_layout.ts). */
export type MetaVersion = FormatVersion | 3;

export const metaHeaderBytes = 8;

export type Decoded<T> =
  | { readonly ok: true; readonly value: T; readonly seq: number }
  /** `blank`: the copy was never written (all zero), which a fresh format leaves; not damage. */
  | { readonly ok: false; readonly problem: string; readonly blank?: true };

/** Stamps seq, version and CRC into a record whose fields after the header are filled in. */
export function sealMetaRecord(record: Uint8Array, seq: number, version: MetaVersion): Uint8Array {
  record[4] = seq & 0xff;
  record[5] = version;
  record[6] = 0;
  record[7] = 0;
  writeU32LE(record, 0, crc32c(record.subarray(4)));
  return record;
}

/** The version byte of a record, before anything is checked. */
export function metaRecordVersion(record: Uint8Array): number {
  return record[5] ?? 0;
}

/** Checks CRC and version (that of the device it was read from); returns the copy's seq, or why the copy is unusable. */
export function checkMetaRecord(record: Uint8Array, name: string, version: MetaVersion): { seq: number } | { problem: string; blank?: true } {
  if (isAllZero(record)) return { problem: `${name}: never written (all zero)`, blank: true };
  const stored = readU32LE(record, 0);
  const computed = crc32c(record.subarray(4));
  if (stored !== computed) return { problem: `${name}: CRC mismatch (stored ${hex(stored)}, computed ${hex(computed)})` };
  const found = metaRecordVersion(record);
  if (found !== version) return { problem: `${name}: format version ${found}, expected ${version}` };
  return { seq: record[4] ?? 0 };
}

/** 8-bit wrap-around order: true when seq `a` was written after seq `b`. */
export function seqAfter(a: number, b: number): boolean {
  const difference = (a - b) & 0xff;
  return difference !== 0 && difference < 0x80;
}

export interface DualCopyChoice<T> {
  /** The value of the newest valid copy, or undefined when neither copy is valid. */
  readonly value: T | undefined;
  /** Index (0 or 1) of the newest valid copy, or undefined. */
  readonly latestIndex: 0 | 1 | undefined;
  readonly latestSeq: number;
  /** Why each invalid copy was rejected. */
  readonly problems: string[];
  /** The problems of copies that were written but fail their checks (blank copies left out). */
  readonly damage: string[];
  /** Which copies are valid. */
  readonly copiesValid: readonly [boolean, boolean];
}

/** Picks the newest valid copy of a dual-copy record. */
export function chooseLatest<T>(copies: readonly [Decoded<T>, Decoded<T>]): DualCopyChoice<T> {
  const [first, second] = copies;
  const problems: string[] = [];
  const damage: string[] = [];
  for (const copy of copies) {
    if (copy.ok) continue;
    problems.push(copy.problem);
    if (copy.blank !== true) damage.push(copy.problem);
  }
  const copiesValid: [boolean, boolean] = [first.ok, second.ok];
  if (first.ok && (!second.ok || !seqAfter(second.seq, first.seq))) {
    return { value: first.value, latestIndex: 0, latestSeq: first.seq, problems, damage, copiesValid };
  }
  if (second.ok) return { value: second.value, latestIndex: 1, latestSeq: second.seq, problems, damage, copiesValid };
  return { value: undefined, latestIndex: undefined, latestSeq: 0, problems, damage, copiesValid };
}

/**
 * Where the next write of a dual-copy record goes: the copy that is not the newest valid one,
 * with the next sequence number. The owner of the record calls `target()`, writes the record
 * there, and calls `written()` only once the write succeeded: a failed write leaves the
 * writer where it was, so a retry overwrites the same (older) copy and never the newest one.
 * Writes of one record are never concurrent; its owner serialises them.
 */
export class DualCopyWriter {
  private latestIndex: 0 | 1 | undefined;
  private latestSeq: number;

  constructor(choice: { latestIndex: 0 | 1 | undefined; latestSeq: number }) {
    this.latestIndex = choice.latestIndex;
    this.latestSeq = choice.latestSeq;
  }

  target(): { index: 0 | 1; seq: number } {
    return { index: this.latestIndex === 0 ? 1 : 0, seq: (this.latestSeq + 1) & 0xff };
  }

  written(slot: { index: 0 | 1; seq: number }): void {
    this.latestIndex = slot.index;
    this.latestSeq = slot.seq;
  }
}

export function hex(value: number): string {
  return `0x${value.toString(16).padStart(8, '0')}`;
}
