// CachePolicy: what each client request does with the cache — the write mode and the
// sequential cutoff — and switching modes.
//
//   mode          writes                                   reads (misses)   FLUSH
//   writeback     into the cache, written back later       cached           commits the log
//   writethrough  to the backing device, synced, and a     cached           log and backing
//                 CLEAN copy into the cache, before ack
//   writearound   to the backing device; cached copies     cached           log and backing
//                 of the range are dropped
//   passthrough   as writearound                           not cached       log and backing
//
// TRIM and WRITE_ZEROES outside writeback zero the backing device directly. Sequential streams
// longer than sequentialCutoffBytes bypass the cache in every mode: writes go to the backing
// device (as writearound), reads are not cached. Hits are served from the cache in every mode,
// so data left dirty by writeback is read from the cache while it drains. How a write reaches
// the backing device safely past cached data is cache_direct.ts's job.
// A mode is stored in cache_info (format version 2), so a restart keeps it. Leaving writeback
// with dirty data drains it in the background (background work on); so does a start in another
// mode with dirty data left.
// In writeback, the cutoff never fails a write the cache could absorb: it is off while the
// backing device is offline, and a direct write the backing device refuses is cached instead.
// Under strict writeback ordering (the default) it also keeps the backing device alone a prefix
// of the client's flush epochs: a write bypasses only while nothing is dirty, since a direct
// write landing while older dirty data waits in the cache would put a later epoch's data on
// the backing device before an earlier one's. Under relaxed ordering it bypasses regardless.
// Invariant: a cached write never overtakes a direct write of an overlapping range in flight
// (it waits), so the backing device receives writes of one range in the order they were made.

import { PcacheError, isPcacheError } from '../lib/errors.js';
import { cacheModeNamed, cacheModes, type CacheMode } from '../ondisk/cache_info.js';
import { DirectWrites } from './cache_direct.js';
import type { CacheEngine } from './cache_engine.js';
import { cacheInfoOf } from './cache_status.js';
import { StreamTable } from './cache_streams.js';

/** Where a write goes: the cache, or past it because of the sequential cutoff or the mode. */
export type WriteRoute = 'cache' | 'cutoff' | 'mode';


export class CachePolicy {
  private readonly engine: CacheEngine;
  readonly direct: DirectWrites;
  private readonly streams = new StreamTable();
  /** The background drain in progress (drainInBackground), if any. */
  private drainRun: Promise<void> | undefined;

  constructor(engine: CacheEngine) {
    this.engine = engine;
    this.direct = new DirectWrites(engine.ctx, engine.log, engine.writes, engine.reads);
    if (engine.ctx.mode !== 'writeback') this.drainInBackground();
  }

  get mode(): CacheMode {
    return this.engine.ctx.mode;
  }

  /** Where a write of [offsetBytes, +lengthBytes) from `client` goes (notes it in the client's streams). */
  writeRoute(offsetBytes: number, lengthBytes: number, client: number): WriteRoute {
    const ctx = this.engine.ctx;
    const cutoff = this.pastCutoff(offsetBytes, lengthBytes, client);
    switch (ctx.mode) {
      case 'writeback':
        return cutoff && this.mayBypassWriteback() ? 'cutoff' : 'cache';
      case 'writethrough':
        return cutoff ? 'cutoff' : 'mode';
      case 'writearound':
      case 'passthrough':
        return 'mode';
    }
  }

  /** Whether a writeback-mode write past the cutoff may go to the backing device (see the file comment). */
  private mayBypassWriteback(): boolean {
    const ctx = this.engine.ctx;
    return ctx.tuning.writebackOrdering === 'relaxed' || ctx.stats.dirtyBytes === 0;
  }

  /** Whether a read's misses may be cached (notes it in the client's streams). */
  admitRead(offsetBytes: number, lengthBytes: number, client: number): boolean {
    const ctx = this.engine.ctx;
    const cutoff = this.pastCutoff(offsetBytes, lengthBytes, client);
    if (ctx.mode === 'passthrough') {
      ctx.stats.bypassModeRequests++;
      ctx.stats.bypassModeBytes += lengthBytes;
      return false;
    }
    if (cutoff) {
      ctx.stats.bypassCutoffRequests++;
      ctx.stats.bypassCutoffBytes += lengthBytes;
      return false;
    }
    return true;
  }

  /** A write that is not the plain cached case: routed past the cache, or waiting for a direct write. */
  async write(route: WriteRoute, source: Uint8Array, offsetBytes: number, fua: boolean): Promise<void> {
    const engine = this.engine;
    const ctx = engine.ctx;
    if (route === 'cache') {
      await this.direct.waitClear(offsetBytes, offsetBytes + source.length);
      await engine.writes.write(source, offsetBytes, fua, this.direct.noteCachedWrite);
      return;
    }
    ctx.checkWritable();
    ctx.stats.writeRequests++;
    ctx.stats.writeBytes += source.length;
    ctx.lastWriteMs = ctx.timers.now();
    const keepCopy = route === 'mode' && ctx.mode === 'writethrough';
    let outcome;
    try {
      outcome = await this.direct.write(source, offsetBytes, source.length, fua, keepCopy);
    } catch (error) {
      // In writeback the cutoff is an optimisation: a write the backing device refused is
      // absorbed by the cache as any other (writeback retries it), never failed.
      if (!isPcacheError(error) || route !== 'cutoff' || ctx.mode !== 'writeback') throw error;
      ctx.stats.bypassFallbacks++;
      await engine.writes.write(source, offsetBytes, fua, this.direct.noteCachedWrite);
      return;
    }
    if (outcome === 'direct') this.countBypass(route, source.length);
  }

  /** TRIM and WRITE_ZEROES: ZERO keys in writeback, zeroes written to the backing device otherwise. */
  async zero(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    const engine = this.engine;
    const ctx = engine.ctx;
    if (ctx.mode === 'writeback') {
      if (this.direct.busy) await this.direct.waitClear(offsetBytes, offsetBytes + lengthBytes);
      await this.direct.noteCachedWrite(engine.writes.zero(offsetBytes, lengthBytes, fua));
      return;
    }
    ctx.checkWritable();
    ctx.stats.zeroRequests++;
    ctx.stats.zeroBytes += lengthBytes;
    ctx.lastWriteMs = ctx.timers.now();
    const outcome = await this.direct.write(undefined, offsetBytes, lengthBytes, fua, false);
    if (outcome === 'direct') this.countBypass('mode', lengthBytes);
  }

  /** FLUSH: the log, and the backing device when direct writes completed since its last sync. */
  flush(): Promise<void> {
    const log = this.engine.log.flush();
    const backing = this.direct.flushBacking();
    if (backing === undefined) return log;
    return Promise.all([log, backing]).then(() => undefined);
  }

  /** Changes the write mode and stores it in cache_info; leaving writeback starts draining. */
  async setMode(name: string): Promise<void> {
    const ctx = this.engine.ctx;
    const mode = cacheModeNamed(name);
    if (mode === undefined) throw new PcacheError('EINVAL', `unknown mode ${JSON.stringify(name)} (modes: ${cacheModes.join(', ')})`);
    ctx.checkWritable();
    if (mode !== 'writeback' && !ctx.dev.layout.extendedKsets) {
      throw new PcacheError('ENOTSUP', `mode ${mode} needs a cache of format version 2 (drain it and format it again)`);
    }
    if (mode === ctx.mode) return;
    await ctx.dev.writeCacheInfo({ ...cacheInfoOf(ctx, ctx.gcPercent), mode });
    await ctx.dev.sync();
    ctx.mode = mode;
    if (mode !== 'writeback') this.drainInBackground();
  }

  /** Whether the request continues a stream past the cutoff; never while the backing device is offline (writes are absorbed then). */
  private pastCutoff(offsetBytes: number, lengthBytes: number, client: number): boolean {
    const ctx = this.engine.ctx;
    const cutoffBytes = ctx.tuning.sequentialCutoffBytes;
    if (cutoffBytes === 0) return false;
    return this.streams.note(client, offsetBytes, lengthBytes) > cutoffBytes && ctx.backingOfflineSinceMs === undefined;
  }

  private countBypass(route: WriteRoute, bytes: number): void {
    const stats = this.engine.ctx.stats;
    if (route === 'cutoff') {
      stats.bypassCutoffRequests++;
      stats.bypassCutoffBytes += bytes;
    } else {
      stats.bypassModeRequests++;
      stats.bypassModeBytes += bytes;
    }
  }

  /**
   * Writes back everything dirty while the mode is not writeback (writes that overlapped dirty
   * data were cached and are dirty too). With background work off (tests, the crash
   * simulator), whoever drives writeback drains.
   */
  private drainInBackground(): void {
    const ctx = this.engine.ctx;
    if (!ctx.background || this.drainRun !== undefined || ctx.readOnly) return;
    this.drainRun = this.drainWhileDirty().finally(() => { this.drainRun = undefined; });
  }

  /** Whether a background drain is running: it may kick writeback again at any await. */
  get draining(): boolean {
    return this.drainRun !== undefined;
  }

  /** Resolves once no background drain runs (Cache.check() settles on it). */
  async drainIdle(): Promise<void> {
    while (this.drainRun !== undefined) await this.drainRun;
  }

  private async drainWhileDirty(): Promise<void> {
    const { ctx, log, writeback } = this.engine;
    try {
      while (ctx.state === 'running' && ctx.mode !== 'writeback' && ctx.failure === undefined && ctx.stats.dirtyBytes > 0) {
        await log.flush();
        const target = log.durableHead.lsn;
        if (target <= ctx.dirtyTail.lsn) return; // nothing left to write back
        // Waiting first: urgency lasts only while a waiter is there (cache_writeback.ts).
        const done = writeback.waitFor(target);
        writeback.kick(true);
        await done;
      }
    } catch (error) {
      // The cache stopped or failed: the drain ends with it (a restart in this mode drains again).
      if (!isPcacheError(error)) throw error;
    }
  }
}
