// SimDevice: an in-memory BlockDevice that can lose power, for the crash simulator.
//
// Reads and writes work like any device, but underneath a DeviceModel (device_model.ts) keeps
// the durable contents apart from the volatile writes that a power loss may drop, keep, or
// tear, so the harness can build every crash state the contract allows. Also here:
// - DeviceEventLog: every write and sync of every device that shares the log gets a global
//   sequence number, so a harness can "crash at device-operation boundary k" (the state after
//   the first k events) and can snapshot both devices at each boundary from a listener;
// - IoScheduler: optional control over when asynchronous operations complete, in issue order
//   or in a seeded random order, so concurrent requests really overlap on the device.
//
// Invariants: without a scheduler an asynchronous operation takes effect before its call
// returns (one 'complete' event); with one, a write is in flight (in crash states, not in
// reads) from its 'issue' event until its 'complete' or 'fail' event. Faults are decided when
// an operation is issued (and an offline device also fails operations in flight when they
// complete). After powerOff nothing changes any more: pending operations never settle, like
// calls in a process that died, and new ones fail with ENODEV.

import { assert } from '../src/lib/assert.js';
import { PcacheError } from '../src/lib/errors.js';
import { isAllZero } from '../src/lib/units.js';
import { rangeProblem, type BlockDevice, type BlockingIo, type DeviceWrite } from '../src/device/block_device.js';
import { DeviceModel, type CrashPoint } from './device_model.js';
import { FaultInjector, type FaultOp } from './faults.js';
import { PageImage } from './page_image.js';
import { Prng } from './prng.js';

export type DeviceEventKind = 'write' | 'sync';
/** 'complete' alone (no 'issue' before it) marks an operation that completed when issued. */
export type DeviceEventPhase = 'issue' | 'complete' | 'fail';

export interface DeviceEvent {
  /** Global across the devices sharing the log; the first event is 1. */
  readonly seq: number;
  readonly device: string;
  readonly kind: DeviceEventKind;
  readonly phase: DeviceEventPhase;
  /** The device-local id of the write or sync. */
  readonly id: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
}

export type DeviceEventListener = (event: DeviceEvent) => void;

/** Default bound on events kept in `recorded`; later events are counted but not kept. */
const recordedEventsMaxDefault = 100_000;
const listenersMax = 64;

export class DeviceEventLog {
  /** The first `recordedEventsMax` events, for inspection and debugging. */
  readonly recorded: DeviceEvent[] = [];
  readonly recordedEventsMax: number;
  private count = 0;
  private readonly listeners: DeviceEventListener[] = [];

  constructor(options: { recordedEventsMax?: number } = {}) {
    this.recordedEventsMax = options.recordedEventsMax ?? recordedEventsMaxDefault;
    assert(this.recordedEventsMax >= 0, 'the record bound must not be negative');
  }

  /** Events so far: a crash "now" is a crash at boundary `now`. */
  get now(): number {
    return this.count;
  }

  /** Calls `listener` synchronously after every event, once the device state reflects it. */
  listen(listener: DeviceEventListener): () => void {
    assert(this.listeners.length < listenersMax, 'too many event listeners');
    this.listeners.push(listener);
    return () => {
      const index = this.listeners.indexOf(listener);
      if (index >= 0) this.listeners.splice(index, 1);
    };
  }

  append(fields: Omit<DeviceEvent, 'seq'>): DeviceEvent {
    this.count += 1;
    const event: DeviceEvent = { seq: this.count, ...fields };
    if (this.recorded.length < this.recordedEventsMax) this.recorded.push(event);
    for (const listener of [...this.listeners]) listener(event);
    return event;
  }
}

export type CompletionOrder = 'fifo' | 'random';

/** Bound on operations waiting to complete across the devices sharing a scheduler. */
const pendingCompletionsMaxDefault = 65_536;

/**
 * Completes asynchronous device operations one per event-loop turn (setImmediate), so the
 * code awaiting them runs in between: 'fifo' completes them in issue order, 'random' picks a
 * pending one with a seeded Prng, which reorders overlapping requests reproducibly.
 */
export class IoScheduler {
  readonly order: CompletionOrder;
  readonly pendingCompletionsMax: number;
  private readonly prng: Prng;
  private pending: (() => void)[] = [];
  private head = 0;
  private pumpScheduled = false;
  private idleWaiters: (() => void)[] = [];

  constructor(options: { order: CompletionOrder; seed?: number; pendingCompletionsMax?: number }) {
    this.order = options.order;
    this.prng = new Prng(options.seed ?? 0);
    this.pendingCompletionsMax = options.pendingCompletionsMax ?? pendingCompletionsMaxDefault;
  }

  get pendingCount(): number {
    return this.pending.length - this.head;
  }

  submit(complete: () => void): void {
    assert(this.pendingCount < this.pendingCompletionsMax, `more than ${this.pendingCompletionsMax} device operations in flight`);
    this.pending.push(complete);
    this.schedulePump();
  }

  /** Resolves once nothing is waiting to complete. */
  idle(): Promise<void> {
    if (this.pendingCount === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private schedulePump(): void {
    if (this.pumpScheduled) return;
    this.pumpScheduled = true;
    setImmediate(() => {
      this.pumpScheduled = false;
      this.pumpOne();
    });
  }

  private pumpOne(): void {
    const count = this.pendingCount;
    if (count > 0) {
      let complete: (() => void) | undefined;
      if (this.order === 'fifo') {
        complete = this.pending[this.head];
        this.head += 1;
      } else {
        const index = this.head + this.prng.nextInt(count);
        complete = this.pending[index];
        // Move the head element into the hole so the live range stays contiguous.
        this.pending[index] = this.pending[this.head] as () => void;
        this.head += 1;
      }
      if (this.head > 1024 && this.head * 2 > this.pending.length) {
        this.pending = this.pending.slice(this.head);
        this.head = 0;
      }
      assert(complete !== undefined, 'a pending completion exists');
      complete();
    }
    if (this.pendingCount > 0) {
      this.schedulePump();
    } else {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const wake of waiters) wake();
    }
  }
}

export interface SimDeviceOptions {
  /** Names the device in events, crash points and error messages. Default 'sim'. */
  readonly name?: string;
  readonly identity?: string;
  /** Offer synchronous readSync/writeSync (BlockingIo). Default true. */
  readonly blocking?: boolean;
  /** Share one log between devices to give their events one global order. */
  readonly events?: DeviceEventLog;
  /** Complete asynchronous operations later, in the scheduler's order. Default: at once. */
  readonly scheduler?: IoScheduler;
  /** Linux's behaviour after a failed fdatasync: the failed pages count as clean. */
  readonly fsyncgate?: boolean;
  /** Seed for probabilistic fault rules. Default 0. */
  readonly faultSeed?: number;
  readonly volatileWritesMax?: number;
}

export interface SimDeviceStats {
  reads: number;
  writes: number;
  syncs: number;
  bytesWritten: number;
}

export class SimDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly identity: string | undefined;
  readonly blocking: BlockingIo | undefined;
  readonly name: string;
  readonly events: DeviceEventLog;
  readonly faults: FaultInjector;
  readonly fsyncgate: boolean;
  readonly stats: SimDeviceStats = { reads: 0, writes: 0, syncs: 0, bytesWritten: 0 };
  private readonly model: DeviceModel;
  private readonly scheduler: IoScheduler | undefined;
  private nextId = 1;
  private closed = false;
  private poweredOff = false;

  /** A device holding `image` as its durable contents (the device takes the image over). */
  constructor(image: PageImage, options: SimDeviceOptions = {}) {
    this.sizeBytes = image.sizeBytes;
    this.identity = options.identity;
    this.name = options.name ?? 'sim';
    this.events = options.events ?? new DeviceEventLog();
    this.scheduler = options.scheduler;
    this.fsyncgate = options.fsyncgate ?? false;
    this.faults = new FaultInjector(new Prng(options.faultSeed ?? 0), this.name);
    this.model = new DeviceModel(image, options.volatileWritesMax === undefined ? {} : { volatileWritesMax: options.volatileWritesMax });
    this.blocking = (options.blocking ?? true)
      ? { readSync: (target, offsetBytes) => { this.readSync(target, offsetBytes); }, writeSync: (source, offsetBytes) => { this.writeSync(source, offsetBytes); } }
      : undefined;
  }

  /** A device of `sizeBytes` zeroes. */
  static blank(sizeBytes: number, options: SimDeviceOptions = {}): SimDevice {
    return new SimDevice(new PageImage(sizeBytes), options);
  }

  read(target: Uint8Array, offsetBytes: number): Promise<void> {
    const refused = this.refusal();
    if (refused !== undefined) return Promise.reject(refused);
    const fault = this.decide('read', offsetBytes, target.length);
    if (this.scheduler === undefined) {
      if (fault !== undefined) return Promise.reject(fault);
      this.stats.reads += 1;
      this.model.read(target, offsetBytes);
      return Promise.resolve();
    }
    const scheduler = this.scheduler;
    return new Promise((resolve, reject) => {
      scheduler.submit(() => {
        if (this.poweredOff) return;
        const failure = fault ?? (this.faults.offline ? this.faults.offlineError('read') : undefined);
        if (failure !== undefined) {
          reject(failure);
          return;
        }
        this.stats.reads += 1;
        this.model.read(target, offsetBytes);
        resolve();
      });
    });
  }

  write(source: Uint8Array, offsetBytes: number): Promise<void> {
    return this.writeAsync(offsetBytes, source.length, copyUnlessZero(source));
  }

  /**
   * A batch of writes (BlockDevice.writeMany), as a file's writer thread puts one into the page
   * cache: each piece is a write of its own, all in flight together (a crash may keep any subset
   * of them), and the batch settles only when every piece has, with the first failure.
   */
  async writeMany(writes: readonly DeviceWrite[]): Promise<void> {
    const outcomes = await Promise.allSettled(writes.map((w) => this.write(w.source, w.offsetBytes)));
    const failed = outcomes.find((outcome) => outcome.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
  }

  discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    // A discard reads back as zeroes (BlockDevice contract), so it is a write of zeroes that
    // can be lost or torn like any other write.
    return this.writeAsync(offsetBytes, lengthBytes, undefined);
  }

  sync(): Promise<void> {
    const refused = this.refusal();
    if (refused !== undefined) return Promise.reject(refused);
    const fault = this.decide('sync', 0, 0);
    const id = this.takeId();
    this.stats.syncs += 1;
    this.model.issueSync(id);
    if (this.scheduler === undefined) {
      if (fault !== undefined) {
        this.model.failSync(id, { dropDirty: this.fsyncgate });
        this.event('sync', 'fail', id, 0, 0);
        return Promise.reject(fault);
      }
      this.model.completeSync(id);
      this.event('sync', 'complete', id, 0, 0);
      return Promise.resolve();
    }
    this.event('sync', 'issue', id, 0, 0);
    const scheduler = this.scheduler;
    return new Promise((resolve, reject) => {
      scheduler.submit(() => {
        if (this.poweredOff) return;
        const failure = fault ?? (this.faults.offline ? this.faults.offlineError('sync') : undefined);
        if (failure !== undefined) {
          this.model.failSync(id, { dropDirty: this.fsyncgate });
          this.event('sync', 'fail', id, 0, 0);
          reject(failure);
          return;
        }
        this.model.completeSync(id);
        this.event('sync', 'complete', id, 0, 0);
        resolve();
      });
    });
  }

  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }

  /** Takes the device back (online=true) or away (false); see FaultInjector.setOffline. */
  setOnline(online: boolean): void {
    this.faults.setOffline(!online);
  }

  /** The state a power loss right now would start from. */
  crashPoint(): CrashPoint {
    return this.model.crashPoint(this.name, this.identity);
  }

  /**
   * Cuts the power: from now on nothing changes. Pending operations never complete (their
   * callers are as dead as a killed process) and new ones fail with ENODEV.
   */
  powerOff(): void {
    this.poweredOff = true;
  }

  get isPoweredOff(): boolean {
    return this.poweredOff;
  }

  /** Makes everything that reads return durable, as a clean shutdown of the machine would. */
  settle(): void {
    this.model.settle();
  }

  get volatileWriteCount(): number {
    return this.model.volatileWriteCount;
  }

  /** What would survive a power loss if no volatile write reached the media. */
  readDurable(target: Uint8Array, offsetBytes: number): void {
    this.checkRange(offsetBytes, target.length);
    this.model.readDurable(target, offsetBytes);
  }

  /** A fork of the durable contents (O(1)). */
  durableImage(): PageImage {
    return this.model.durableImage();
  }

  /** A fork of what reads return now (O(1)). */
  visibleImage(): PageImage {
    return this.model.visibleImage();
  }

  private readSync(target: Uint8Array, offsetBytes: number): void {
    const refused = this.refusal();
    if (refused !== undefined) throw refused;
    const fault = this.decide('read', offsetBytes, target.length);
    if (fault !== undefined) throw fault;
    this.stats.reads += 1;
    this.model.read(target, offsetBytes);
  }

  private writeSync(source: Uint8Array, offsetBytes: number): void {
    const refused = this.refusal();
    if (refused !== undefined) throw refused;
    const fault = this.decide('write', offsetBytes, source.length);
    const id = this.takeId();
    if (fault !== undefined) {
      this.event('write', 'fail', id, offsetBytes, source.length);
      throw fault;
    }
    this.countWrite(source.length);
    this.model.issueWrite(id, offsetBytes, source.length, copyUnlessZero(source));
    this.model.completeWrite(id);
    this.event('write', 'complete', id, offsetBytes, source.length);
  }

  private writeAsync(offsetBytes: number, lengthBytes: number, data: Uint8Array | undefined): Promise<void> {
    const refused = this.refusal();
    if (refused !== undefined) return Promise.reject(refused);
    const fault = this.decide('write', offsetBytes, lengthBytes);
    const id = this.takeId();
    if (this.scheduler === undefined) {
      if (fault !== undefined) {
        this.event('write', 'fail', id, offsetBytes, lengthBytes);
        return Promise.reject(fault);
      }
      this.countWrite(lengthBytes);
      this.model.issueWrite(id, offsetBytes, lengthBytes, data);
      this.model.completeWrite(id);
      this.event('write', 'complete', id, offsetBytes, lengthBytes);
      return Promise.resolve();
    }
    // A write that will fail never enters the model: it applies nothing in any crash state.
    if (fault === undefined) {
      this.countWrite(lengthBytes);
      this.model.issueWrite(id, offsetBytes, lengthBytes, data);
    }
    this.event('write', 'issue', id, offsetBytes, lengthBytes);
    const scheduler = this.scheduler;
    return new Promise((resolve, reject) => {
      scheduler.submit(() => {
        if (this.poweredOff) return;
        const failure = fault ?? (this.faults.offline ? this.faults.offlineError('write') : undefined);
        if (failure !== undefined) {
          if (fault === undefined) this.model.failWrite(id);
          this.event('write', 'fail', id, offsetBytes, lengthBytes);
          reject(failure);
          return;
        }
        this.model.completeWrite(id);
        this.event('write', 'complete', id, offsetBytes, lengthBytes);
        resolve();
      });
    });
  }

  /** Why the device takes no operation at all (lost power, closed), if it does not. */
  private refusal(): PcacheError | undefined {
    if (this.poweredOff) return new PcacheError('ENODEV', `${this.name}: device has lost power`);
    if (this.closed) return new PcacheError('ENODEV', `${this.name}: device is closed`);
    return undefined;
  }

  /** Range-checks a request (a programmer error if wrong) and decides its injected fault. */
  private decide(op: FaultOp, offsetBytes: number, lengthBytes: number): PcacheError | undefined {
    this.checkRange(offsetBytes, lengthBytes);
    return this.faults.decide(op, offsetBytes, lengthBytes);
  }

  private checkRange(offsetBytes: number, lengthBytes: number): void {
    const problem = rangeProblem(this, offsetBytes, lengthBytes);
    if (problem !== undefined) assert(false, this.name, problem);
  }

  private takeId(): number {
    const id = this.nextId;
    this.nextId += 1;
    return id;
  }

  private countWrite(lengthBytes: number): void {
    this.stats.writes += 1;
    this.stats.bytesWritten += lengthBytes;
  }

  private event(kind: DeviceEventKind, phase: DeviceEventPhase, id: number, offsetBytes: number, lengthBytes: number): void {
    this.events.append({ device: this.name, kind, phase, id, offsetBytes, lengthBytes });
  }
}

/**
 * What a write keeps of its source: a copy (the caller may reuse its buffer), or nothing for a
 * write of zeroes, which the model then holds like a discard. It reads, drops and tears the
 * same, and its whole pages are dropped instead of stored: recovery zeroes the rest of a
 * segment at every open, and the crash simulator opens a cache millions of times.
 */
function copyUnlessZero(source: Uint8Array): Uint8Array | undefined {
  return isAllZero(source) ? undefined : source.slice();
}
