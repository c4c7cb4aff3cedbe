// Sector values of crash states that share durable images, decoded where they differ only.
//
// A drain after recovery writes megabytes to the backing device, and the harness checks every
// prefix and omit-one crash state of it against the flush epochs: hundreds of states, each
// the same durable image plus a few volatile writes. Decoding each state's whole checked range
// (a CRC per sector) cost the `pressure` profile most of its time. A DeltaDecoder decodes each
// durable image once (the base) and, per state, only the sectors its applied writes touch;
// a sector whose last applied write covers it whole takes that write's value, decoded once per
// write and sector; any other touched sector (a partial sector, garbage) is read from the
// materialized state. So a delta lists exactly the sectors whose value differs from the base,
// and expandDelta of it equals sectorValues of the materialized state (sim tests check both).
//
// Invariants: one decoder serves the crash points of one device model (write ids name one
// write's bytes only there; asserted through the durable ids); bases and write values are
// never changed once made, so checks may cache what they learn per base.

import { assert } from '../src/lib/assert.js';
import { sectorSizeBytes } from '../src/lib/units.js';
import { materialize, type CrashState } from './crash_states.js';
import { writeSectorCount, type CrashPoint, type VolatileWrite } from './device_model.js';
import { sectorValue, zeroValue, type SectorValuesDelta } from './oracle.js';
import { pageSizeBytes, type ReadonlyPageImage } from './page_image.js';

/** Marks a sector whose bytes must be read from the materialized state. */
const readBack = Number.NaN;
const sectorsPerPage = pageSizeBytes / sectorSizeBytes;

/**
 * Decodes the checked range of images that share pages: each image after the first is
 * decoded as the one before it plus the pages where the two differ (PageImage's page
 * sharing), so successive crash states of one workload, which differ in a few pages, cost
 * those pages. Values come out in a fresh array per image; the images must not change after.
 */
export class ImageDecoder {
  private last: { image: ReadonlyPageImage; values: Float64Array } | undefined;
  private readonly page = new Uint8Array(pageSizeBytes);

  /** `decodeWhole` decodes the first image (the harness's, through its reused buffer). */
  constructor(
    private readonly sectorCount: number,
    private readonly decodeWhole: (image: ReadonlyPageImage) => Float64Array,
  ) {}

  values(image: ReadonlyPageImage): Float64Array {
    const last = this.last;
    let values: Float64Array;
    if (last === undefined) {
      values = this.decodeWhole(image);
      assert(values.length === this.sectorCount, 'a decode covers the checked range');
    } else {
      values = last.values.slice();
      image.forEachPageDifferentFrom(last.image, (pageIndex) => {
        const firstSector = pageIndex * sectorsPerPage;
        if (firstSector >= this.sectorCount) return;
        const sectors = Math.min(sectorsPerPage, this.sectorCount - firstSector);
        const bytes = this.page.subarray(0, sectors * sectorSizeBytes);
        image.read(bytes, firstSector * sectorSizeBytes);
        for (let index = 0; index < sectors; index += 1) {
          values[firstSector + index] = sectorValue(bytes.subarray(index * sectorSizeBytes, (index + 1) * sectorSizeBytes), firstSector + index);
        }
      });
    }
    this.last = { image, values };
    return values;
  }
}

export class DeltaDecoder {
  private readonly bases = new Map<string, Float64Array>();
  /** Per write id: the value of each sector it covers whole (NaN until decoded). */
  private readonly writeValues = new Map<number, Float64Array>();
  private readonly sectorBytes = new Uint8Array(sectorSizeBytes);
  /** Per state, reused: the value each touched sector ends with, and which sectors were touched. */
  private readonly lastValue: Float64Array;
  private readonly touchedStamp: Uint32Array;
  private readonly touched: Int32Array;
  private stamp = 0;
  private model: string | undefined;

  /** `sectorCount`: sectors decoded from 0 (the checked range); `images` decodes durable images. */
  constructor(
    private readonly sectorCount: number,
    private readonly images: ImageDecoder,
  ) {
    this.lastValue = new Float64Array(sectorCount);
    this.touchedStamp = new Uint32Array(sectorCount);
    this.touched = new Int32Array(sectorCount);
  }

  valuesOf(state: CrashState): SectorValuesDelta {
    const point = state.point;
    const base = this.baseOf(point);
    // The value each touched sector ends with: the last applied write touching it decides.
    this.stamp += 1;
    const stamp = this.stamp;
    let touchedCount = 0;
    for (const choice of state.applied) {
      const write = point.volatile[choice.index];
      assert(write !== undefined, 'applied writes come from the volatile list');
      const firstSector = Math.floor(write.offsetBytes / sectorSizeBytes);
      const count = Math.min(writeSectorCount(write), this.sectorCount - firstSector);
      for (let index = 0; index < count; index += 1) {
        let value: number;
        if (choice.garbageMask !== undefined && bitSet(choice.garbageMask, index)) value = readBack;
        else if (choice.sectorMask === undefined || bitSet(choice.sectorMask, index)) value = this.writeSectorValue(write, index, firstSector + index);
        else continue;
        const sector = firstSector + index;
        if (this.touchedStamp[sector] !== stamp) {
          this.touchedStamp[sector] = stamp;
          this.touched[touchedCount] = sector;
          touchedCount += 1;
        }
        this.lastValue[sector] = value;
      }
    }
    const touched = this.touched.subarray(0, touchedCount).sort();
    let image: ReadonlyPageImage | undefined;
    const sectors = new Int32Array(touchedCount);
    const values = new Float64Array(touchedCount);
    let listed = 0;
    for (const sector of touched) {
      let value = this.lastValue[sector] ?? readBack;
      if (Number.isNaN(value)) {
        image ??= materialize(state).visibleImage();
        image.read(this.sectorBytes, sector * sectorSizeBytes);
        value = sectorValue(this.sectorBytes, sector);
      }
      if (value === base[sector]) continue;
      sectors[listed] = sector;
      values[listed] = value;
      listed += 1;
    }
    return { base, sectors: sectors.slice(0, listed), values: values.slice(0, listed) };
  }

  private baseOf(point: CrashPoint): Float64Array {
    const model = point.durableId.slice(0, point.durableId.indexOf('.'));
    this.model ??= model;
    assert(this.model === model, 'one delta decoder serves one device model');
    let base = this.bases.get(point.durableId);
    if (base === undefined) {
      base = this.images.values(point.durable);
      assert(base.length === this.sectorCount, 'a base covers the decoded sectors');
      this.bases.set(point.durableId, base);
    }
    return base;
  }
  /** The value sector `index` of `write` leaves when the write covers it whole; NaN when only in part. */
  private writeSectorValue(write: VolatileWrite, index: number, sector: number): number {
    const start = Math.max(write.offsetBytes, sector * sectorSizeBytes);
    const end = Math.min(write.offsetBytes + write.lengthBytes, (sector + 1) * sectorSizeBytes);
    if (end - start !== sectorSizeBytes) return readBack;
    const data = write.data;
    if (data === undefined) return zeroValue;
    let decoded = this.writeValues.get(write.id);
    if (decoded === undefined) {
      decoded = new Float64Array(writeSectorCount(write)).fill(Number.NaN);
      this.writeValues.set(write.id, decoded);
    }
    let value = decoded[index] ?? readBack;
    if (Number.isNaN(value)) {
      const from = start - write.offsetBytes;
      value = sectorValue(data.subarray(from, from + sectorSizeBytes), sector);
      decoded[index] = value;
    }
    return value;
  }
}

function bitSet(mask: Uint8Array, index: number): boolean {
  return ((mask[index >>> 3] ?? 0) & (1 << (index & 7))) !== 0;
}
