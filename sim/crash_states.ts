// Crash states: which volatile writes a power loss kept, and which it tore.
//
// Given a CrashPoint (a device's durable image and its volatile writes at one instant), a
// crash state chooses a subset of the volatile writes to apply on top of the durable image,
// in volatile-list order, each one whole or torn (only some of its 512-byte sectors), and —
// for writes the caller says may be caught mid-sector (`GarbagePredicate`) — with some of its
// sectors left holding garbage: bytes that are neither the old contents nor the new, as a
// sector being written when the power failed may hold. The generators (docs/testing.md, "The
// crash model"): prefix(k) (the dm-log-writes view), omit-one (ALICE's reordering probe),
// torn-last, garbage-prefix and garbage-with-omit, arbitrary subsets, and seeded random states
// for the deep mode. Each device of a system is crashed independently; combineStates pairs the
// states of a cache device and a backing device.
//
// Invariants: a state's `applied` list is in volatile-list order, and masks are proper (a
// full mask is stored as "whole", an empty one as "omitted"; new-data and garbage sectors are
// disjoint), so equal keys mean equal contents; garbage bytes are a function of (device, write
// id, sector), so a key names them too; keys name write ids, not list positions, so they stay
// valid across the crash points of one device; every random choice comes from the caller's
// Prng, so a state list is a function of (crash point, options, seed). Building a device from a
// state costs O(pages touched by the applied writes): the durable image is forked, never copied.

import { assert } from '../src/lib/assert.js';
import { sectorSizeBytes } from '../src/lib/units.js';
import { applyWrite, writeSectorCount, type CrashPoint, type VolatileWrite } from './device_model.js';
import type { PageImage } from './page_image.js';
import type { Prng } from './prng.js';
import { SimDevice, type SimDeviceOptions } from './sim_device.js';

export interface AppliedWrite {
  /** Position in the crash point's volatile list. */
  readonly index: number;
  /** Undefined: the whole write. Otherwise one bit per touched sector; set bits are applied. */
  readonly sectorMask: Uint8Array | undefined;
  /**
   * One bit per touched sector: these whole 512-byte sectors hold garbage (neither the old
   * nor the new bytes; the write was in progress when the power failed). Undefined: none.
   */
  readonly garbageMask?: Uint8Array | undefined;
}

/**
 * Which volatile writes a crash may leave as garbage: a sector written when the power failed
 * may hold anything. Devices promise nothing about it, so a system that keeps two copies of a
 * record must find one of them intact. Only for what the system's design says it survives (a
 * cache device's metadata, say): a raw backing device with garbage in it is no prefix of the
 * client's flush epochs, whatever the system does.
 */
export type GarbagePredicate = (write: VolatileWrite) => boolean;

export interface CrashState {
  readonly point: CrashPoint;
  readonly applied: readonly AppliedWrite[];
  /** Identifies the resulting contents: `device@durableId:` then the applied ids and masks. */
  readonly key: string;
  /** For people: how the state was chosen. */
  readonly label: string;
}

export interface TearOptions {
  /** Writes of at most this many sectors are torn with every proper mask. Default 4. */
  readonly exhaustiveSectorsMax?: number;
  /** Bound on masks for one larger write (prefix, suffix, single and all-but-one masks, sampled). Default 16. */
  readonly masksMax?: number;
}

const exhaustiveSectorsMaxDefault = 4;
const masksMaxDefault = 16;
/** 2^n - 2 masks must stay small: exhaustive tearing is meant for a handful of sectors. */
const exhaustiveSectorsLimit = 12;

/** Builds a state from a selection, normalising masks so the key identifies the contents. */
export function crashState(point: CrashPoint, selection: readonly AppliedWrite[], label: string): CrashState {
  const applied: AppliedWrite[] = [];
  let previous = -1;
  for (const choice of selection) {
    assert(choice.index > previous, 'applied writes are listed in volatile-list order, once each');
    const write = point.volatile[choice.index];
    assert(write !== undefined, `applied write ${choice.index} is not in the volatile list`);
    previous = choice.index;
    const sectorCount = writeSectorCount(write);
    const garbage = choice.garbageMask;
    if (garbage !== undefined && countBits(garbage, sectorCount) > 0) {
      assert(garbage.length === Math.ceil(sectorCount / 8), 'a garbage mask has one bit per touched sector');
      // New-data sectors are the chosen ones (all, when none are chosen) that are not garbage.
      const fresh = maskFrom(sectorCount, (index) => !bitSet(garbage, index) && (choice.sectorMask === undefined || bitSet(choice.sectorMask, index)));
      const freshBits = countBits(fresh, sectorCount);
      const garbageBits = countBits(garbage, sectorCount);
      const allFresh = freshBits + garbageBits === sectorCount;
      applied.push({ index: choice.index, sectorMask: allFresh ? undefined : fresh, garbageMask: garbage });
      continue;
    }
    const mask = choice.sectorMask;
    if (mask === undefined) {
      applied.push({ index: choice.index, sectorMask: undefined });
      continue;
    }
    assert(mask.length === Math.ceil(sectorCount / 8), 'a sector mask has one bit per touched sector');
    const setBits = countBits(mask, sectorCount);
    if (setBits === 0) continue;
    applied.push({ index: choice.index, sectorMask: setBits === sectorCount ? undefined : mask });
  }
  return { point, applied, key: keyOf(point, applied), label };
}

/** The first `count` volatile writes, whole. */
export function prefixState(point: CrashPoint, count: number): CrashState {
  assert(count >= 0 && count <= point.volatile.length, `prefix length ${count} is out of range`);
  return crashState(point, range(count).map(wholeWrite), `prefix ${count}/${point.volatile.length}`);
}

/** Every volatile write but one. */
export function omitOneState(point: CrashPoint, omitted: number): CrashState {
  assert(omitted >= 0 && omitted < point.volatile.length, `omitted write ${omitted} is out of range`);
  const selection = range(point.volatile.length).filter((index) => index !== omitted).map(wholeWrite);
  return crashState(point, selection, `omit #${omitted} of ${point.volatile.length}`);
}

/** Exactly the listed volatile writes, whole (listed in any order; applied in list order). */
export function subsetState(point: CrashPoint, indexes: readonly number[]): CrashState {
  const sorted = [...new Set(indexes)].sort((a, b) => a - b);
  return crashState(point, sorted.map(wholeWrite), `subset {${sorted.join(',')}}`);
}

/** The first `count` volatile writes, the last of them torn to `sectorMask`. */
export function tornPrefixState(point: CrashPoint, count: number, sectorMask: Uint8Array): CrashState {
  assert(count >= 1 && count <= point.volatile.length, `torn prefix length ${count} is out of range`);
  const last = point.volatile[count - 1];
  assert(last !== undefined, 'the torn write is inside the volatile list');
  const selection = range(count).map((index): AppliedWrite => (index === count - 1 ? { index, sectorMask } : wholeWrite(index)));
  const label = `prefix ${count}/${point.volatile.length}, #${count - 1} torn to ${maskText(sectorMask, writeSectorCount(last))}`;
  return crashState(point, selection, label);
}

/**
 * The first `count` volatile writes, the last of them caught mid-write: the sectors of
 * `garbageMask` hold garbage, the others the new bytes.
 */
export function garbagePrefixState(point: CrashPoint, count: number, garbageMask: Uint8Array): CrashState {
  assert(count >= 1 && count <= point.volatile.length, `garbage prefix length ${count} is out of range`);
  const last = point.volatile[count - 1];
  assert(last !== undefined, 'the garbled write is inside the volatile list');
  const selection = range(count).map((index): AppliedWrite => (index === count - 1 ? { index, sectorMask: undefined, garbageMask } : wholeWrite(index)));
  return crashState(point, selection, `prefix ${count}/${point.volatile.length}, #${count - 1} garbage at ${maskText(garbageMask, writeSectorCount(last))}`);
}

/**
 * Every volatile write but `omitted`, the last one caught mid-write (its `garbageMask` sectors
 * garbage): an earlier write lost while a later one was being written. The case that tells
 * "overwrite the older copy of a record" from "overwrite the newest": the older copy's last
 * update lost, the newest being rewritten when the power failed.
 */
export function garbageOmitState(point: CrashPoint, omitted: number, garbageMask: Uint8Array): CrashState {
  const count = point.volatile.length;
  assert(omitted >= 0 && omitted < count - 1, `omitted write ${omitted} must come before the last one`);
  const last = point.volatile[count - 1];
  assert(last !== undefined, 'the garbled write is inside the volatile list');
  const selection = range(count)
    .filter((index) => index !== omitted)
    .map((index): AppliedWrite => (index === count - 1 ? { index, sectorMask: undefined, garbageMask } : wholeWrite(index)));
  return crashState(point, selection, `omit #${omitted} of ${count}, #${count - 1} garbage at ${maskText(garbageMask, writeSectorCount(last))}`);
}

/**
 * Garbage masks for a write of `sectorCount` sectors: every sector garbage, and (up to
 * `singlesMax` sectors) each one sector alone garbage with the rest written. Random garbage
 * in one sector of a multi-sector record is what a CRC must catch; all of it is what a
 * two-copy record must survive.
 */
export function garbageMasks(sectorCount: number, singlesMax = 4): Uint8Array[] {
  if (sectorCount < 1) return [];
  const masks = [maskFrom(sectorCount, () => true)];
  if (sectorCount >= 2 && sectorCount <= singlesMax) {
    for (let chosen = 0; chosen < sectorCount; chosen += 1) masks.push(maskFrom(sectorCount, (index) => index === chosen));
  } else if (sectorCount > singlesMax) {
    masks.push(maskFrom(sectorCount, (index) => index === 0), maskFrom(sectorCount, (index) => index === sectorCount - 1));
  }
  return masks;
}

/**
 * The 512 bytes a power loss leaves in sector `sector` (counted from the write's first touched
 * sector) of write `writeId` caught mid-write: seeded by the device name, the write and the
 * sector, so the same state always holds the same bytes. Never all zero, never valid anything.
 */
export function garbageSector(device: string, writeId: number, sector: number): Uint8Array {
  const bytes = new Uint8Array(sectorSizeBytes);
  let state = (hashText(device) ^ Math.imul(writeId + 1, 0x9e3779b1) ^ Math.imul(sector + 1, 0x85ebca6b)) | 1;
  for (let offset = 0; offset < sectorSizeBytes; offset += 4) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    bytes[offset] = state & 0xff;
    bytes[offset + 1] = (state >>> 8) & 0xff;
    bytes[offset + 2] = (state >>> 16) & 0xff;
    bytes[offset + 3] = (state >>> 24) & 0xff;
  }
  return bytes;
}

/** Writes the garbage of `garbageMask`'s sectors of `write` (whole sectors, even past a short write's bytes). */
export function applyGarbage(image: PageImage, device: string, write: VolatileWrite, garbageMask: Uint8Array): void {
  const firstSector = Math.floor(write.offsetBytes / sectorSizeBytes);
  const sectorCount = writeSectorCount(write);
  for (let index = 0; index < sectorCount; index += 1) {
    if (bitSet(garbageMask, index)) image.write(garbageSector(device, write.id, index), (firstSector + index) * sectorSizeBytes);
  }
}

/**
 * Proper tear masks (neither empty nor full) for a write of `sectorCount` sectors: all of
 * them for small writes, otherwise the prefixes, suffixes, single sectors and all-but-one
 * sectors, sampled down to `masksMax` with `prng`.
 */
export function tearMasks(sectorCount: number, prng: Prng, options: TearOptions = {}): Uint8Array[] {
  const exhaustiveMax = options.exhaustiveSectorsMax ?? exhaustiveSectorsMaxDefault;
  const masksMax = options.masksMax ?? masksMaxDefault;
  assert(exhaustiveMax <= exhaustiveSectorsLimit, `exhaustive tearing is limited to ${exhaustiveSectorsLimit} sectors`);
  assert(masksMax >= 1, 'at least one tear mask per write');
  if (sectorCount < 2) return [];
  const masks: Uint8Array[] = [];
  if (sectorCount <= exhaustiveMax) {
    for (let bits = 1; bits < 2 ** sectorCount - 1; bits += 1) {
      masks.push(maskFrom(sectorCount, (index) => (bits & (1 << index)) !== 0));
    }
    return masks;
  }
  const seen = new Set<string>();
  const add = (mask: Uint8Array): void => {
    const text = maskText(mask);
    if (seen.has(text)) return;
    seen.add(text);
    masks.push(mask);
  };
  for (let cut = 1; cut < sectorCount; cut += 1) {
    add(maskFrom(sectorCount, (index) => index < cut));
    add(maskFrom(sectorCount, (index) => index >= cut));
  }
  for (let chosen = 0; chosen < sectorCount; chosen += 1) {
    add(maskFrom(sectorCount, (index) => index === chosen));
    add(maskFrom(sectorCount, (index) => index !== chosen));
  }
  if (masks.length <= masksMax) return masks;
  return prng.shuffle(masks).slice(0, masksMax);
}

/** A uniformly random proper mask (the write must touch at least two sectors). */
export function randomTearMask(sectorCount: number, prng: Prng): Uint8Array {
  assert(sectorCount >= 2, 'only a write of two or more sectors can tear');
  for (;;) {
    const mask = maskFrom(sectorCount, () => prng.chance(0.5));
    const setBits = countBits(mask, sectorCount);
    if (setBits > 0 && setBits < sectorCount) return mask;
  }
}

export interface StandardStateOptions {
  readonly prefixes?: boolean;
  readonly omitOne?: boolean;
  /**
   * Everything applied but the last write, which is torn with each of its tear masks. Every
   * write is the last one at the crash boundary right after it, so across the crash points of
   * a run each write is torn once with everything before it applied.
   */
  readonly tornLast?: boolean;
  readonly tear?: TearOptions;
  /**
   * Writes that may be left as garbage. For each such write k: the first k writes with write
   * k garbage (garbage-prefix); and when the last write is one, every other write omitted in
   * turn with the last one garbage (garbage-with-omit). Default: none.
   */
  readonly garbage?: GarbagePredicate;
}

/**
 * The exhaustive mode's states for one crash point: prefixes, omit-one, torn-last, and (for
 * the writes `garbage` names) garbage-prefix and garbage-with-omit; deduplicated.
 */
export function standardStates(point: CrashPoint, prng: Prng, options: StandardStateOptions = {}): CrashState[] {
  const states = new CrashStateSet();
  const count = point.volatile.length;
  if (options.prefixes ?? true) for (let length = 0; length <= count; length += 1) states.add(prefixState(point, length));
  if (options.omitOne ?? true) for (let index = 0; index < count; index += 1) states.add(omitOneState(point, index));
  const last = point.volatile[count - 1];
  if ((options.tornLast ?? true) && last !== undefined) {
    for (const mask of tearMasks(writeSectorCount(last), prng, options.tear)) states.add(tornPrefixState(point, count, mask));
  }
  const garbage = options.garbage;
  if (garbage !== undefined) {
    point.volatile.forEach((write, index) => {
      if (!garbage(write)) return;
      for (const mask of garbageMasks(writeSectorCount(write))) states.add(garbagePrefixState(point, index + 1, mask));
    });
    if (last !== undefined && garbage(last)) {
      for (const mask of garbageMasks(writeSectorCount(last))) {
        for (let omitted = 0; omitted < count - 1; omitted += 1) states.add(garbageOmitState(point, omitted, mask));
      }
    }
  }
  return states.list;
}

export interface RandomStateOptions {
  /** Probability that an applied write of two or more sectors is torn. Default 0.25. */
  readonly tearProbability?: number;
  /** Probability that each volatile write is applied. Default 0.5. */
  readonly keepProbability?: number;
  /** Writes that may be left as garbage (default none), and how often one is. */
  readonly garbage?: GarbagePredicate;
  /** Probability that an applied write `garbage` names has garbage sectors. Default 0.25. */
  readonly garbageProbability?: number;
}

/** A random subset of the volatile writes, some torn, some (of those allowed) with garbage. */
export function randomState(point: CrashPoint, prng: Prng, options: RandomStateOptions = {}): CrashState {
  const keep = options.keepProbability ?? 0.5;
  const tear = options.tearProbability ?? 0.25;
  const garbageChance = options.garbageProbability ?? 0.25;
  const selection: AppliedWrite[] = [];
  point.volatile.forEach((write, index) => {
    if (!prng.chance(keep)) return;
    const sectorCount = writeSectorCount(write);
    const torn = sectorCount >= 2 && prng.chance(tear);
    const sectorMask = torn ? randomTearMask(sectorCount, prng) : undefined;
    if (options.garbage !== undefined && options.garbage(write) && prng.chance(garbageChance)) {
      const masks = garbageMasks(sectorCount);
      selection.push({ index, sectorMask, garbageMask: prng.pick(masks) });
      return;
    }
    selection.push({ index, sectorMask });
  });
  return crashState(point, selection, 'random');
}

/**
 * Up to `countMax` distinct states: everything applied, nothing applied, then random states.
 * Like CrashMonkey, gives up after 2*countMax draws in a row that find nothing new.
 */
export function randomStates(point: CrashPoint, prng: Prng, countMax: number, options: RandomStateOptions = {}): CrashState[] {
  assert(countMax >= 1, 'at least one state per crash point');
  const states = new CrashStateSet();
  states.add(prefixState(point, point.volatile.length));
  if (countMax >= 2) states.add(prefixState(point, 0));
  let fruitless = 0;
  while (states.size < countMax && fruitless < 2 * countMax) {
    if (states.add(randomState(point, prng, options))) fruitless = 0;
    else fruitless += 1;
  }
  return states.list;
}

/** A crash state for each of a system's two devices. */
export interface SystemCrashState {
  readonly cache: CrashState;
  readonly backing: CrashState;
  readonly key: string;
}

/**
 * Pairs cache-device states with backing-device states: the full cross product when it has at
 * most `pairsMax` pairs; otherwise every state of each device paired with the other device's
 * "nothing applied" and "everything applied" states, then seeded random pairs up to the bound.
 */
export function combineStates(cacheStates: readonly CrashState[], backingStates: readonly CrashState[], prng: Prng, pairsMax: number): SystemCrashState[] {
  assert(cacheStates.length > 0 && backingStates.length > 0, 'each device has at least one crash state');
  const pairs = new Map<string, SystemCrashState>();
  const add = (cache: CrashState, backing: CrashState): void => {
    const key = `${cache.key}|${backing.key}`;
    if (!pairs.has(key)) pairs.set(key, { cache, backing, key });
  };
  if (cacheStates.length * backingStates.length <= pairsMax) {
    for (const cache of cacheStates) for (const backing of backingStates) add(cache, backing);
    return [...pairs.values()];
  }
  const anchors = (states: readonly CrashState[]): CrashState[] => {
    const first = states[0] as CrashState;
    const point = first.point;
    const wanted = new Set([prefixState(point, 0).key, prefixState(point, point.volatile.length).key]);
    const found = states.filter((state) => wanted.has(state.key));
    return found.length > 0 ? found : [first];
  };
  const cacheAnchors = anchors(cacheStates);
  const backingAnchors = anchors(backingStates);
  for (const cache of cacheStates) for (const backing of backingAnchors) add(cache, backing);
  for (const backing of backingStates) for (const cache of cacheAnchors) add(cache, backing);
  let fruitless = 0;
  while (pairs.size < pairsMax && fruitless < 2 * pairsMax) {
    const before = pairs.size;
    add(prng.pick(cacheStates), prng.pick(backingStates));
    fruitless = pairs.size > before ? 0 : fruitless + 1;
  }
  return [...pairs.values()];
}

/** A fresh device whose durable (and visible) contents are the crash state. */
export function materialize(state: CrashState, options: Omit<SimDeviceOptions, 'name' | 'identity'> = {}): SimDevice {
  const point = state.point;
  const image = point.durable.fork();
  for (const choice of state.applied) {
    const write = point.volatile[choice.index];
    assert(write !== undefined, 'applied writes come from the volatile list');
    const fresh = choice.garbageMask === undefined || choice.sectorMask !== undefined || countBits(choice.garbageMask, writeSectorCount(write)) < writeSectorCount(write);
    if (fresh) applyWrite(image, write, choice.sectorMask);
    if (choice.garbageMask !== undefined) applyGarbage(image, point.device, write, choice.garbageMask);
  }
  const identity = point.identity === undefined ? {} : { identity: point.identity };
  return new SimDevice(image, { ...options, name: point.device, ...identity });
}

/** Deduplicates crash states by key, keeping the first of each. */
export class CrashStateSet {
  private readonly byKey = new Map<string, CrashState>();

  /** True if the state is new. */
  add(state: CrashState): boolean {
    if (this.byKey.has(state.key)) return false;
    this.byKey.set(state.key, state);
    return true;
  }

  has(key: string): boolean {
    return this.byKey.has(key);
  }

  get size(): number {
    return this.byKey.size;
  }

  get list(): CrashState[] {
    return [...this.byKey.values()];
  }
}

/** A mask as binary digits, sector 0 first, e.g. "0110". */
export function maskText(mask: Uint8Array, sectorCount = mask.length * 8): string {
  let text = '';
  for (let index = 0; index < sectorCount; index += 1) text += ((mask[index >>> 3] ?? 0) & (1 << (index & 7))) === 0 ? '0' : '1';
  return text;
}

function maskFrom(sectorCount: number, isSet: (index: number) => boolean): Uint8Array {
  const mask = new Uint8Array(Math.ceil(sectorCount / 8));
  for (let index = 0; index < sectorCount; index += 1) {
    if (isSet(index)) mask[index >>> 3] = (mask[index >>> 3] ?? 0) | (1 << (index & 7));
  }
  return mask;
}

function bitSet(mask: Uint8Array, index: number): boolean {
  return ((mask[index >>> 3] ?? 0) & (1 << (index & 7))) !== 0;
}

/** FNV-1a of a short name, for seeding. */
function hashText(text: string): number {
  let hash = 0x811c9dc5;
  for (let index = 0; index < text.length; index += 1) hash = Math.imul(hash ^ text.charCodeAt(index), 0x01000193);
  return hash | 0;
}

function countBits(mask: Uint8Array, sectorCount: number): number {
  let count = 0;
  for (let index = 0; index < sectorCount; index += 1) if (((mask[index >>> 3] ?? 0) & (1 << (index & 7))) !== 0) count += 1;
  return count;
}

function keyOf(point: CrashPoint, applied: readonly AppliedWrite[]): string {
  const parts = applied.map((choice) => {
    const write = point.volatile[choice.index];
    assert(write !== undefined, 'applied writes come from the volatile list');
    const sectors = writeSectorCount(write);
    const torn = choice.sectorMask === undefined ? '' : `/${maskText(choice.sectorMask, sectors)}`;
    const garbage = choice.garbageMask === undefined ? '' : `/g${maskText(choice.garbageMask, sectors)}`;
    return `${write.id}${torn}${garbage}`;
  });
  return `${point.device}@${point.durableId}:${parts.join(',')}`;
}

function wholeWrite(index: number): AppliedWrite {
  return { index, sectorMask: undefined };
}

function range(count: number): number[] {
  return Array.from({ length: count }, (_, index) => index);
}
