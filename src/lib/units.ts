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

// The byte helpers below index the array directly: a DataView per call would allocate on the
// hot path (every key encoded into a kset goes through them).

export function readU32LE(bytes: Uint8Array, offset: number): number {
  return ((bytes[offset] ?? 0) | ((bytes[offset + 1] ?? 0) << 8) | ((bytes[offset + 2] ?? 0) << 16)) + (bytes[offset + 3] ?? 0) * 0x100_0000;
}

export function writeU32LE(bytes: Uint8Array, offset: number, value: number): void {
  bytes[offset] = value & 0xff;
  bytes[offset + 1] = (value >>> 8) & 0xff;
  bytes[offset + 2] = (value >>> 16) & 0xff;
  bytes[offset + 3] = (value >>> 24) & 0xff;
}

export function readU16LE(bytes: Uint8Array, offset: number): number {
  return (bytes[offset] ?? 0) | ((bytes[offset + 1] ?? 0) << 8);
}

export function writeU16LE(bytes: Uint8Array, offset: number, value: number): void {
  bytes[offset] = value & 0xff;
  bytes[offset + 1] = (value >>> 8) & 0xff;
}

function readU32BE(bytes: Uint8Array, offset: number): number {
  return (bytes[offset] ?? 0) * 0x100_0000 + (((bytes[offset + 1] ?? 0) << 16) | ((bytes[offset + 2] ?? 0) << 8) | (bytes[offset + 3] ?? 0));
}

function writeU32BE(bytes: Uint8Array, offset: number, value: number): void {
  bytes[offset] = (value >>> 24) & 0xff;
  bytes[offset + 1] = (value >>> 16) & 0xff;
  bytes[offset + 2] = (value >>> 8) & 0xff;
  bytes[offset + 3] = value & 0xff;
}

export function readU64LE(bytes: Uint8Array, offset: number): number {
  const low = readU32LE(bytes, offset);
  const high = readU32LE(bytes, offset + 4);
  return high >= safeHighWordLimit ? Number.POSITIVE_INFINITY : high * twoPow32 + low;
}

export function readU64BE(bytes: Uint8Array, offset: number): number {
  const high = readU32BE(bytes, offset);
  const low = readU32BE(bytes, offset + 4);
  return high >= safeHighWordLimit ? Number.POSITIVE_INFINITY : high * twoPow32 + low;
}

export function writeU64LE(bytes: Uint8Array, offset: number, value: number): void {
  assert(Number.isSafeInteger(value) && value >= 0, 'u64 out of range', value);
  writeU32LE(bytes, offset, value % twoPow32);
  writeU32LE(bytes, offset + 4, Math.floor(value / twoPow32));
}

export function writeU64BE(bytes: Uint8Array, offset: number, value: number): void {
  assert(Number.isSafeInteger(value) && value >= 0, 'u64 out of range', value);
  writeU32BE(bytes, offset, Math.floor(value / twoPow32));
  writeU32BE(bytes, offset + 4, value % twoPow32);
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

const zeroBlock = new Uint8Array(64 * 1024);

/** True when every byte is zero (a memcmp against a zero block, not a callback per byte). */
export function isAllZero(bytes: Uint8Array): boolean {
  for (let at = 0; at < bytes.length; at += zeroBlock.length) {
    const piece = bytes.subarray(at, Math.min(bytes.length, at + zeroBlock.length));
    if (Buffer.compare(piece, zeroBlock.subarray(0, piece.length)) !== 0) return false;
  }
  return true;
}
