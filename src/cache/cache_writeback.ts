// Writeback: applying the log to the backing device, in log order, and advancing dirty_tail.
//
// A round takes the ksets from dirty_tail onwards — up to the end of a client flush epoch
// (a kset with EPOCH_END), at most writebackKsetsPerRoundMax ksets, never past the durable
// log head — merges their keys so only the newest data for each range survives, writes the
// dirty and ZERO extents to the backing device in offset order (CLEAN extents are skipped),
// syncs the backing device, and only then persists the advanced dirty_tail and syncs the
// cache device. Because a round never spans an epoch boundary, and a round's dirty_tail is
// durable before the next round writes anything, the backing device alone always holds a
// prefix of the client's flush epochs (the last one possibly partial), even across a crash
// and recovery, and even if the cache device is lost.
// On any error nothing advances: the round is retried from the same dirty_tail with
// exponential back-off, the error is counted, and status reports the cache as degraded. A
// failed backing sync is treated like failed writes (fsyncgate): the whole round is redone.

import { assert } from '../lib/assert.js';
import { crc32c } from '../lib/crc32c.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { MiB } from '../lib/units.js';
import { keyFlagClean, keyFlagZero, ksetBytesMax } from '../ondisk/kset.js';
import { CacheWorker } from './cache_worker.js';
import { positionAfter, readKsetAt, type LogPos } from './cache_kset.js';
import { KeyIndex, keyFromRecord, newIndexKey } from './cache_tree.js';

export const writebackKsetsPerRoundMax = 16;
export const writebackInFlightBytesMax = 32 * MiB;
export const writebackBackoffMinMs = 100;
export const writebackBackoffMaxMs = 30_000;
const zeroChunkBytes = 1 * MiB;

interface DrainWaiter {
  readonly lsn: number;
  readonly resolve: () => void;
  readonly reject: (error: unknown) => void;
}

export class Writeback extends CacheWorker {
  private readonly scratch = new Uint8Array(ksetBytesMax);
  private waiters: DrainWaiter[] = [];
  private zeroes: Uint8Array | undefined;
  backoffMs = 0;
  /** Monotonic time of the first failure of the current failing streak, if any. */
  failingSinceMs: number | undefined;
  lastError: string | undefined;

  /** Writeback has work: durable ksets past dirty_tail. */
  get due(): boolean {
    const core = this.core;
    return core.dirtyTail.lsn < core.log.durableHead.lsn;
  }

  /** Resolves when dirty_tail reaches `lsn` (drain). */
  waitFor(lsn: number): Promise<void> {
    if (this.core.dirtyTail.lsn >= lsn) return Promise.resolve();
    return new Promise((resolve, reject) => { this.waiters.push({ lsn, resolve, reject }); });
  }

  abort(error: PcacheError): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const waiter of waiters) waiter.reject(error);
  }

  /** One round, if one is due; returns whether dirty_tail advanced. For tests and the simulator. */
  async step(): Promise<boolean> {
    await this.idle();
    if (!this.due || this.core.stopped()) return false;
    return this.rounds.run(() => this.round());
  }

  protected async loop(): Promise<void> {
    const core = this.core;
    while (this.due && core.state === 'running' && core.failure === undefined) {
      const advanced = await this.rounds.run(() => this.round());
      if (advanced) await core.timers.yieldToOthers();
      else await core.timers.sleep(this.backoffMs);
    }
  }

  private async round(): Promise<boolean> {
    const core = this.core;
    core.stats.writebackRounds++;
    try {
      const batch = await this.readBatch();
      if (batch.end.lsn === core.dirtyTail.lsn) return false; // another round got here first
      await this.apply(batch.keys);
      await core.backing.sync();
      if (core.stopped()) return false;
      await core.dev.writeDirtyTail({ segment: batch.end.segment, offsetBytes: batch.end.offsetBytes });
      // The new dirty_tail must be durable before the next round puts newer data on the backing
      // device: were it lost in a crash, recovery would write this round's (older) epoch back
      // over the next one's, and the backing device would stop being a prefix of the epochs.
      await core.dev.sync();
      core.durableDirtyTail = batch.end;
      core.dirtyTail = batch.end;
      core.stats.dirtyBytes -= batch.dirtyBytes;
      core.stats.writebackBytes += batch.dirtyBytes;
      core.stats.writebackKsets += batch.ksets;
      core.assertTailOrder();
      this.backoffMs = 0;
      this.failingSinceMs = undefined;
      this.lastError = undefined;
      core.backingOnline();
      this.wakeWaiters();
      core.wakeAdmission();
      core.dirtyTailAdvanced();
      return true;
    } catch (error) {
      if (!isPcacheError(error)) throw error;
      core.stats.writebackErrors++;
      this.lastError = error.message;
      this.failingSinceMs ??= core.timers.now();
      const failingForMs = core.timers.now() - this.failingSinceMs;
      if (error.code === 'ENODEV') core.backingOffline(error.message);
      else if (failingForMs >= core.tuning.backingOfflineAfterMs) core.backingOffline(`writeback has failed for ${Math.round(failingForMs / 1000)} s: ${error.message}`);
      this.backoffMs = Math.min(writebackBackoffMaxMs, Math.max(writebackBackoffMinMs, this.backoffMs * 2));
      return false;
    }
  }

  /** Reads ksets from dirty_tail up to an epoch end, the round limit or the durable head. */
  private async readBatch(): Promise<{ keys: KeyIndex; end: LogPos; dirtyBytes: number; ksets: number }> {
    const core = this.core;
    const keys = new KeyIndex();
    const key = newIndexKey();
    let pos = core.dirtyTail;
    let ksets = 0;
    let dirtyBytes = 0;
    while (ksets < writebackKsetsPerRoundMax && pos.lsn < core.log.durableHead.lsn) {
      const kset = await readKsetAt(core, pos, this.scratch);
      if (!kset.ok) {
        throw new PcacheError('CORRUPT', `writeback: the kset at segment ${pos.segment} offset ${pos.offsetBytes} is invalid: ${kset.problem}`);
      }
      pos = positionAfter(pos, kset);
      if (kset.kind === 'last') continue;
      ksets++;
      for (const record of kset.keys) {
        if ((record.flags & keyFlagZero) === 0 && record.gen !== core.segments.gen[record.segment]) {
          throw new PcacheError('CORRUPT', `writeback: a dirty key at ${record.offsetBytes} points at a reused segment ${record.segment}`);
        }
        if ((record.flags & keyFlagClean) === 0) dirtyBytes += record.lengthBytes;
        keys.insert(keyFromRecord(key, record));
      }
      if (kset.epochEnd) break;
    }
    assert(pos.lsn <= core.log.durableHead.lsn, 'writeback read past the durable log head');
    return { keys, end: pos, dirtyBytes, ksets };
  }

  /** Writes the merged extents to the backing device in offset order, a bounded amount in flight. */
  private async apply(keys: KeyIndex): Promise<void> {
    const inFlight: Promise<void>[] = [];
    let inFlightBytes = 0;
    const key = newIndexKey();
    try {
      for (const subtree of keys.inOrder()) {
        for (let index = 0; index < subtree.count; index++) {
          subtree.read(index, key);
          if ((key.flags & keyFlagClean) !== 0) continue;
          if (inFlightBytes + key.lengthBytes > writebackInFlightBytesMax && inFlight.length > 0) {
            await Promise.all(inFlight);
            inFlight.length = 0;
            inFlightBytes = 0;
          }
          inFlight.push((key.flags & keyFlagZero) !== 0 ? this.zero(key.offsetBytes, key.lengthBytes) : this.copy(key));
          inFlightBytes += key.lengthBytes;
        }
      }
      await Promise.all(inFlight);
    } catch (error) {
      await Promise.allSettled(inFlight); // nothing of this round may still be in flight when it is retried
      throw error;
    }
  }

  private async copy(key: { offsetBytes: number; lengthBytes: number; segment: number; segmentOffsetBytes: number; crc: number; crcDeltaBytes: number; crcLengthBytes: number }): Promise<void> {
    const core = this.core;
    const originalOffset = key.segmentOffsetBytes - key.crcDeltaBytes;
    const extent = new Uint8Array(core.dataCrc ? key.crcLengthBytes : key.lengthBytes);
    const io = core.dev.readData(extent, key.segment, core.dataCrc ? originalOffset : key.segmentOffsetBytes);
    if (io !== undefined) await io;
    let data = extent;
    if (core.dataCrc) {
      if (crc32c(extent) !== key.crc) {
        core.stats.dataCrcErrors++;
        throw new PcacheError('EIO', `writeback: data CRC mismatch in extent ${key.offsetBytes}+${key.lengthBytes} (segment ${key.segment})`);
      }
      data = extent.subarray(key.crcDeltaBytes, key.crcDeltaBytes + key.lengthBytes);
    }
    await this.backingWrite(() => core.backing.write(data, key.offsetBytes));
  }

  private async zero(offsetBytes: number, lengthBytes: number): Promise<void> {
    const backing = this.core.backing;
    if (backing.discard !== undefined) {
      const discard = backing.discard.bind(backing);
      await this.backingWrite(() => discard(offsetBytes, lengthBytes));
      return;
    }
    this.zeroes ??= new Uint8Array(zeroChunkBytes);
    for (let done = 0; done < lengthBytes; done += zeroChunkBytes) {
      const piece = this.zeroes.subarray(0, Math.min(zeroChunkBytes, lengthBytes - done));
      await this.backingWrite(() => backing.write(piece, offsetBytes + done));
    }
  }

  private async backingWrite(write: () => Promise<void>): Promise<void> {
    try {
      await write();
    } catch (error) {
      if (isPcacheError(error)) this.core.stats.backingWriteErrors++;
      throw error;
    }
  }

  private wakeWaiters(): void {
    const lsn = this.core.dirtyTail.lsn;
    const waiting = this.waiters;
    this.waiters = [];
    for (const waiter of waiting) {
      if (waiter.lsn <= lsn) waiter.resolve();
      else this.waiters.push(waiter);
    }
  }
}
