// Workloads: the client operations the crash harness drives, and their one-line text form.
//
// An operation addresses whole blocks of the exported device (block size chosen by the
// harness) and writes one of a few payload values, so the exhaustive mode can enumerate every
// short sequence (a bounded search, as B3/CrashMonkey do) and the deep mode can draw long
// random ones. Every workload prints as text ("W0.1,flush,TF1") and parses back, so a failure
// replays from the printed line even if the enumeration order changes later.
//
// Text forms: W<block>[x<blocks>].<value> write, WF… FUA write, Z<block>[x<blocks>] write
// zeroes, ZF… with FUA, T<block>[x<blocks>] trim, TF… with FUA, R<block>[x<blocks>] read,
// flush, wb (writeback step), gc (GC step).

import { assert } from '../src/lib/assert.js';
import { PcacheError } from '../src/lib/errors.js';
import type { Prng } from './prng.js';

export type OpKind = 'write' | 'fuaWrite' | 'flush' | 'trim' | 'writeZeroes' | 'writeback' | 'gc' | 'read';

export const allOpKinds: readonly OpKind[] = ['write', 'fuaWrite', 'flush', 'trim', 'writeZeroes', 'writeback', 'gc', 'read'];
/** The exhaustive mode's default alphabet (docs/testing.md): reads are the checks. */
export const exhaustiveOpKinds: readonly OpKind[] = ['write', 'fuaWrite', 'flush', 'trim', 'writeZeroes', 'writeback', 'gc'];

export interface Extent {
  readonly block: number;
  readonly blocks: number;
}

export type WorkloadOp =
  | { readonly kind: 'write'; readonly extent: Extent; readonly value: number; readonly fua: boolean }
  | { readonly kind: 'trim'; readonly extent: Extent; readonly fua: boolean }
  | { readonly kind: 'writeZeroes'; readonly extent: Extent; readonly fua: boolean }
  | { readonly kind: 'read'; readonly extent: Extent }
  | { readonly kind: 'flush' }
  | { readonly kind: 'writeback' }
  | { readonly kind: 'gc' };

export function opText(op: WorkloadOp): string {
  switch (op.kind) {
    case 'write':
      return `W${op.fua ? 'F' : ''}${extentText(op.extent)}.${op.value}`;
    case 'trim':
      return `T${op.fua ? 'F' : ''}${extentText(op.extent)}`;
    case 'writeZeroes':
      return `Z${op.fua ? 'F' : ''}${extentText(op.extent)}`;
    case 'read':
      return `R${extentText(op.extent)}`;
    case 'flush':
      return 'flush';
    case 'writeback':
      return 'wb';
    case 'gc':
      return 'gc';
  }
}

export function workloadText(ops: readonly WorkloadOp[]): string {
  return ops.map(opText).join(',');
}

/** Parses opText's output; anything else is EINVAL (it comes from a command line). */
export function parseOp(text: string): WorkloadOp {
  if (text === 'flush') return { kind: 'flush' };
  if (text === 'wb') return { kind: 'writeback' };
  if (text === 'gc') return { kind: 'gc' };
  const match = /^([WZTR])(F?)(\d+)(?:x(\d+))?(?:\.(\d+))?$/.exec(text);
  if (match === null) throw new PcacheError('EINVAL', `not a workload operation: "${text}"`);
  const [, letter, fuaFlag, blockText, blocksText, valueText] = match;
  const extent = { block: Number(blockText), blocks: blocksText === undefined ? 1 : Number(blocksText) };
  if (extent.blocks < 1) throw new PcacheError('EINVAL', `an operation covers at least one block: "${text}"`);
  const fua = fuaFlag === 'F';
  const needsValue = letter === 'W';
  if (needsValue !== (valueText !== undefined)) throw new PcacheError('EINVAL', `only writes carry a value: "${text}"`);
  if (letter === 'W') {
    if (Number(valueText) < 1) throw new PcacheError('EINVAL', `payload values start at 1: "${text}"`);
    return { kind: 'write', extent, value: Number(valueText), fua };
  }
  if (letter === 'Z') return { kind: 'writeZeroes', extent, fua };
  if (letter === 'T') return { kind: 'trim', extent, fua };
  if (fua) throw new PcacheError('EINVAL', `a read has no FUA flag: "${text}"`);
  return { kind: 'read', extent };
}

export function parseWorkload(text: string): WorkloadOp[] {
  if (text.trim() === '') return [];
  return text.split(',').map((part) => parseOp(part.trim()));
}

export interface Alphabet {
  readonly kinds: readonly OpKind[];
  /** Blocks the operations address: [0, blockCount). */
  readonly blockCount: number;
  /** Payload values 1..valueCount. */
  readonly valueCount: number;
  /** Longest extent, in blocks. Default 1. */
  readonly extentBlocksMax?: number;
}

/** Every distinct operation of the alphabet, in a fixed order. */
export function enumerateOps(alphabet: Alphabet): WorkloadOp[] {
  assert(alphabet.blockCount >= 1 && alphabet.valueCount >= 1, 'an alphabet has blocks and values');
  const extents: Extent[] = [];
  const extentBlocksMax = alphabet.extentBlocksMax ?? 1;
  for (let blocks = 1; blocks <= extentBlocksMax; blocks += 1) {
    for (let block = 0; block + blocks <= alphabet.blockCount; block += 1) extents.push({ block, blocks });
  }
  const ops: WorkloadOp[] = [];
  for (const kind of alphabet.kinds) {
    switch (kind) {
      case 'write':
      case 'fuaWrite':
        for (const extent of extents) {
          for (let value = 1; value <= alphabet.valueCount; value += 1) ops.push({ kind: 'write', extent, value, fua: kind === 'fuaWrite' });
        }
        break;
      case 'trim':
        for (const extent of extents) ops.push({ kind: 'trim', extent, fua: false });
        break;
      case 'writeZeroes':
        for (const extent of extents) ops.push({ kind: 'writeZeroes', extent, fua: false });
        break;
      case 'read':
        for (const extent of extents) ops.push({ kind: 'read', extent });
        break;
      case 'flush':
        ops.push({ kind: 'flush' });
        break;
      case 'writeback':
        ops.push({ kind: 'writeback' });
        break;
      case 'gc':
        ops.push({ kind: 'gc' });
        break;
    }
  }
  return ops;
}

/** Every sequence of 1..lengthMax operations, shortest first, each length in lexicographic order. */
export function* enumerateWorkloads(ops: readonly WorkloadOp[], lengthMax: number): Generator<WorkloadOp[]> {
  assert(ops.length > 0, 'an alphabet has at least one operation');
  assert(lengthMax >= 1, 'workloads have at least one operation');
  for (let length = 1; length <= lengthMax; length += 1) {
    const digits = new Array<number>(length).fill(0);
    for (;;) {
      yield digits.map((digit) => ops[digit] as WorkloadOp);
      let position = length - 1;
      while (position >= 0 && digits[position] === ops.length - 1) {
        digits[position] = 0;
        position -= 1;
      }
      if (position < 0) break;
      digits[position] = (digits[position] ?? 0) + 1;
    }
  }
}

/** The number of workloads enumerateWorkloads yields. */
export function workloadCount(opCount: number, lengthMax: number): number {
  let total = 0;
  for (let length = 1; length <= lengthMax; length += 1) total += opCount ** length;
  return total;
}

export type OpWeights = Readonly<Record<OpKind, number>>;

export const defaultOpWeights: OpWeights = {
  write: 40,
  fuaWrite: 5,
  flush: 8,
  trim: 3,
  writeZeroes: 3,
  writeback: 10,
  gc: 4,
  read: 15,
};

/** One random operation; `nextValue` supplies unique payload values in the deep mode. */
export function randomOp(prng: Prng, options: { blockCount: number; extentBlocksMax: number; weights: OpWeights; nextValue: () => number }): WorkloadOp {
  const total = allOpKinds.reduce((sum, kind) => sum + options.weights[kind], 0);
  assert(total > 0, 'at least one operation kind has weight');
  let draw = prng.nextInt(total);
  let kind: OpKind = 'write';
  for (const candidate of allOpKinds) {
    draw -= options.weights[candidate];
    if (draw < 0) {
      kind = candidate;
      break;
    }
  }
  const blocks = 1 + prng.nextInt(Math.min(options.extentBlocksMax, options.blockCount));
  const extent = { block: prng.nextInt(options.blockCount - blocks + 1), blocks };
  switch (kind) {
    case 'write':
    case 'fuaWrite':
      return { kind: 'write', extent, value: options.nextValue(), fua: kind === 'fuaWrite' };
    case 'trim':
      return { kind: 'trim', extent, fua: prng.chance(0.2) };
    case 'writeZeroes':
      return { kind: 'writeZeroes', extent, fua: prng.chance(0.2) };
    case 'read':
      return { kind: 'read', extent };
    case 'flush':
      return { kind: 'flush' };
    case 'writeback':
      return { kind: 'writeback' };
    case 'gc':
      return { kind: 'gc' };
  }
}

function extentText(extent: Extent): string {
  return extent.blocks === 1 ? `${extent.block}` : `${extent.block}x${extent.blocks}`;
}
