// NbdRemoteDevice: a remote NBD export as a block device — pcache's backing device over NBD.
//
// It matches the BlockDevice interface of src/device structurally (the NBD layer imports only
// src/lib), holding several NbdClient connections to one export: parallel miss reads and
// writeback spread over the connected ones (least loaded first).
//
// Invariants:
// - sizeBytes is fixed at open. Every connection, including every reconnection, must report
//   that size and a minimum block size of at most 512 bytes (pcache issues 512-byte-aligned
//   I/O); a connection that does not is refused and the device stays disconnected for good,
//   with the reason in state().refused — a different size means a different disk.
// - sync() covers every write that completed before it was called: one FLUSH when every
//   connection advertises CAN_MULTI_CONN (a flush then covers all connections), otherwise a
//   FLUSH on every connection that has acknowledged writes since its last flush. If a
//   connection that held acknowledged but unflushed writes was lost, the next sync() fails
//   with ENODEV: those writes may not be durable, and the caller (pcache's writeback) must
//   write them again — the fsyncgate rule, applied to a network.
// - discard() is WRITE_ZEROES (the BlockDevice contract: the range reads as zeroes after),
//   or plain zero writes when the server lacks it; never TRIM, whose result is unspecified.
// - While no connection is up, every request fails at once with PcacheError 'ENODEV' (never
//   waits), and the device reconnects in the background with exponential back-off between
//   reconnect.delayMinMs and reconnect.delayMaxMs, for at most reconnect.attemptsMax attempts
//   per outage.
// - close() stops reconnecting and disconnects every connection cleanly (NBD_CMD_DISC).
// - With an nbds:// URI every connection, reconnections included, is upgraded to TLS with the
//   credentials read once by open() (client/tls.ts). A refused TLS handshake on a reconnection
//   is a failed attempt like any other: the server's credentials may be fixed meanwhile.

import { createHash } from 'node:crypto';
import { assert } from '../../lib/assert.js';
import { PcacheError } from '../../lib/errors.js';
import { realTimers, type TimerHandle, type Timers } from '../../lib/timers.js';
import { MiB, sectorSizeBytes } from '../../lib/units.js';
import type { WriteOptions } from '../protocol/command_types.js';
import { NbdClient } from './client.js';
import type { NbdClientLimits } from './connect.js';
import { loadClientTls, type ClientTls } from './tls.js';
import { formatNbdUri, nbdLocation, parseNbdUri, type NbdUri } from './uri.js';

/** Connections per device when not told otherwise (as nbdcopy and nbdublk with multi-conn). */
export const defaultConnections = 4;
/** More connections than this buy nothing and cost the server threads. */
export const connectionsMax = 16;
/** pcache's superblock stores at most this many bytes of backing identity. */
const identityMaxBytes = 128;
/** Zero writes (for servers without WRITE_ZEROES) go out in pieces of this size... */
const zeroPieceBytes = 1 * MiB;
/** ...at most this many at a time. */
const zeroPiecesInFlightMax = 8;

export interface ReconnectPolicy {
  /** First delay after a connection is lost; doubled after every failed attempt. */
  readonly delayMinMs: number;
  /** The delay never grows beyond this. */
  readonly delayMaxMs: number;
  /** Attempts per outage before giving up (the device then stays offline); default unbounded. */
  readonly attemptsMax: number;
}

export const defaultReconnectPolicy: ReconnectPolicy = {
  delayMinMs: 100,
  delayMaxMs: 10_000,
  attemptsMax: Number.POSITIVE_INFINITY,
};

export interface NbdRemoteOptions {
  /** Connections to open (default 4, at most 16). */
  readonly connections?: number;
  /** Refuse writes even when the export is writable. */
  readonly readOnly?: boolean;
  /** Ask for structured replies (default true). */
  readonly structuredReplies?: boolean;
  /** Per-connection limits: timeouts, requests and bytes in flight. */
  readonly limits?: Partial<NbdClientLimits>;
  readonly reconnect?: Partial<ReconnectPolicy>;
  readonly timers?: Timers;
  /** Called after every change of state (connected, lost, refused, closed), e.g. to log it. */
  readonly onStateChange?: (state: NbdRemoteState) => void;
}

/** What `pcache status` can show about a remote backing device. */
export interface NbdRemoteState {
  /** `nbd:HOST:PORT/EXPORT` or `nbd:/socket/path/EXPORT`. */
  readonly location: string;
  readonly connectionsWanted: number;
  readonly connectionsConnected: number;
  /** When the last connection was lost (ISO 8601), while none is up. */
  readonly offlineSince: string | undefined;
  /** Reconnection attempts since the last time every connection was up. */
  readonly reconnectAttempts: number;
  /** The most recent connection failure or loss. */
  readonly lastError: string | undefined;
  /** Set when the device gave up for good (export size changed, attempts exhausted). */
  readonly refused: string | undefined;
  readonly closed: boolean;
  readonly readOnly: boolean;
  /** Every connected connection advertises CAN_MULTI_CONN (one FLUSH covers all). */
  readonly multiConn: boolean;
  readonly structuredReplies: boolean;
}

interface Slot {
  client: NbdClient | undefined;
  /** The client's writesCompleted covered by a successful flush. */
  flushedWrites: number;
}

let zeroPiece: Uint8Array | undefined;

export class NbdRemoteDevice {
  readonly sizeBytes: number;
  readonly identity: string;
  /** Remote I/O is never synchronous. */
  readonly blocking = undefined;
  readonly uri: NbdUri;
  readonly readOnly: boolean;

  private readonly location: string;
  private readonly clientOptions: { exportName: string; structuredReplies: boolean; limits: Partial<NbdClientLimits>; tls?: ClientTls };
  private readonly policy: ReconnectPolicy;
  private readonly timers: Timers;
  private readonly onStateChange: ((state: NbdRemoteState) => void) | undefined;
  private readonly slots: Slot[];
  private nextSlot = 0;
  private closing: Promise<void> | undefined;
  private refusedReason: string | undefined;
  private lastError: string | undefined;
  private offlineSinceWallMs: number | undefined;
  private reconnectAttempts = 0;
  private reconnectDelayMs: number;
  private reconnectTimer: TimerHandle | undefined;
  private reconnecting = false;
  private lostUnflushedWrites = false;

  /**
   * Opens a remote export, e.g. `await NbdRemoteDevice.open('nbd://host/export')` or
   * `nbd+unix:///export?socket=/run/nbd.sock`. The first connection must succeed (or this
   * rejects, with 'EINVAL' for a bad URI or export and 'ENODEV' when nothing answers); the
   * others are attempted before this resolves and retried in the background if they fail.
   */
  static async open(uri: string | NbdUri, options: NbdRemoteOptions = {}): Promise<NbdRemoteDevice> {
    const parsed = typeof uri === 'string' ? parseNbdUri(uri) : uri;
    const connections = options.connections ?? defaultConnections;
    if (!Number.isSafeInteger(connections) || connections < 1 || connections > connectionsMax) {
      throw new PcacheError('EINVAL', `connections must be an integer from 1 to ${connectionsMax}, got ${connections}`);
    }
    const policy = { ...defaultReconnectPolicy, ...options.reconnect };
    checkPolicy(policy);
    // TLS credentials are read once, now: a missing file fails the open, not every reconnect.
    let tls: ClientTls | undefined;
    try {
      tls = parsed.tls === undefined ? undefined : loadClientTls(parsed.tls);
    } catch (error) {
      if (!(error instanceof PcacheError)) throw error;
      throw new PcacheError(error.code, `cannot open ${formatNbdUri(parsed)}: ${error.message}`, { cause: error });
    }
    const clientOptions = {
      exportName: parsed.exportName,
      structuredReplies: options.structuredReplies ?? true,
      limits: options.limits ?? {},
      ...(tls === undefined ? {} : { tls }),
    };
    let first: NbdClient;
    try {
      first = await NbdClient.connect(parsed.address, clientOptions);
    } catch (error) {
      const reason = error instanceof Error ? error.message : String(error);
      const code = error instanceof PcacheError ? error.code : 'ENODEV';
      throw new PcacheError(code, `cannot open ${formatNbdUri(parsed)}: ${reason}`, { cause: error });
    }
    const problem = blockSizeProblem(first);
    if (problem !== undefined) {
      await first.disconnect();
      throw new PcacheError('EINVAL', `cannot use ${formatNbdUri(parsed)} as a backing device: ${problem}`);
    }
    const device = new NbdRemoteDevice(parsed, first, { ...options, connections, policy, clientOptions });
    await device.connectOthers();
    if (device.refusedReason !== undefined) {
      const reason = device.refusedReason;
      await device.close();
      throw new PcacheError('EINVAL', `cannot use ${formatNbdUri(parsed)}: ${reason}`);
    }
    return device;
  }

  private constructor(
    uri: NbdUri,
    first: NbdClient,
    options: NbdRemoteOptions & { connections: number; policy: ReconnectPolicy; clientOptions: NbdRemoteDevice['clientOptions'] },
  ) {
    this.uri = uri;
    this.location = nbdLocation(uri);
    this.identity = identityOf(this.location);
    this.sizeBytes = first.sizeBytes;
    this.readOnly = options.readOnly === true || first.readOnly;
    this.clientOptions = options.clientOptions;
    this.policy = options.policy;
    this.timers = options.timers ?? realTimers;
    this.onStateChange = options.onStateChange;
    this.reconnectDelayMs = options.policy.delayMinMs;
    this.slots = Array.from({ length: options.connections }, () => ({ client: undefined, flushedWrites: 0 }));
    const slot = this.slots[0];
    assert(slot !== undefined, 'at least one connection');
    this.attach(slot, first);
  }

  // --- BlockDevice ---

  async read(target: Uint8Array, offsetBytes: number): Promise<void> {
    this.checkRange(offsetBytes, target.length);
    await this.pick().read(target, offsetBytes);
  }

  /** Writes `source`; with `fua` it is durable when this resolves. */
  async write(source: Uint8Array, offsetBytes: number, options: Partial<WriteOptions> = {}): Promise<void> {
    this.checkRange(offsetBytes, source.length);
    this.checkWritable('write');
    await this.pick().write(source, offsetBytes, { fua: options.fua === true });
  }

  /** Makes every write that completed before this call durable on the server. */
  async sync(): Promise<void> {
    const lostBefore = this.lostUnflushedWrites;
    this.lostUnflushedWrites = false;
    const connected = this.connectedSlots();
    if (connected.length === 0) throw this.unavailable();
    const multiConn = connected.every(({ client }) => client.canMultiConn);
    try {
      if (multiConn) {
        // One FLUSH covers every write acknowledged on any connection before it was sent.
        const covered = connected.map(({ slot, client }) => ({ slot, client, writes: client.writesCompleted }));
        await leastLoaded(connected).flush();
        for (const { slot, client, writes } of covered) this.markFlushed(slot, client, writes);
      } else {
        // Each connection's FLUSH covers its own writes only: flush every connection that has
        // acknowledged writes since its last flush (or one, so a sync always reaches the server).
        const owing = connected.filter(({ slot, client }) => client.writesCompleted > slot.flushedWrites);
        const targets = owing.length > 0 ? owing : connected.slice(0, 1);
        const results = await Promise.allSettled(targets.map(async ({ slot, client }) => {
          const writes = client.writesCompleted;
          await client.flush();
          this.markFlushed(slot, client, writes);
        }));
        for (const result of results) if (result.status === 'rejected') throw result.reason;
      }
    } catch (error) {
      // Still owed: report the loss again on the next sync.
      if (lostBefore) this.lostUnflushedWrites = true;
      throw error;
    }
    // Read through a call: a connection may have been lost while the flushes ran.
    if (lostBefore || this.lostDuringSync()) {
      this.lostUnflushedWrites = false;
      throw new PcacheError('ENODEV', `${this.location}: a connection holding acknowledged but unflushed writes was lost; ` +
        'they may not be durable and must be written again');
    }
  }

  /** The range reads as zeroes afterwards (WRITE_ZEROES, or zero writes without it). */
  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.checkRange(offsetBytes, lengthBytes);
    this.checkWritable('discard');
    const client = this.pick();
    if (client.canWriteZeroes) {
      await client.writeZeroes(offsetBytes, lengthBytes);
      return;
    }
    const zeroes = (zeroPiece ??= new Uint8Array(zeroPieceBytes));
    const inFlight = new Set<Promise<void>>();
    for (let done = 0; done < lengthBytes; done += zeroPieceBytes) {
      const piece = zeroes.subarray(0, Math.min(zeroPieceBytes, lengthBytes - done));
      const write = client.write(piece, offsetBytes + done);
      inFlight.add(write);
      void write.then(() => inFlight.delete(write), () => inFlight.delete(write));
      if (inFlight.size >= zeroPiecesInFlightMax) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
  }

  /** Stops reconnecting and disconnects every connection cleanly. Idempotent. */
  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  // --- Status ---

  state(): NbdRemoteState {
    const connected = this.connectedSlots();
    return {
      location: this.location,
      connectionsWanted: this.slots.length,
      connectionsConnected: connected.length,
      offlineSince: this.offlineSinceWallMs === undefined ? undefined : new Date(this.offlineSinceWallMs).toISOString(),
      reconnectAttempts: this.reconnectAttempts,
      lastError: this.lastError,
      refused: this.refusedReason,
      closed: this.closing !== undefined,
      readOnly: this.readOnly,
      multiConn: connected.length > 0 && connected.every(({ client }) => client.canMultiConn),
      structuredReplies: connected.length > 0 && connected.every(({ client }) => client.info.structuredReplies),
    };
  }

  // --- Connections ---

  /** The least-loaded open connection, or the ENODEV error saying why there is none. */
  private pick(): NbdClient {
    const count = this.slots.length;
    let best: NbdClient | undefined;
    for (let i = 0; i < count; i += 1) {
      const client = this.slots[(this.nextSlot + i) % count]?.client;
      if (client?.isOpen !== true) continue;
      if (best === undefined || client.load < best.load) best = client;
    }
    // Rotate the starting point so equally loaded connections take turns.
    this.nextSlot = (this.nextSlot + 1) % count;
    if (best === undefined) throw this.unavailable();
    return best;
  }

  private connectedSlots(): { slot: Slot; client: NbdClient }[] {
    const connected: { slot: Slot; client: NbdClient }[] = [];
    for (const slot of this.slots) {
      if (slot.client?.isOpen === true) connected.push({ slot, client: slot.client });
    }
    return connected;
  }

  private lostDuringSync(): boolean {
    return this.lostUnflushedWrites;
  }

  private markFlushed(slot: Slot, client: NbdClient, writes: number): void {
    if (slot.client === client) slot.flushedWrites = Math.max(slot.flushedWrites, writes);
  }

  private async connectOthers(): Promise<void> {
    const empty = this.slots.filter((slot) => slot.client === undefined);
    await Promise.allSettled(empty.map((slot) => this.connectSlot(slot)));
    this.scheduleReconnect();
  }

  /** One connection attempt for an empty slot; failures are recorded, not thrown. */
  private async connectSlot(slot: Slot): Promise<void> {
    let client: NbdClient;
    try {
      client = await NbdClient.connect(this.uri.address, this.clientOptions);
    } catch (error) {
      this.lastError = error instanceof Error ? error.message : String(error);
      return;
    }
    if (this.closing !== undefined || this.refusedReason !== undefined) {
      await client.disconnect();
      return;
    }
    const problem = client.sizeBytes === this.sizeBytes
      ? blockSizeProblem(client)
      : `the export's size changed from ${this.sizeBytes} to ${client.sizeBytes} bytes; refusing to use it`;
    if (problem !== undefined) {
      await client.disconnect();
      this.refuse(problem);
      return;
    }
    this.attach(slot, client);
  }

  private attach(slot: Slot, client: NbdClient): void {
    assert(slot.client === undefined, 'a slot holds one connection');
    slot.client = client;
    slot.flushedWrites = 0;
    this.offlineSinceWallMs = undefined;
    if (this.slots.every((s) => s.client !== undefined)) {
      this.reconnectAttempts = 0;
      this.reconnectDelayMs = this.policy.delayMinMs;
    }
    void client.closed.then((reason) => { this.lost(slot, client, reason); });
    this.notify();
  }

  private lost(slot: Slot, client: NbdClient, reason: PcacheError): void {
    if (slot.client !== client) return;
    slot.client = undefined;
    if (client.writesCompleted > slot.flushedWrites) this.lostUnflushedWrites = true;
    // Connections we closed ourselves need no reconnecting, and must not hide why we did.
    if (this.closing !== undefined || this.refusedReason !== undefined) return;
    this.lastError = reason.message;
    if (this.connectedSlots().length === 0) this.offlineSinceWallMs ??= this.timers.wallClockMs();
    this.scheduleReconnect();
    this.notify();
  }

  private scheduleReconnect(): void {
    if (this.closing !== undefined || this.refusedReason !== undefined) return;
    if (this.reconnectTimer !== undefined || this.reconnecting) return;
    if (this.slots.every((slot) => slot.client !== undefined)) return;
    if (this.reconnectAttempts >= this.policy.attemptsMax) {
      this.refuse(`gave up after ${this.reconnectAttempts} reconnection attempts; last error: ${this.lastError ?? 'none'}`);
      return;
    }
    this.reconnectTimer = this.timers.after(this.reconnectDelayMs, () => {
      this.reconnectTimer = undefined;
      void this.reconnectRound();
    });
  }

  /** Tries every empty slot once, then backs off (doubling, up to the maximum) if any is still empty. */
  private async reconnectRound(): Promise<void> {
    this.reconnecting = true;
    const empty = this.slots.filter((slot) => slot.client === undefined);
    this.reconnectAttempts += empty.length;
    await Promise.allSettled(empty.map((slot) => this.connectSlot(slot)));
    this.reconnecting = false;
    if (this.slots.some((slot) => slot.client === undefined)) {
      this.reconnectDelayMs = Math.min(this.policy.delayMaxMs, this.reconnectDelayMs * 2);
    }
    this.scheduleReconnect();
    this.notify();
  }

  private refuse(reason: string): void {
    if (this.refusedReason !== undefined) return;
    this.refusedReason = reason;
    this.lastError = reason;
    this.reconnectTimer?.cancel();
    this.reconnectTimer = undefined;
    // A different size means a different disk: no connection to it may be used any more.
    for (const slot of this.slots) void slot.client?.disconnect();
    this.offlineSinceWallMs ??= this.timers.wallClockMs();
    this.notify();
  }

  private async shutdown(): Promise<void> {
    this.reconnectTimer?.cancel();
    this.reconnectTimer = undefined;
    await Promise.all(this.slots.map((slot) => slot.client?.disconnect() ?? Promise.resolve()));
    this.notify();
  }

  private unavailable(): PcacheError {
    if (this.closing !== undefined) return new PcacheError('ENODEV', `${this.location}: the device is closed`);
    if (this.refusedReason !== undefined) return new PcacheError('ENODEV', `${this.location}: ${this.refusedReason}`);
    const since = this.offlineSinceWallMs === undefined ? '' : ` since ${new Date(this.offlineSinceWallMs).toISOString()}`;
    return new PcacheError('ENODEV', `${this.location} is offline${since}: ${this.lastError ?? 'not connected'}`);
  }

  private checkRange(offsetBytes: number, lengthBytes: number): void {
    // The BlockDevice contract: callers never ask for anything outside the device.
    assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0, 'bad offset', offsetBytes);
    assert(Number.isSafeInteger(lengthBytes) && lengthBytes >= 0, 'bad length', lengthBytes);
    if (offsetBytes + lengthBytes > this.sizeBytes) assert(false, 'range ends past the device end', `${offsetBytes}+${lengthBytes} > ${this.sizeBytes}`);
  }

  private checkWritable(what: string): void {
    if (this.readOnly) throw new PcacheError('EPERM', `${this.location}: ${what} on a read-only device`);
  }

  private notify(): void {
    this.onStateChange?.(this.state());
  }
}

function leastLoaded(connected: readonly { client: NbdClient }[]): NbdClient {
  let best: NbdClient | undefined;
  for (const { client } of connected) if (best === undefined || client.load < best.load) best = client;
  assert(best !== undefined, 'at least one connection');
  return best;
}

/** pcache issues 512-byte-aligned I/O; a server demanding larger blocks cannot back it. */
function blockSizeProblem(client: NbdClient): string | undefined {
  if (client.minimumBlockBytes <= sectorSizeBytes) return undefined;
  return `the server's minimum block size is ${client.minimumBlockBytes} bytes; pcache needs ${sectorSizeBytes}-byte blocks`;
}

/** A stable identity that fits the superblock: the location, or its hash when too long. */
function identityOf(location: string): string {
  if (Buffer.byteLength(location, 'utf8') <= identityMaxBytes) return location;
  return `nbd:sha256:${createHash('sha256').update(location).digest('hex')}`;
}

function checkPolicy(policy: ReconnectPolicy): void {
  if (!Number.isSafeInteger(policy.delayMinMs) || policy.delayMinMs <= 0) {
    throw new PcacheError('EINVAL', 'reconnect delayMinMs must be a positive integer');
  }
  if (!Number.isSafeInteger(policy.delayMaxMs) || policy.delayMaxMs < policy.delayMinMs) {
    throw new PcacheError('EINVAL', 'reconnect delayMaxMs must be an integer at least delayMinMs');
  }
  const attempts = policy.attemptsMax;
  if (!(attempts === Number.POSITIVE_INFINITY || (Number.isSafeInteger(attempts) && attempts >= 0))) {
    throw new PcacheError('EINVAL', 'reconnect attemptsMax must be a non-negative integer or Infinity');
  }
}
