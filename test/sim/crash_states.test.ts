// Crash-state generator tests. Goal: every generator applies exactly the writes (and
// sectors) it names on top of the durable image, keys identify contents so deduplication is
// sound, and everything random is a function of the seed.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { TiB } from '../../src/lib/units.js';
import {
  combineStates,
  crashState,
  CrashStateSet,
  garbageMasks,
  garbageOmitState,
  garbagePrefixState,
  garbageSector,
  materialize,
  randomState,
  omitOneState,
  prefixState,
  randomStates,
  standardStates,
  subsetState,
  tearMasks,
  tornPrefixState,
  maskText,
  type CrashState,
} from '../../sim/crash_states.js';
import type { CrashPoint } from '../../sim/device_model.js';
import { Prng } from '../../sim/prng.js';
import { IoScheduler, SimDevice } from '../../sim/sim_device.js';

const deviceBytes = 16 * 1024;

/** Durable: byte 9 everywhere in [0, 4096). Volatile: A=1 at [0,1024), B=2 at [512,1536), C=3 at [3072,4096). */
async function threeWritePoint(): Promise<CrashPoint> {
  const device = SimDevice.blank(deviceBytes, { name: 'dev' });
  await device.write(new Uint8Array(4096).fill(9), 0);
  await device.sync();
  await device.write(new Uint8Array(1024).fill(1), 0);
  await device.write(new Uint8Array(1024).fill(2), 512);
  await device.write(new Uint8Array(1024).fill(3), 3072);
  return device.crashPoint();
}

/** The value of each 512-byte sector in [0, 4096) of the state's device. */
function sectors(state: CrashState): number[] {
  const device = materialize(state);
  const bytes = new Uint8Array(4096);
  device.readDurable(bytes, 0);
  return Array.from({ length: 8 }, (_, index) => bytes[index * 512] ?? -1);
}

/** Sector `sector` (of [0, 8)) of the state's device. */
function sectorBytes(state: CrashState, sector: number): Uint8Array {
  const bytes = new Uint8Array(512);
  materialize(state).readDurable(bytes, sector * 512);
  return bytes;
}

function mask(bits: string): Uint8Array {
  const bytes = new Uint8Array(Math.ceil(bits.length / 8));
  for (let index = 0; index < bits.length; index += 1) {
    if (bits.charAt(index) === '1') bytes[index >>> 3] = (bytes[index >>> 3] ?? 0) | (1 << (index & 7));
  }
  return bytes;
}

describe('crash states', () => {
  it('applies exactly the first k writes for prefix(k)', async () => {
    const point = await threeWritePoint();
    assert.deepEqual(sectors(prefixState(point, 0)), [9, 9, 9, 9, 9, 9, 9, 9]);
    assert.deepEqual(sectors(prefixState(point, 1)), [1, 1, 9, 9, 9, 9, 9, 9]);
    assert.deepEqual(sectors(prefixState(point, 2)), [1, 2, 2, 9, 9, 9, 9, 9]);
    assert.deepEqual(sectors(prefixState(point, 3)), [1, 2, 2, 9, 9, 9, 3, 3]);
  });

  it('leaves out exactly one write for omit-one, and applies any subset in list order', async () => {
    const point = await threeWritePoint();
    assert.deepEqual(sectors(omitOneState(point, 0)), [9, 2, 2, 9, 9, 9, 3, 3]);
    assert.deepEqual(sectors(omitOneState(point, 1)), [1, 1, 9, 9, 9, 9, 3, 3]);
    assert.deepEqual(sectors(subsetState(point, [2, 0])), [1, 1, 9, 9, 9, 9, 3, 3]);
    assert.equal(subsetState(point, [2, 0]).key, omitOneState(point, 1).key);
  });

  it('tears a write at device-sector granularity, unaligned writes included', async () => {
    const point = await threeWritePoint();
    // B covers sectors 1 and 2: keep only sector 2.
    assert.deepEqual(sectors(tornPrefixState(point, 2, mask('01'))), [1, 1, 2, 9, 9, 9, 9, 9]);
    const device = SimDevice.blank(deviceBytes, { name: 'dev' });
    await device.write(new Uint8Array(700).fill(5), 300); // bytes [300, 1000): sectors 0 and 1
    const unaligned = device.crashPoint();
    const bytes = new Uint8Array(1024);
    materialize(tornPrefixState(unaligned, 1, mask('10'))).readDurable(bytes, 0);
    assert.deepEqual([bytes[299], bytes[300], bytes[511], bytes[512], bytes[999]], [0, 5, 5, 0, 0]);
  });

  it('normalises masks so that equal contents get equal keys', async () => {
    const point = await threeWritePoint();
    assert.equal(crashState(point, [{ index: 0, sectorMask: mask('11') }], 'full').key, prefixState(point, 1).key);
    assert.equal(crashState(point, [{ index: 0, sectorMask: mask('00') }], 'empty').key, prefixState(point, 0).key);
    assert.notEqual(tornPrefixState(point, 1, mask('10')).key, tornPrefixState(point, 1, mask('01')).key);
  });

  it('keeps keys valid across crash points of one device, and changes them when durable changes', async () => {
    const device = SimDevice.blank(deviceBytes, { name: 'dev' });
    await device.write(new Uint8Array(512).fill(1), 0);
    const early = device.crashPoint();
    await device.write(new Uint8Array(512).fill(2), 512);
    const late = device.crashPoint();
    assert.equal(prefixState(early, 1).key, prefixState(late, 1).key);
    await device.sync();
    assert.notEqual(prefixState(device.crashPoint(), 0).key, prefixState(early, 0).key);
  });

  it('tears small writes with every proper mask and large ones with a bounded, seeded set', () => {
    const small = tearMasks(3, new Prng(1)).map((m) => maskText(m, 3));
    assert.deepEqual(new Set(small), new Set(['100', '010', '110', '001', '101', '011']));
    const large = tearMasks(9, new Prng(1), { masksMax: 10 }).map((m) => maskText(m, 9));
    assert.equal(large.length, 10);
    assert.equal(new Set(large).size, 10);
    for (const text of large) assert.ok(text.includes('1') && text.includes('0'), `proper mask ${text}`);
    assert.deepEqual(tearMasks(9, new Prng(1), { masksMax: 10 }).map((m) => maskText(m, 9)), large);
    assert.deepEqual(tearMasks(1, new Prng(1)), []);
  });

  it('produces deduplicated standard states: prefixes, omit-one and torn-last', async () => {
    const point = await threeWritePoint();
    const states = standardStates(point, new Prng(1));
    const keys = states.map((state) => state.key);
    assert.equal(new Set(keys).size, keys.length);
    // 4 prefixes, 3 omit-one of which one (omitting the last) is prefix 2, and the last write
    // (C, two sectors) torn both ways.
    assert.equal(states.length, 4 + 2 + 2);
    assert.ok(keys.includes(tornPrefixState(point, 3, mask('10')).key));
    assert.ok(keys.includes(tornPrefixState(point, 3, mask('01')).key));
  });

  it('draws random states as a function of the seed, deduplicated and bounded', async () => {
    const point = await threeWritePoint();
    const keys = (seed: number): string[] => randomStates(point, new Prng(seed), 12, { tearProbability: 0.5 }).map((state) => state.key);
    const first = keys(7);
    assert.deepEqual(keys(7), first);
    assert.notDeepEqual(keys(8), first);
    assert.ok(first.length <= 12);
    assert.equal(new Set(first).size, first.length);
    assert.equal(first[0], prefixState(point, 3).key, 'everything applied comes first');
    assert.equal(first[1], prefixState(point, 0).key, 'then nothing applied');
  });

  it('includes in-flight writes in crash states', async () => {
    const scheduler = new IoScheduler({ order: 'fifo' });
    const device = SimDevice.blank(deviceBytes, { name: 'dev', scheduler });
    const pending = device.write(new Uint8Array(512).fill(4), 0);
    const point = device.crashPoint();
    assert.deepEqual(sectors(prefixState(point, 1)).slice(0, 1), [4]);
    await pending;
  });

  it('materialises fresh devices with everything durable, leaving the crash point unchanged', async () => {
    const point = await threeWritePoint();
    const device = materialize(prefixState(point, 3));
    assert.equal(device.volatileWriteCount, 0);
    assert.equal(device.name, 'dev');
    device.blocking?.writeSync(new Uint8Array(512).fill(7), 0);
    assert.deepEqual(sectors(prefixState(point, 3)).slice(0, 2), [1, 2]);
  });

  it('builds a crash state of a 1 TiB device from its writes alone', async () => {
    const device = SimDevice.blank(TiB, { name: 'huge' });
    await device.write(new Uint8Array(4096).fill(1), TiB - 4096);
    await device.sync();
    await device.write(new Uint8Array(4096).fill(2), 0);
    const state = materialize(prefixState(device.crashPoint(), 1));
    const bytes = new Uint8Array(1);
    state.readDurable(bytes, TiB - 1);
    assert.equal(bytes[0], 1);
    state.readDurable(bytes, 0);
    assert.equal(bytes[0], 2);
  });

  it('pairs two devices fully when small and within the bound, anchors included, when large', async () => {
    const point = await threeWritePoint();
    const states = standardStates(point, new Prng(1));
    const all = combineStates(states, states.slice(0, 3), new Prng(1), 1000);
    assert.equal(all.length, states.length * 3);
    const bounded = combineStates(states, states, new Prng(1), 20);
    assert.equal(new Set(bounded.map((pair) => pair.key)).size, bounded.length);
    const none = prefixState(point, 0).key;
    const everything = prefixState(point, 3).key;
    for (const state of states) {
      assert.ok(bounded.some((pair) => pair.cache.key === state.key && pair.backing.key === none), `${state.label} with nothing`);
      assert.ok(bounded.some((pair) => pair.backing.key === state.key && pair.cache.key === everything), `everything with ${state.label}`);
    }
  });

  it('leaves the sectors of a write caught mid-write as garbage: neither old nor new, the same every time', async () => {
    const point = await threeWritePoint();
    const c = point.volatile[2];
    assert.ok(c !== undefined);
    // C covers sectors 6 and 7: the second one garbage, the first one written.
    const state = garbagePrefixState(point, 3, mask('01'));
    assert.deepEqual(sectors(state).slice(0, 7), [1, 2, 2, 9, 9, 9, 3]);
    const garbage = sectorBytes(state, 7);
    assert.deepEqual(garbage, garbageSector('dev', c.id, 1));
    for (const fill of [0, 3, 9]) assert.notDeepEqual(garbage, new Uint8Array(512).fill(fill));
    assert.deepEqual(sectorBytes(garbagePrefixState(point, 3, mask('01')), 7), garbage, 'a function of the state');
    // Both sectors garbage, each its own.
    const whole = garbagePrefixState(point, 3, mask('11'));
    assert.deepEqual(sectorBytes(whole, 6), garbageSector('dev', c.id, 0));
    assert.deepEqual(sectorBytes(whole, 7), garbage);
    assert.notDeepEqual(garbageSector('dev', c.id, 0), garbage);
    assert.notDeepEqual(garbageSector('other', c.id, 1), garbage, 'devices get different garbage');
    const keys = [state.key, whole.key, prefixState(point, 3).key, tornPrefixState(point, 3, mask('10')).key];
    assert.equal(new Set(keys).size, keys.length, 'garbage is part of the key');
  });

  it('combines garbage with a tear and with an earlier write omitted', async () => {
    const point = await threeWritePoint();
    // Torn to its first sector, and that sector garbage: nothing new, sector 7 old.
    const tornGarbage = crashState(point, [{ index: 2, sectorMask: mask('10'), garbageMask: mask('10') }], 'torn garbage');
    assert.deepEqual(sectors(tornGarbage).slice(7), [9]);
    assert.deepEqual(sectorBytes(tornGarbage, 6), garbageSector('dev', point.volatile[2]?.id ?? -1, 0));
    // Torn to its first sector, the second garbage: both sectors differ from the old contents.
    const both = crashState(point, [{ index: 2, sectorMask: mask('10'), garbageMask: mask('01') }], 'torn and garbage');
    assert.deepEqual(sectors(both).slice(6, 7), [3]);
    assert.deepEqual(sectorBytes(both, 7), garbageSector('dev', point.volatile[2]?.id ?? -1, 1));
    // A lost, B written, C garbage.
    const omitted = garbageOmitState(point, 0, mask('11'));
    assert.deepEqual(sectors(omitted).slice(0, 6), [9, 2, 2, 9, 9, 9]);
    assert.deepEqual(sectorBytes(omitted, 7), garbageSector('dev', point.volatile[2]?.id ?? -1, 1));
  });

  it('offers garbage masks: all sectors, then each one alone (small writes) or the first and last (large)', () => {
    assert.deepEqual(garbageMasks(1).map((m) => maskText(m, 1)), ['1']);
    assert.deepEqual(garbageMasks(3).map((m) => maskText(m, 3)), ['111', '100', '010', '001']);
    assert.deepEqual(garbageMasks(9).map((m) => maskText(m, 9)), ['111111111', '100000000', '000000001']);
  });

  it('adds garbage states only for the writes the predicate names', async () => {
    const point = await threeWritePoint();
    const onlyC = (write: { offsetBytes: number }): boolean => write.offsetBytes === 3072;
    const states = standardStates(point, new Prng(1), { garbage: onlyC });
    const keys = new Set(states.map((state) => state.key));
    assert.equal(keys.size, states.length);
    for (const garbage of ['11', '10', '01']) {
      assert.ok(keys.has(garbagePrefixState(point, 3, mask(garbage)).key), `prefix 3, C garbage at ${garbage}`);
      for (const omitted of [0, 1]) assert.ok(keys.has(garbageOmitState(point, omitted, mask(garbage)).key), `omit ${omitted}, C garbage at ${garbage}`);
    }
    assert.equal(states.length, 8 + 3 + 2 * 3);
    for (const state of states) {
      for (const choice of state.applied) if (choice.garbageMask !== undefined) assert.equal(choice.index, 2, state.label);
    }
    assert.equal(standardStates(point, new Prng(1)).length, 8, 'no predicate, no garbage');
    // Random states: garbage only where allowed, and a function of the seed.
    const draw = (seed: number): string[] => {
      const prng = new Prng(seed);
      return Array.from({ length: 40 }, () => randomState(point, prng, { garbage: onlyC, garbageProbability: 0.5 }).key);
    };
    assert.deepEqual(draw(3), draw(3));
    assert.ok(draw(3).some((key) => key.includes('/g')), 'some random state has garbage');
    for (let index = 0; index < 40; index += 1) {
      const state = randomState(point, new Prng(index), { garbage: onlyC, garbageProbability: 1 });
      for (const choice of state.applied) assert.equal(choice.garbageMask !== undefined, choice.index === 2, state.key);
    }
  });

  it('deduplicates by key', async () => {
    const point = await threeWritePoint();
    const set = new CrashStateSet();
    assert.equal(set.add(prefixState(point, 1)), true);
    assert.equal(set.add(prefixState(point, 1)), false);
    assert.equal(set.add(omitOneState(point, 1)), true);
    assert.equal(set.size, 2);
  });
});
