// A volume process: one volume of a pool (`pcache serve` without --backing, volume processes
// on), run in a child process of the serve process so that its engine, its writeback, its GC
// and its clients' requests run on an event loop of their own and never hold up another
// volume's (docs/design.md "Volumes: processes").
//
// What it owns: its own descriptor of the cache device (the pool's file; the parent keeps
// another), the VolumeDevice of its share built from the geometry the parent sends, its
// backing device, its cache engine (serve_open.ts serveCache), and an NbdServer that never
// listens: it serves the connections the parent negotiated and handed over (NbdServer.adopt),
// either the socket itself (sent over the IPC channel) or, for TLS, a local connection on
// which the parent relays the cleartext (it listens on a Unix socket in the parent's private
// directory; the parent writes the terms first).
//
// Invariants:
// - It never writes the pool's superblock or volume table: only its share (a format when the
//   parent asks, and the engine). The parent commits the table, before or after as the change
//   needs (volume_processes.ts).
// - Requests come from the parent alone, over the IPC channel, one reply per request id; a
//   failure goes back as the PcacheError's code, message and reason. Anything else thrown is a
//   bug: it crashes this process (the parent reports the volume failed; the others serve on).
// - The parent's death (the channel closes) ends this process at once, so that a restarted
//   serve can open the cache device: what clients were told is durable is in the log already.
// - SIGINT and SIGHUP (a terminal's, sent to the whole process group) are left to the parent,
//   which stops this process in order; SIGTERM sent to it alone stops it cleanly.

import net from 'node:net';
import type { CacheStatus, CacheTuning } from '../cache/cache.js';
import { formatCacheDevice, probeDevice } from '../cache/cache_metadata.js';
import type { BlockDevice } from '../device/block_device.js';
import { FileDevice } from '../device/file_device.js';
import { VolumeDevice, type VolumeGeometry } from '../device/volume_device.js';
import { PcacheError, isPcacheError, type PcacheErrorCode, type PcacheErrorReason } from '../lib/errors.js';
import { looksLikeNbdUri } from '../nbd/client/uri.js';
import { ExportMap, type HandedOffTerms } from '../nbd/server/export_catalog.js';
import { NbdServer, type NbdServerStats } from '../nbd/server/server.js';
import type { CacheMode } from '../ondisk/cache_info.js';
import type { LogLevel } from './args.js';
import { createLogger, type Logger } from './log.js';
import { NbdRequestCounters } from './metrics.js';
import { closeAll, watchState, type Closer } from './serve_lifecycle.js';
import { openBacking, type Served } from './serve_open.js';
import { serveVolumeCache } from './volume_summary.js';
import { SwitchableExport } from './volume_export.js';

/** What a volume process is started with (its first message). */
export interface VolumeProcessSettings {
  readonly name: string;
  /** The backing device's path or NBD URI, as the volume table records it. */
  readonly backing: string;
  readonly cachePath: string;
  readonly tuning: Partial<CacheTuning>;
  readonly backingConnections: number;
  readonly busyPollUs: number;
  readonly logLevel: LogLevel;
  /** The server serves metrics: count the volume's NBD requests (snapshot's `requests`). */
  readonly metrics: boolean;
  /** Where to listen for relayed (TLS) connections; undefined when the server offers no TLS. */
  readonly relayPath: string | undefined;
}

/** The share's format, as its volume table entry says. */
export interface ShareFormat {
  readonly segmentSizeBytes: number;
  readonly gcPercent: number;
  readonly dataCrc: boolean;
}

/** The parent's requests; each gets exactly one reply with its id. */
export type VolumeRequest =
  | { readonly op: 'open-backing'; readonly settings: VolumeProcessSettings }
  | { readonly op: 'format'; readonly geometry: VolumeGeometry; readonly format: ShareFormat }
  /** Opens the cache on the share (formatted again first when a cut-short format left it blank) and serves. */
  | { readonly op: 'open-cache'; readonly geometry: VolumeGeometry; readonly format: ShareFormat; readonly mode: CacheMode | undefined }
  /** For a resize: write everything back, hold clients' requests, close the cache. */
  | { readonly op: 'close-cache' }
  | { readonly op: 'snapshot' }
  | { readonly op: 'drain' }
  | { readonly op: 'set'; readonly changes: Readonly<Record<string, unknown>> }
  | { readonly op: 'invalidate' }
  | { readonly op: 'checkpoint' }
  | { readonly op: 'checkpoint-release'; readonly checkpoint: number }
  | { readonly op: 'checkpoint-abort'; readonly checkpoint: number }
  | { readonly op: 'disconnect' }
  /** The server stops with --drain-on-exit: no more client requests (the drain follows). */
  | { readonly op: 'close-clients' }
  | { readonly op: 'stop' };

export type VolumeRequestMessage = VolumeRequest & { readonly id: number };

/** A connection handed over with its socket (no reply). */
export interface AdoptMessage {
  readonly op: 'adopt';
  readonly terms: HandedOffTerms;
  /** The bytes read past the handshake, base64. */
  readonly leftover: string;
}

export interface VolumeErrorBody {
  readonly code: PcacheErrorCode;
  readonly message: string;
  readonly reason: PcacheErrorReason | undefined;
}

export type VolumeReply =
  | { readonly id: number; readonly ok: true; readonly value: unknown }
  | { readonly id: number; readonly ok: false; readonly error: VolumeErrorBody }
  /** A checkpoint (request `id`) holds the backing device at `point`, until released or aborted. */
  | { readonly id: number; readonly event: 'checkpoint-held'; readonly point: { readonly seq: number; readonly lsn: number } };

/** What `snapshot` answers: everything status, `volume list` and metrics show of a volume. */
export interface VolumeSnapshot {
  readonly cache: CacheStatus | null;
  readonly connections: number;
  readonly nbd: NbdServerStats;
  /** With metrics: the volume's NBD requests, counted since it started (RequestCounts). */
  readonly requests: RequestCounts | null;
}

/**
 * A volume process's NBD request metrics: totals per command (indexed as nbdCommandNames), and
 * the durations of the requests answered since the last snapshot, as far as durationsMax.
 */
export interface RequestCounts {
  readonly requests: number[];
  readonly errors: number[];
  readonly bytes: number[];
  /** Pairs of command index and seconds, flattened; at most durationsMax pairs. */
  readonly durations: number[];
}

/** Durations a snapshot carries at most (the rest of a longer interval are not in the histogram). */
export const durationsMax = 16_384;

/** A relayed connection starts with a 4-byte big-endian length and that many bytes of JSON: the AdoptMessage. */
export const relayHeaderMaxBytes = 64 * 1024;

class VolumeProcess {
  private settings: VolumeProcessSettings | undefined;
  private log: Logger | undefined;
  private pool: FileDevice | undefined;
  private backing: BlockDevice | undefined;
  private readonly backingClosers: Closer[] = [];
  private cacheClosers: Closer[] = [];
  private served: Served | undefined;
  private exported: SwitchableExport | undefined;
  private nbd: NbdServer | undefined;
  private relay: net.Server | undefined;
  private watcher: NodeJS.Timeout | undefined;
  /** Checkpoints holding the backing device, by request id: release() lets go. */
  private readonly held = new Map<number, { release: () => void; abort: AbortController }>();
  private stopping = false;
  private counters: NbdRequestCounters | undefined;
  /** Durations since the last snapshot (command index, seconds), flattened and bounded. */
  private durations: number[] = [];

  handle(message: VolumeRequestMessage): void {
    this.answer(message).then(
      (value) => { this.send({ id: message.id, ok: true, value: value ?? null }); },
      (error: unknown) => {
        if (!isPcacheError(error)) throw error;
        this.send({ id: message.id, ok: false, error: { code: error.code, message: error.message, reason: error.reason } });
      },
    ).catch((error: unknown) => {
      // A bug: crash, outside every promise, so the parent sees this process exit.
      setImmediate(() => { throw error; });
    });
  }

  adopt(message: AdoptMessage, socket: net.Socket | undefined): void {
    if (socket === undefined) return;
    const nbd = this.nbd;
    if (nbd === undefined) {
      socket.destroy();
      return;
    }
    nbd.adopt(socket, message.terms, Buffer.from(message.leftover, 'base64'));
  }

  private send(reply: VolumeReply): void {
    if (process.connected) process.send?.(reply);
  }

  private async answer(request: VolumeRequestMessage): Promise<unknown> {
    switch (request.op) {
      case 'open-backing': return this.openBacking(request.settings);
      case 'format': return this.format(request.geometry, request.format);
      case 'open-cache': return this.openCache(request.geometry, request.format, request.mode);
      case 'close-cache': return this.closeCache();
      case 'snapshot': return this.snapshot();
      case 'drain': return this.servedNow().drain();
      case 'set': return this.servedNow().set(request.changes);
      case 'invalidate': return this.servedNow().invalidate();
      case 'checkpoint': return this.checkpoint(request.id);
      case 'checkpoint-release': this.held.get(request.checkpoint)?.release(); return null;
      case 'checkpoint-abort': this.held.get(request.checkpoint)?.abort.abort(); return null;
      case 'disconnect': return this.nbd?.disconnect(this.settingsNow().name) ?? 0;
      case 'close-clients': return this.nbd?.close() ?? null;
      case 'stop': return this.stop();
    }
  }

  private settingsNow(): VolumeProcessSettings {
    if (this.settings === undefined) throw new PcacheError('EINVAL', 'the volume process has not been told its volume');
    return this.settings;
  }

  private servedNow(): Served {
    if (this.served === undefined) throw new PcacheError('ENODEV', `volume "${this.settingsNow().name}" has no cache open`);
    return this.served;
  }

  private logger(): Logger {
    this.log ??= createLogger(this.settingsNow().logLevel).child({ volume: this.settingsNow().name });
    return this.log;
  }

  /** Opens the pool's file (our own descriptor) and the backing device; answers the backing's identity and size. */
  private async openBacking(settings: VolumeProcessSettings): Promise<{ identity: string | null; sizeBytes: number }> {
    if (this.settings !== undefined) throw new PcacheError('EINVAL', 'the volume process has its volume already');
    this.settings = settings;
    const log = this.logger();
    const pool = await FileDevice.open(settings.cachePath, { blocking: true });
    this.pool = pool;
    this.backingClosers.push(() => pool.close());
    const opened = await openBacking({ backingPath: settings.backing, backingIsUri: looksLikeNbdUri(settings.backing), backingConnections: settings.backingConnections, readOnly: false }, log);
    this.backing = opened.device;
    this.backingClosers.push(() => opened.device.close());
    opened.whenBackOnline(() => { this.served?.retryBacking(); });
    return { identity: opened.device.identity ?? null, sizeBytes: opened.device.sizeBytes };
  }

  private share(geometry: VolumeGeometry): VolumeDevice {
    if (this.pool === undefined) throw new PcacheError('EINVAL', 'the volume process has not opened the cache device');
    return new VolumeDevice(this.pool, geometry);
  }

  private async format(geometry: VolumeGeometry, format: ShareFormat): Promise<null> {
    const backing = this.backing;
    if (backing === undefined) throw new PcacheError('EINVAL', 'the volume process has not opened the backing device');
    if (this.served !== undefined) throw new PcacheError('EINVAL', 'the volume\'s cache is open: it cannot be formatted');
    await formatCacheDevice(this.share(geometry), backing, format);
    return null;
  }

  private async openCache(geometry: VolumeGeometry, format: ShareFormat, mode: CacheMode | undefined): Promise<null> {
    const settings = this.settingsNow();
    const backing = this.backing;
    if (backing === undefined) throw new PcacheError('EINVAL', 'the volume process has not opened the backing device');
    if (this.served !== undefined) throw new PcacheError('EINVAL', 'the volume\'s cache is open already');
    const log = this.logger();
    const share = this.share(geometry);
    if (await probeDevice(share) === 'blank') {
      log.warn({}, 'the volume\'s share is blank (a resize was cut short after everything was written back): formatting it again; nothing is lost, nothing is cached');
      await formatCacheDevice(share, backing, format);
    }
    const closers: Closer[] = [() => share.close()];
    try {
      this.served = await serveVolumeCache({ share, backing, cachePath: settings.cachePath, name: settings.name, backingName: settings.backing, tuning: settings.tuning, mode }, closers, log);
    } catch (error) {
      await closeAll(closers).catch(() => undefined);
      throw error;
    }
    this.cacheClosers = closers;
    const served = this.served;
    if (this.exported === undefined) {
      this.exported = new SwitchableExport(served.export);
      await this.startServing(settings, this.exported);
    } else {
      this.exported.resume(served.export);
    }
    this.watcher ??= watchState(() => this.served?.cacheStatus(), log, `volume ${settings.name}`);
    return null;
  }

  /** The NBD server of adopted connections, and the relay listener when the parent offers TLS. */
  private async startServing(settings: VolumeProcessSettings, exported: SwitchableExport): Promise<void> {
    const catalog = new ExportMap();
    catalog.add({ name: settings.name, description: `pcache volume ${settings.name}: ${settings.backing} cached on ${settings.cachePath}`, export: exported });
    if (settings.metrics) {
      const counters = new NbdRequestCounters();
      counters.setSink((command, seconds) => {
        if (this.durations.length < 2 * durationsMax) this.durations.push(command, seconds);
      });
      this.counters = counters;
    }
    const nbd = new NbdServer({ catalog, busyPollUs: settings.busyPollUs, ...(this.counters === undefined ? {} : { observer: this.counters }) });
    this.nbd = nbd;
    if (settings.relayPath === undefined) return;
    const relay = net.createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: true }, (socket) => { acceptRelayed(socket, nbd); });
    relay.on('error', () => undefined);
    const relayPath = settings.relayPath;
    await new Promise<void>((resolve, reject) => {
      relay.once('error', reject);
      relay.listen(relayPath, () => {
        relay.off('error', reject);
        resolve();
      });
    });
    this.relay = relay;
  }

  /** A resize: everything written back, clients' requests held, the cache closed (the backing stays open). */
  private async closeCache(): Promise<{ mode: CacheMode | null }> {
    const served = this.servedNow();
    const mode = served.cacheStatus()?.mode ?? null;
    await served.drain();
    this.exported?.pause();
    try {
      await served.drain();
      await closeAll(this.cacheClosers.splice(0));
    } catch (error) {
      this.exported?.resume(served.export);
      throw error;
    }
    this.served = undefined;
    return { mode };
  }

  private snapshot(): VolumeSnapshot {
    const nbd = this.nbd;
    const counters = this.counters;
    let requests: RequestCounts | null = null;
    if (counters !== undefined) {
      counters.drainDurations();
      requests = { requests: [...counters.requests], errors: [...counters.errors], bytes: [...counters.bytes], durations: this.durations };
      this.durations = [];
    }
    return {
      cache: this.served?.cacheStatus() ?? null,
      connections: nbd === undefined ? 0 : nbd.connectionCount(this.settingsNow().name),
      nbd: nbd === undefined ? emptyStats : nbd.stats(),
      requests,
    };
  }

  private async checkpoint(id: number): Promise<null> {
    const abort = new AbortController();
    try {
      await this.servedNow().checkpoint(async (point) => {
        this.send({ id, event: 'checkpoint-held', point: { seq: point.seq, lsn: point.lsn } });
        await new Promise<void>((resolve) => {
          this.held.set(id, { release: resolve, abort });
          abort.signal.addEventListener('abort', () => { resolve(); });
        });
      }, abort.signal);
    } finally {
      this.held.delete(id);
    }
    return null;
  }

  /** Clients finish, the cache closes cleanly (its open kset made durable), then the devices. */
  async stop(): Promise<null> {
    if (this.stopping) return null;
    this.stopping = true;
    clearInterval(this.watcher);
    for (const { abort } of this.held.values()) abort.abort();
    const relay = this.relay;
    await closeAll([
      () => closeAll(this.backingClosers.splice(0)),
      () => closeAll(this.cacheClosers.splice(0)),
      () => this.nbd?.close() ?? Promise.resolve(),
      () => new Promise<void>((resolve) => { if (relay === undefined) resolve(); else relay.close(() => { resolve(); }); }),
    ]);
    this.served = undefined;
    // The reply goes out first; then this process ends.
    setImmediate(() => { process.disconnect(); });
    return null;
  }
}

const emptyStats: NbdServerStats = {
  connectionsTotal: 0, requestsTotal: 0, requestErrorsTotal: 0, replyBatchesTotal: 0, readPausesTotal: 0,
  protocolViolationsTotal: 0, tlsSessionsTotal: 0, tlsFailuresTotal: 0, connectionsOpen: 0,
  busyPollHitsTotal: 0, busyPollMissesTotal: 0,
};

/** A relayed connection: its header (the terms, the leftover bytes), then the cleartext stream. */
function acceptRelayed(socket: net.Socket, nbd: NbdServer): void {
  const chunks: Buffer[] = [];
  socket.on('error', () => { socket.destroy(); });
  const onData = (chunk: Buffer): void => {
    chunks.push(chunk);
    const all = Buffer.concat(chunks);
    if (all.length < 4) return;
    const length = all.readUInt32BE(0);
    if (length > relayHeaderMaxBytes) {
      socket.destroy();
      return;
    }
    if (all.length < 4 + length) return;
    socket.off('data', onData);
    socket.pause();
    let message: AdoptMessage;
    try {
      message = JSON.parse(all.subarray(4, 4 + length).toString('utf8')) as AdoptMessage;
    } catch {
      socket.destroy();
      return;
    }
    const leftover = Buffer.concat([Buffer.from(message.leftover, 'base64'), all.subarray(4 + length)]);
    socket.removeAllListeners('error');
    nbd.adopt(socket, message.terms, leftover);
  };
  socket.on('data', onData);
  socket.resume();
}

/** The volume process's main: answers the parent until told to stop, or until the parent is gone. */
export function runVolumeProcess(): void {
  if (process.send === undefined) {
    process.stderr.write('pcache: the volume process is started by `pcache serve`, not by hand\n');
    process.exitCode = 2;
    return;
  }
  const volume = new VolumeProcess();
  process.on('message', (message: VolumeRequestMessage | AdoptMessage, socket: unknown) => {
    if (message.op === 'adopt') volume.adopt(message, socket instanceof net.Socket ? socket : undefined);
    else volume.handle(message);
  });
  // The parent is gone (killed, or done with us): nobody can ask for anything any more.
  process.on('disconnect', () => { process.exit(0); });
  process.on('SIGINT', () => undefined);
  process.on('SIGHUP', () => undefined);
  process.on('SIGTERM', () => {
    void volume.stop().then(() => { process.exit(0); });
  });
}
