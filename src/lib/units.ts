// Sizes, alignment, and the only bridge from 64-bit fields to JavaScript numbers.
//
// Offsets and lengths are plain numbers (exact up to 2^53). Every 64-bit value read from the
// cache device or the NBD wire goes through readU64LE/readU64BE: a value above
// Number.MAX_SAFE_INTEGER becomes +Infinity, which fails every bounds check that follows, so
// an unrepresentable value can never pass as a smaller one. Writers assert that what they
// store is a safe integer.

import { assert } from './assert.js';
import { PcacheError } from './errors.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

/** The smallest unit of I/O pcache accepts: offsets and lengths are multiples of it. */
export const sectorSizeBytes = 512;

const twoPow32 = 0x1_0000_0000;
/** The high 32-bit word of a 64-bit value must stay below this for the value to be safe. */
const safeHighWordLimit = 0x20_0000;

export function isAligned(value: number, alignment: number): boolean {
  return value % alignment === 0;
}

export function alignDown(value: number, alignment: number): number {
  return value - (value % alignment);
}

export function alignUp(value: number, alignment: number): number {
  const rest = value % alignment;
  return rest === 0 ? value : value + alignment - rest;
}

export function readU64LE(bytes: Uint8Array, offset: number): number {
  const view = viewOf(bytes);
  const low = view.getUint32(offset, true);
  const high = view.getUint32(offset + 4, true);
  return high >= safeHighWordLimit ? Number.POSITIVE_INFINITY : high * twoPow32 + low;
}

export function readU64BE(bytes: Uint8Array, offset: number): number {
  const view = viewOf(bytes);
  const high = view.getUint32(offset, false);
  const low = view.getUint32(offset + 4, false);
  return high >= safeHighWordLimit ? Number.POSITIVE_INFINITY : high * twoPow32 + low;
}

export function writeU64LE(bytes: Uint8Array, offset: number, value: number): void {
  assert(Number.isSafeInteger(value) && value >= 0, `u64 out of range: ${value}`);
  const view = viewOf(bytes);
  view.setUint32(offset, value % twoPow32, true);
  view.setUint32(offset + 4, Math.floor(value / twoPow32), true);
}

export function writeU64BE(bytes: Uint8Array, offset: number, value: number): void {
  assert(Number.isSafeInteger(value) && value >= 0, `u64 out of range: ${value}`);
  const view = viewOf(bytes);
  view.setUint32(offset, Math.floor(value / twoPow32), false);
  view.setUint32(offset + 4, value % twoPow32, false);
}

export function readU32LE(bytes: Uint8Array, offset: number): number {
  return viewOf(bytes).getUint32(offset, true);
}

export function writeU32LE(bytes: Uint8Array, offset: number, value: number): void {
  viewOf(bytes).setUint32(offset, value, true);
}

export function readU16LE(bytes: Uint8Array, offset: number): number {
  return viewOf(bytes).getUint16(offset, true);
}

export function writeU16LE(bytes: Uint8Array, offset: number, value: number): void {
  viewOf(bytes).setUint16(offset, value, true);
}

function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/**
 * Parses a size such as "4096", "512K", "16M", "1G" or "2T" (binary units). Bad input is an
 * EINVAL PcacheError naming the text.
 */
export function parseSize(text: string): number {
  const match = /^(\d+)([KMGT]?)(i?B)?$/i.exec(text.trim());
  const digits = match?.[1];
  if (match === null || digits === undefined) {
    throw new PcacheError('EINVAL', `not a size: "${text}" (use a number with an optional K, M, G or T suffix)`);
  }
  const unit = (match[2] ?? '').toUpperCase();
  const multiplier = unit === 'K' ? KiB : unit === 'M' ? MiB : unit === 'G' ? GiB : unit === 'T' ? TiB : 1;
  const value = Number(digits) * multiplier;
  if (!Number.isSafeInteger(value)) throw new PcacheError('EINVAL', `size too large: "${text}"`);
  return value;
}

/** Formats a byte count for people: "16 MiB", "1.5 GiB", "512 B". */
export function formatSize(bytes: number): string {
  const units: [number, string][] = [[TiB, 'TiB'], [GiB, 'GiB'], [MiB, 'MiB'], [KiB, 'KiB']];
  for (const [size, name] of units) {
    if (bytes >= size) {
      const value = bytes / size;
      return `${Number.isInteger(value) ? value : value.toFixed(1)} ${name}`;
    }
  }
  return `${bytes} B`;
}
