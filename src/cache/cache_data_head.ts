// The data head: the segment new data is written into (dm-pcache's data head, cache_data_alloc).
//
// Allocation never crosses the end of a segment: a request larger than what is left gets what
// is left, and the rest goes to the next segment. The head holds one reference on its segment
// while it fills it, and every allocation takes one more for the key that will point at it.
// Ordering rule: a newly taken segment's generation is written before any data goes into it,
// and keys pointing into the segment may be appended to the log only once that write has
// completed (genWrite), so the log's next sync covers it and a kset recording the new
// generation is never durable before the generation itself (docs/design.md, "Barriers").

import { assert } from '../lib/assert.js';
import { sectorSizeBytes } from '../lib/units.js';
import type { CacheContext } from './cache_context.js';
import { segmentKindData } from './cache_segment.js';
import type { Space } from './cache_types.js';

/**
 * The data head counts epochs of 1/hitEpochsPerLap of the cache's data capacity allocated (fills,
 * writes, copies): a cache's content turns over about once in hitEpochsPerLap of them, so the
 * epoch of a read hit tells GC's second chance how long ago it was (cache_second_chance.ts).
 */
export const hitEpochsPerLap = 8;

export class DataHead {
  private readonly ctx: CacheContext;
  /** Epochs of allocation since open (see hitEpochsPerLap); read hits record it, modulo 16, in the index. */
  hitEpoch = 0;
  private readonly epochBytes: number;
  private epochLeftBytes: number;
  /** The segment being filled, or -1. */
  segment = -1;
  private offsetBytes = 0;
  /**
   * The generation write of the head segment, while it is in flight on an asynchronous
   * device. Keys pointing into the segment may be appended only after it completed, so that
   * the log's next sync covers it.
   */
  genWrite: Promise<void> | undefined;

  constructor(ctx: CacheContext) {
    this.ctx = ctx;
    this.epochBytes = Math.max(1, Math.floor(ctx.dataCapacityBytes / hitEpochsPerLap));
    this.epochLeftBytes = this.epochBytes;
  }

  /**
   * Takes up to `maxBytes` of data space, or returns undefined when no segment is free (the
   * caller waits for space, or skips an optional fill). Writes the generation of a newly
   * taken segment before any data goes into it; see `genWrite`.
   */
  alloc(maxBytes: number): Space | undefined {
    const ctx = this.ctx;
    if (this.segment < 0 || this.offsetBytes === ctx.dev.dataSizeBytes) {
      const segment = ctx.segments.allocate(segmentKindData);
      if (segment === undefined) return undefined;
      ctx.checkGcThreshold();
      if (this.segment >= 0) ctx.segments.put(this.segment);
      this.segment = segment;
      this.offsetBytes = 0;
      ctx.segments.get(segment); // the head's own reference
      const io = ctx.dev.writeGen(segment, ctx.segments.gen[segment] ?? 0);
      if (io !== undefined) {
        const pending: Promise<void> = io.then(
          () => { if (this.genWrite === pending) this.genWrite = undefined; },
          (error: unknown) => { ctx.fail(error, 'writing a segment generation'); },
        );
        this.genWrite = pending;
      }
    }
    const lengthBytes = Math.min(maxBytes, ctx.dev.dataSizeBytes - this.offsetBytes);
    assert(lengthBytes > 0 && lengthBytes % sectorSizeBytes === 0, 'data allocation is not whole sectors');
    const space: Space = { segment: this.segment, offsetBytes: this.offsetBytes, lengthBytes, gen: ctx.segments.gen[this.segment] ?? 0 };
    this.offsetBytes += lengthBytes;
    this.epochLeftBytes -= lengthBytes;
    while (this.epochLeftBytes <= 0) {
      this.hitEpoch++;
      this.epochLeftBytes += this.epochBytes;
    }
    ctx.segments.get(this.segment); // the key's reference
    return space;
  }
}
