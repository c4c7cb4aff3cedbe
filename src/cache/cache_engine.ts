// CacheEngine: the parts of one open cache, built in their one order.
//
//   CacheContext (devices, segments, index, counters, knobs, tails, lifecycle)
//     -> KsetLog (key_head onwards, from replay)   -> DataHead
//     -> WritePath (and its WriteGroup)            -> ReadPath
//     -> Writeback (listens to the log)            -> Gc (listens to the context; re-logs
//                                                     hit data at the data head, SecondChance)
//
// Each part gets the context and the parts built before it that it uses; what a part must hear
// from a part built later comes through the Listeners of the context or of the log, which
// parts register with in their constructors. So no part holds a field filled in after
// construction, and no module imports one that imports it back. The public Cache (cache.ts)
// wraps an engine; the structural checker builds only a context (it replays, never writes).

import { assert } from '../lib/assert.js';
import type { CacheContext } from './cache_context.js';
import { DataHead } from './cache_data_head.js';
import { Gc } from './cache_gc.js';
import { KsetLog } from './cache_kset.js';
import { ReadPath } from './cache_read.js';
import { SecondChance } from './cache_second_chance.js';
import type { LogPos } from './cache_types.js';
import { WritePath } from './cache_write.js';
import { Writeback } from './cache_writeback.js';

export class CacheEngine {
  readonly ctx: CacheContext;
  readonly log: KsetLog;
  readonly head: DataHead;
  readonly writes: WritePath;
  readonly reads: ReadPath;
  readonly writeback: Writeback;
  readonly gc: Gc;

  /** Builds the parts over a context that replay has filled, with the log continuing at `keyHead`. */
  constructor(ctx: CacheContext, keyHead: LogPos) {
    this.ctx = ctx;
    this.log = new KsetLog(ctx, keyHead);
    this.head = new DataHead(ctx);
    this.writes = new WritePath(ctx, this.log, this.head);
    this.reads = new ReadPath(ctx, this.log, this.head);
    this.writeback = new Writeback(ctx, this.log);
    this.gc = new Gc(ctx, new SecondChance(ctx, this.log, this.head, this.reads.admission));
    ctx.assertKeyTailBehindDirtyTail();
    assert(ctx.dirtyTail.lsn <= this.log.durableHead.lsn, 'dirty_tail passed the durable log head');
  }
}
