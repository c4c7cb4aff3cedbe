// Sector-delta tests. Goal: the shortcut the harness takes for the states of a drain gives
// exactly what the long way gives: a DeltaDecoder's delta expands to the sector values of the
// materialized state (whole, torn, partial-sector, zero and garbage writes, over several
// durable images), lists only sectors that differ from its base, and the oracle's
// checkEpochPrefixDelta answers as checkEpochPrefix does on the expanded values.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { sectorSizeBytes } from '../../src/lib/units.js';
import { materialize, randomStates, standardStates, type CrashState } from '../../sim/crash_states.js';
import type { CrashPoint } from '../../sim/device_model.js';
import { expandDelta, fillPayload, garbageValue, RequestHistory, sectorValues, type SectorValuesDelta } from '../../sim/oracle.js';
import { PageImage, type ReadonlyPageImage } from '../../sim/page_image.js';
import { Prng } from '../../sim/prng.js';
import { DeltaDecoder, ImageDecoder } from '../../sim/sector_delta.js';
import { SimDevice } from '../../sim/sim_device.js';

const deviceBytes = 64 * 1024;
const checkedBytes = 48 * 1024; // writes past the checked range must not matter
const sectorCount = checkedBytes / sectorSizeBytes;

function decodeImage(image: ReadonlyPageImage): Float64Array {
  const bytes = new Uint8Array(checkedBytes);
  image.read(bytes, 0);
  return sectorValues(bytes, 0);
}

function payload(offsetBytes: number, lengthBytes: number, payloadId: number): Uint8Array {
  const sectors = Math.ceil(lengthBytes / sectorSizeBytes);
  const whole = new Uint8Array(sectors * sectorSizeBytes);
  fillPayload(whole, Math.floor(offsetBytes / sectorSizeBytes) * sectorSizeBytes, payloadId);
  return whole.subarray(0, lengthBytes);
}

/** Crash points of a device that takes random writes (some unaligned, some zeroes) and syncs. */
async function crashPoints(seed: number): Promise<CrashPoint[]> {
  const prng = new Prng(seed);
  const device = SimDevice.blank(deviceBytes, { name: 'backing' });
  const points: CrashPoint[] = [];
  for (let step = 0; step < 40; step += 1) {
    const roll = prng.nextInt(10);
    if (roll === 0) {
      await device.sync();
    } else {
      const sectors = 1 + prng.nextInt(12);
      const aligned = roll > 2;
      const offsetBytes = prng.nextInt(deviceBytes / sectorSizeBytes - sectors) * sectorSizeBytes + (aligned ? 0 : 100);
      const lengthBytes = sectors * sectorSizeBytes - (aligned ? 0 : 200);
      if (roll === 3) await device.discard(offsetBytes, lengthBytes);
      else await device.write(payload(offsetBytes, lengthBytes, 1 + step), offsetBytes);
    }
    points.push(device.crashPoint());
  }
  return points;
}

function statesOf(points: readonly CrashPoint[], prng: Prng): CrashState[] {
  const garbage = { garbage: (write: { offsetBytes: number }) => write.offsetBytes % 3 === 0 };
  return points.flatMap((point) => [...standardStates(point, prng, garbage), ...randomStates(point, prng, 6, garbage)]);
}

/** The images a run decodes in turn: durable images, crash states, and what a device shows after more writes. */
function decoderImages(points: readonly CrashPoint[], prng: Prng): PageImage[] {
  const images: PageImage[] = [];
  for (const state of statesOf(points, prng).filter(() => prng.chance(0.2))) {
    images.push(state.point.durable.fork());
    const device = materialize(state);
    images.push(device.visibleImage());
    void device.write(payload(8192, 4096, 99), 8192);
    images.push(device.visibleImage());
  }
  return images;
}

describe('sector deltas', () => {
  it('expand to the values of the materialized state, listing only sectors that differ from the base', async () => {
    for (const seed of [1, 2, 3]) {
      const points = await crashPoints(seed);
      const decoder = new DeltaDecoder(sectorCount, new ImageDecoder(sectorCount, decodeImage));
      let listed = 0;
      for (const state of statesOf(points, new Prng(seed))) {
        const delta = decoder.valuesOf(state);
        const expected = decodeImage(materialize(state).visibleImage());
        assert.deepEqual(expandDelta(delta), expected, `state ${state.key}`);
        assert.deepEqual(delta.base, decodeImage(state.point.durable), 'the base is the durable image');
        delta.sectors.forEach((sector, index) => {
          assert.notEqual(delta.values[index], delta.base[sector], 'a listed sector differs from the base');
          if (index > 0) assert.ok(sector > (delta.sectors[index - 1] ?? -1), 'listed sectors increase');
        });
        listed += delta.sectors.length;
      }
      assert.ok(listed > 0, 'the states change some sectors');
    }
  });

  it('decode successive images, each from the one before and the pages where they differ, as a whole decode does', async () => {
    const points = await crashPoints(4);
    const images = decoderImages(points, new Prng(4));
    const decoder = new ImageDecoder(sectorCount, decodeImage);
    let pagesVisited = 0;
    images.forEach((image, index) => {
      assert.deepEqual(decoder.values(image), decodeImage(image), `image ${index}`);
      const previous = images[index - 1];
      if (previous !== undefined) image.forEachPageDifferentFrom(previous, () => { pagesVisited += 1; });
    });
    assert.ok(pagesVisited < images.length * (deviceBytes / 4096), 'shared pages are skipped');
    // Images that share nothing: every page that differs is visited.
    const a = PageImage.fromBytes(new Uint8Array(deviceBytes).fill(1, 4096, 8192));
    const b = PageImage.fromBytes(new Uint8Array(deviceBytes).fill(1, 40960, 40961));
    const visited: number[] = [];
    a.forEachPageDifferentFrom(b, (page) => visited.push(page));
    assert.deepEqual(visited, [1, 10]);
    assert.deepEqual(decoder.values(a), decodeImage(a));
    assert.deepEqual(decoder.values(b), decodeImage(b));
  });

  it('give the same epoch-prefix verdicts as the expanded values', () => {
    for (const seed of [11, 12, 13, 14]) {
      const prng = new Prng(seed);
      const blocks = 12;
      let clock = 0;
      const history = new RequestHistory({ sizeBytes: blocks * 4096, clock: () => clock });
      // Writes of one block each, a flush now and then, some answered late or not at all.
      const pending: ReturnType<RequestHistory['issueWrite']>[] = [];
      for (let op = 0; op < 30; op += 1) {
        clock += 1;
        if (prng.chance(0.2)) {
          const flush = history.issueFlush();
          history.reply(flush, true);
        } else {
          pending.push(history.issueWrite(prng.nextInt(blocks) * 4096, 4096, 1 + op, { fua: prng.chance(0.1) }));
        }
        if (pending.length > 0 && prng.chance(0.7)) history.reply(pending.splice(prng.nextInt(pending.length), 1)[0] as (typeof pending)[number], true);
      }
      const view = history.cut(clock);
      const perBlock = 4096 / sectorSizeBytes;
      // Candidate values of a sector: zero, garbage, and each write's value there.
      const choices = (sector: number): number[] => {
        const found = [0, garbageValue];
        for (const request of history.all) {
          if (request.kind !== 'write') continue;
          const first = request.offsetBytes / sectorSizeBytes;
          if (sector >= first && sector < first + perBlock) found.push(request.payloadId * 2 ** 17 + (sector - first) + 1);
        }
        return found;
      };
      const randomValues = (): Float64Array => Float64Array.from({ length: blocks * perBlock }, (_, sector) => prng.pick(choices(sector)));
      const bases = [randomValues(), randomValues(), new Float64Array(blocks * perBlock)];
      let fitted = 0;
      for (let trial = 0; trial < 300; trial += 1) {
        const base = prng.pick(bases);
        const sectors = [...new Set(Array.from({ length: prng.nextInt(20) }, () => prng.nextInt(base.length)))].sort((a, b) => a - b);
        const delta: SectorValuesDelta = { base, sectors: Int32Array.from(sectors), values: Float64Array.from(sectors, (sector) => prng.pick(choices(sector))) };
        const expected = view.checkEpochPrefix(expandDelta(delta), 0);
        const found = view.checkEpochPrefixDelta(delta);
        assert.deepEqual(found, expected);
        if (found.epoch !== undefined) fitted += 1;
      }
      assert.ok(fitted > 0, `seed ${seed}: some values fit an epoch`);
    }
  });
});
