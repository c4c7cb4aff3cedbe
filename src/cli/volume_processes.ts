// VolumeProcesses: the volumes of a pool served each by a process of its own (volume_process.ts),
// the default of `pcache serve` without --backing (`--volume-processes on`). The serve process
// keeps the pool's metadata, the listening sockets and the NBD handshake; a volume's engine and
// its clients' requests run in its volume process, so that one volume's writes, writeback and
// GC never hold up another volume's requests (docs/design.md "Volumes: processes").
//
// It offers serve_pool.ts what VolumeSet (the volumes in this process, `--volume-processes
// off`) offers, with the same checks, refusals, messages and answers; what differs is where
// the work runs:
// - A client that chooses a volume is handed over when its negotiation ends (the export
//   entry's handOff): its socket is sent to the volume process over the IPC channel, or, for a
//   TLS session (which cannot leave this process), relayed in cleartext over a local connection
//   to the volume process's private Unix socket (a copy each way).
// - Control requests about a volume are forwarded over the IPC channel (VolumeChild): at most
//   requestsInFlightMax at once per volume (more wait, in order); the quick ones (status,
//   settings) give up after quickRequestTimeoutMs; drains and checkpoints run as long as they
//   must. A volume process's PcacheError comes back with its code, message and reason.
//   Status, `volume list` and metrics ask every volume process for a snapshot (its cache's
//   status, its clients, its NBD figures and, with metrics, its request counts, which are added
//   to the serve process's counters). --drain-on-exit stops every volume process's clients
//   before the drain (closeClients).
// - add: the volume process opens the backing device (its identity is checked against the
//   other volumes'), formats the share when the pool asks (CachePool.addVolume), then this
//   process commits the table, and the volume process opens its cache and serves. remove: the
//   volume process drains if told, closes and exits; then the table is committed. resize: the
//   volume process writes everything back, holds its clients' requests and closes its cache;
//   the pool resizes the share (the volume process formats it); the volume process opens the
//   new share and lets the held requests go on, on the same connections.
//
// Invariants:
// - A volume process that exits unasked (a crash, SIGKILL) is logged with its status or
//   signal, its export is withdrawn and the volume is reported failed with the reason; every
//   request waiting for it fails (ENODEV). The other volumes are not touched. It is started
//   again after 0.5, 2 and 8 s (its cache recovers as after a crash), at most three times in
//   ten minutes; after that `pcache volume` shows it failed until the server restarts.
// - Only this process writes the pool's superblock and volume table.
// - Adds, removes and resizes run one at a time, in the order asked.

import { fork, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import type { CacheStatus, CacheTuning } from '../cache/cache.js';
import type { CachePool } from '../cache/cache_pool.js';
import type { CheckpointPoint } from '../cache/cache.js';
import { assert } from '../lib/assert.js';
import { SerialSection } from '../lib/background_task.js';
import { PcacheError } from '../lib/errors.js';
import type { ExportMap, HandedOffTerms } from '../nbd/server/export_catalog.js';
import type { Export } from '../nbd/server/export.js';
import type { NbdServerStats } from '../nbd/server/server.js';
import type { CacheMode } from '../ondisk/cache_info.js';
import { volumeUnits, type VolumeEntry } from '../ondisk/volume_table.js';
import type { LogLevel } from './args.js';
import type { Logger } from './log.js';
import type { NbdRequestCounters } from './metrics.js';
import type { KnobValue } from './settings.js';
import { poolSummary, refuseRemoval, removeRequestOf, resizeShareBytesOf, volumeNamed, volumeSummary } from './volume_summary.js';
import { relayHeaderMaxBytes, type AdoptMessage, type ShareFormat, type VolumeProcessSettings, type VolumeReply, type VolumeRequest, type VolumeSnapshot } from './volume_process.js';
import { addRequestOf, stringField, type VolumeClients } from './volume_set.js';

/** Control requests sent to one volume process at once; more wait in order. */
const requestsInFlightMax = 16;
/** Requests waiting for a turn, per volume process (the control socket's own limits keep it far lower). */
const requestsWaitingMax = 1024;
/** How long status and settings requests wait for a volume process's answer. */
const quickRequestTimeoutMs = 5_000;
/** A volume process that ends unasked is started again at most this many times... */
const volumeRestartsMax = 3;
/** ...within this window (older restarts no longer count)... */
const volumeRestartWindowMs = 10 * 60_000;
/** ...the n-th of them (1-based) after volumeRestartDelayMs * 4^(n-1): 0.5 s, 2 s, 8 s. */
const volumeRestartDelayMs = 500;

/** How long a stop waits for a volume process to close its cache and exit before killing it. */
const stopTimeoutMs = 50_000;
/** How long a volume process may take to start and open its devices (an NBD backing device may retry). */
const startTimeoutMs = 120_000;

const childScript = fileURLToPath(new URL('./volume_process_main.js', import.meta.url));

export interface VolumeProcessesOptions {
  readonly cachePath: string;
  readonly tuning: Partial<CacheTuning>;
  readonly backingConnections: number;
  readonly busyPollUs: number;
  readonly logLevel: LogLevel;
  /** The server offers TLS: volume processes listen for relayed connections. */
  readonly relay: boolean;
  /** With metrics: where the volume processes' NBD request counts are added (at each refresh). */
  readonly requestCounters: NbdRequestCounters | undefined;
}

/** What serve_pool.ts asks of one volume (VolumeSet's Served offers the same). */
export interface VolumeControl {
  drain(): Promise<void>;
  set(changes: Readonly<Record<string, unknown>>): Promise<Record<string, KnobValue>>;
  invalidate(): Promise<number>;
  checkpoint(held: (point: CheckpointPoint) => Promise<void>, signal: AbortSignal): Promise<void>;
}

/** One volume process: the IPC channel, the requests in flight, how it ended. */
class VolumeChild {
  readonly pid: number;
  /** Settles when the process has exited, with how. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private readonly process: ChildProcess;
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (value: unknown) => void; reject: (error: Error) => void; onEvent?: (point: CheckpointPoint) => void }>();
  private inFlight = 0;
  private readonly waiting: (() => void)[] = [];
  private gone: string | undefined;
  readonly relayPath: string | undefined;

  constructor(name: string, relayPath: string | undefined) {
    this.relayPath = relayPath;
    // stdout is not the child's (only the serve process prints there); its log lines share stderr.
    // The volume's name in the arguments: `ps` shows which process serves which volume.
    this.process = fork(childScript, ['--volume', name], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'], serialization: 'json' });
    assert(this.process.pid !== undefined, 'fork gave no pid');
    this.pid = this.process.pid;
    this.exited = new Promise((resolve) => {
      this.process.once('exit', (code, signal) => {
        this.gone = signal !== null ? `its volume process (pid ${this.pid}) was killed by ${signal}` : `its volume process (pid ${this.pid}) exited with status ${code ?? 'unknown'}`;
        const error = new PcacheError('ENODEV', `volume "${name}" is not serving: ${this.gone}`);
        for (const request of this.pending.values()) request.reject(error);
        this.pending.clear();
        for (const wake of this.waiting.splice(0)) wake();
        resolve({ code, signal });
      });
    });
    // A failed send (the channel closing) is reported by 'exit' as well.
    this.process.on('error', () => undefined);
    this.process.on('message', (message: VolumeReply) => { this.receive(message); });
  }

  get alive(): boolean {
    return this.gone === undefined;
  }

  /** Sends a request; resolves with its answer, rejects with its PcacheError (ENODEV when the process is gone). */
  async request(request: VolumeRequest, options: { onHeld?: (point: CheckpointPoint) => void; idOut?: (id: number) => void } = {}): Promise<unknown> {
    if (this.inFlight >= requestsInFlightMax) {
      assert(this.waiting.length < requestsWaitingMax, 'too many control requests waiting for one volume process');
      await new Promise<void>((resolve) => { this.waiting.push(resolve); });
    }
    if (this.gone !== undefined) throw new PcacheError('ENODEV', `the volume is not serving: ${this.gone}`);
    this.inFlight += 1;
    const id = this.nextId++;
    options.idOut?.(id);
    const quick = request.op === 'snapshot' || request.op === 'set';
    let timer: NodeJS.Timeout | undefined;
    try {
      return await new Promise<unknown>((resolve, reject) => {
        this.pending.set(id, { resolve, reject, ...(options.onHeld === undefined ? {} : { onEvent: options.onHeld }) });
        this.process.send({ ...request, id });
        if (quick) {
          timer = setTimeout(() => {
            this.pending.delete(id);
            reject(new PcacheError('ETIMEDOUT', `the volume process (pid ${this.pid}) did not answer ${request.op === 'set' ? 'a settings request' : 'a status request'} within ${quickRequestTimeoutMs / 1000} s`));
          }, quickRequestTimeoutMs);
        }
      });
    } finally {
      clearTimeout(timer);
      this.inFlight -= 1;
      this.waiting.shift()?.();
    }
  }

  /** Sends a request that needs no answer (a checkpoint's release or abort). */
  tell(request: VolumeRequest): void {
    if (this.gone === undefined) this.process.send({ ...request, id: 0 });
  }

  /** A connection negotiated here for this volume: its socket goes to the volume process, or its TLS session is relayed. */
  handOff(socket: net.Socket, terms: HandedOffTerms, leftover: Uint8Array): void {
    if (this.gone !== undefined) {
      socket.destroy();
      return;
    }
    if (socket instanceof tls.TLSSocket) {
      this.relay(socket, terms, leftover);
      return;
    }
    const message: AdoptMessage = { op: 'adopt', terms, leftover: Buffer.from(leftover).toString('base64') };
    socket.on('error', () => { socket.destroy(); });
    this.process.send(message, socket, (error) => { if (error !== null) socket.destroy(); });
  }

  /** TLS: the cleartext goes over a local connection to the volume process, behind a header with the terms. */
  private relay(secure: tls.TLSSocket, terms: HandedOffTerms, leftover: Uint8Array): void {
    const relayPath = this.relayPath;
    if (relayPath === undefined) {
      secure.destroy();
      return;
    }
    const header = Buffer.from(JSON.stringify({ op: 'adopt', terms, leftover: Buffer.from(leftover).toString('base64') } satisfies AdoptMessage), 'utf8');
    if (header.length > relayHeaderMaxBytes) {
      secure.destroy();
      return;
    }
    const local = net.connect({ path: relayPath, allowHalfOpen: true });
    local.setNoDelay(true);
    const lengthBytes = Buffer.alloc(4);
    lengthBytes.writeUInt32BE(header.length, 0);
    local.write(Buffer.concat([lengthBytes, header]));
    secure.on('error', () => { secure.destroy(); local.destroy(); });
    local.on('error', () => { local.destroy(); secure.destroy(); });
    // Ends pass through both ways (a client's shutdown, the volume's close); a socket gone takes the other along.
    secure.pipe(local);
    local.pipe(secure);
    secure.on('close', () => { local.destroy(); });
    local.on('close', () => { if (!secure.destroyed) secure.end(); });
  }

  /** Asks the process to close everything and exit; kills it if it does not within stopTimeoutMs. */
  async stop(): Promise<void> {
    if (this.gone === undefined) {
      this.request({ op: 'stop' }).catch(() => undefined);
      const timer = setTimeout(() => { this.kill(); }, stopTimeoutMs);
      await this.exited;
      clearTimeout(timer);
    }
  }

  kill(): void {
    if (this.gone === undefined) this.process.kill('SIGKILL');
  }

  private receive(message: VolumeReply): void {
    const request = this.pending.get(message.id);
    if (request === undefined) return;
    if ('event' in message) {
      request.onEvent?.(message.point);
      return;
    }
    this.pending.delete(message.id);
    if (message.ok) request.resolve(message.value);
    else request.reject(new PcacheError(message.error.code, message.error.message, message.error.reason === undefined ? {} : { reason: message.error.reason }));
  }
}

interface ChildVolume {
  entry: VolumeEntry;
  child: VolumeChild | undefined;
  /** Why the volume is not serving; undefined while it serves. */
  failure: string | undefined;
  readonly identity: string | undefined;
  /** The latest snapshot (metrics read it between scrapes' refreshes). */
  snapshot: VolumeSnapshot | undefined;
  /** Set while the volume is being removed or the server stops: its exit is expected. */
  leaving: boolean;
  /** The request totals of the last snapshot, already added to the server's counters. */
  counted: { requests: number[]; errors: number[]; bytes: number[] } | undefined;
  /** When its volume process was restarted after ending unasked (ms, performance.now), within the window. */
  restartsAtMs: number[];
}

/** An export whose requests are served elsewhere: the handshake reads its size, nothing else. */
function sizeOnly(sizeBytes: number): Export {
  const elsewhere = (): never => { throw new PcacheError('ENOTSUP', 'this export is served by a volume process'); };
  return { sizeBytes, read: elsewhere, write: elsewhere, flush: elsewhere, trim: elsewhere, writeZeroes: elsewhere, cache: elsewhere, blockStatus: elsewhere };
}

export class VolumeProcesses {
  private readonly pool: CachePool;
  private readonly exports: ExportMap;
  private readonly log: Logger;
  private readonly options: VolumeProcessesOptions;
  private readonly volumes = new Map<string, ChildVolume>();
  private uriOf: (name: string) => string | undefined = () => undefined;
  /** Adds, removes and resizes, one at a time in the order asked. */
  private readonly changes = new SerialSection();
  /** Private directory (0700) of the volume processes' relay sockets; undefined without TLS. */
  private readonly relayDirectory: string | undefined;
  private relaysMade = 0;
  private stopping = false;
  /** Restarts waiting for their delay (watch); cleared when the server stops. */
  private readonly restartTimers = new Set<NodeJS.Timeout>();

  constructor(pool: CachePool, exports: ExportMap, log: Logger, options: VolumeProcessesOptions) {
    this.pool = pool;
    this.exports = exports;
    this.log = log;
    this.options = options;
    // mkdtemp creates the directory with mode 0700: only this user reaches the sockets in it.
    this.relayDirectory = options.relay ? fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-relay-')) : undefined;
  }

  /** Volume processes count their own clients; only the URIs come from the server. */
  attach(_clients: VolumeClients, uriOf: (name: string) => string): void {
    this.uriOf = uriOf;
  }

  /** Starts a volume process for every volume of the table, all at once; one that fails is reported, the others serve. */
  async openAll(): Promise<void> {
    const started = this.pool.table.volumes.map((entry) => this.start(entry, undefined));
    for (const entry of this.pool.table.volumes) this.volumes.set(entry.name, { entry, child: undefined, failure: 'starting', identity: undefined, snapshot: undefined, leaving: false, counted: undefined, restartsAtMs: [] });
    for (const volume of await Promise.all(started)) this.volumes.set(volume.entry.name, volume);
  }

  /** Every serving volume's cache status, as the last refresh() found it (metrics). */
  caches(): { volume: string; status: CacheStatus }[] {
    const found: { volume: string; status: CacheStatus }[] = [];
    for (const [name, volume] of this.volumes) {
      const status = volume.failure === undefined ? volume.snapshot?.cache : undefined;
      if (status !== undefined && status !== null) found.push({ volume: name, status });
    }
    return found;
  }

  /** Asks every volume process for its figures now. */
  async refresh(): Promise<void> {
    await Promise.all([...this.volumes.values()].map(async (volume) => {
      const child = volume.child;
      if (child === undefined || volume.failure !== undefined) return;
      try {
        volume.snapshot = await child.request({ op: 'snapshot' }) as VolumeSnapshot;
        this.count(volume, volume.snapshot);
      } catch {
        volume.snapshot = undefined;
      }
    }));
  }

  /** Adds what a volume process counted since its last snapshot to the server's request counters. */
  private count(volume: ChildVolume, snapshot: VolumeSnapshot): void {
    const counters = this.options.requestCounters;
    const now = snapshot.requests;
    if (counters === undefined || now === null) return;
    const before = volume.counted;
    const delta = (totals: number[], seen: number[] | undefined): number[] => totals.map((value, index) => value - (seen?.[index] ?? 0));
    counters.addCounted(delta(now.requests, before?.requests), delta(now.errors, before?.errors), delta(now.bytes, before?.bytes), now.durations);
    volume.counted = { requests: now.requests, errors: now.errors, bytes: now.bytes };
  }

  /** --drain-on-exit: every volume process stops serving its clients (the drain follows). */
  async closeClients(): Promise<void> {
    await Promise.all([...this.volumes.values()].map(async (volume) => {
      if (volume.failure === undefined) await volume.child?.request({ op: 'close-clients' }).catch(() => undefined);
    }));
  }

  /** The volume processes' NBD figures added to the serve process's own (which negotiates). */
  nbdStats(own: NbdServerStats): NbdServerStats {
    const sum: Record<string, number> = { ...own };
    for (const volume of this.volumes.values()) {
      const stats = volume.snapshot?.nbd;
      if (stats === undefined) continue;
      for (const [key, value] of Object.entries(stats as unknown as Record<string, number>)) sum[key] = (sum[key] ?? 0) + value;
    }
    // Handshakes are counted where they ran (here), transmissions where they were served.
    sum.connectionsTotal = own.connectionsTotal;
    return sum as unknown as NbdServerStats;
  }

  /** What `pcache volume list` shows (the same fields as VolumeSet.list). */
  async list(): Promise<Record<string, unknown>[]> {
    await this.refresh();
    return this.listed();
  }

  /** The pool and every volume, for `pcache status`. */
  async status(): Promise<Record<string, unknown>> {
    await this.refresh();
    return {
      pool: poolSummary(this.pool),
      volumes: this.listed().map((summary) => {
        const volume = this.volumes.get(String(summary.name));
        return { ...summary, pid: volume?.child?.alive === true ? volume.child.pid : null, cache: volume?.failure === undefined ? volume?.snapshot?.cache ?? null : null };
      }),
    };
  }

  private listed(): Record<string, unknown>[] {
    return [...this.volumes.values()].map((volume) => volumeSummary({
      entry: volume.entry,
      segmentSizeBytes: this.pool.segmentSizeBytes,
      uri: this.uriOf(volume.entry.name),
      failure: volume.failure,
      status: volume.failure === undefined ? volume.snapshot?.cache ?? undefined : undefined,
      connections: volume.failure === undefined ? volume.snapshot?.connections ?? 0 : 0,
    }));
  }

  /** The volume named `name` (the only one when no name is given); EINVAL naming the volumes there are. */
  served(name: string | undefined): VolumeControl {
    return this.control(volumeNamed(this.volumes, name));
  }

  /** Every serving volume (drain without a name drains them all). */
  allServed(): VolumeControl[] {
    return [...this.volumes.values()].filter((volume) => volume.failure === undefined && volume.child !== undefined).map((volume) => this.control(volume));
  }

  add(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    return this.changes.run(() => this.addNow(fields));
  }

  remove(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    return this.changes.run(() => this.removeNow(fields));
  }

  resize(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    return this.changes.run(() => this.resizeNow(fields));
  }

  /** The server is stopping: every volume process finishes its clients, closes its cache and exits. */
  async closeAll(): Promise<void> {
    this.stopping = true;
    for (const timer of this.restartTimers) clearTimeout(timer);
    this.restartTimers.clear();
    const volumes = [...this.volumes.values()];
    for (const volume of volumes) {
      volume.leaving = true;
      this.exports.remove(volume.entry.name);
    }
    await Promise.all(volumes.map((volume) => volume.child?.stop() ?? Promise.resolve()));
    this.volumes.clear();
    if (this.relayDirectory !== undefined) fs.rmSync(this.relayDirectory, { recursive: true, force: true });
  }

  private control(volume: ChildVolume): VolumeControl {
    const child = volume.child;
    if (volume.failure !== undefined || child === undefined) throw new PcacheError('ENODEV', `volume "${volume.entry.name}" is not serving: ${volume.failure ?? 'it failed to open'}`);
    return {
      drain: async () => { await child.request({ op: 'drain' }); },
      set: async (changes) => await child.request({ op: 'set', changes }) as Record<string, KnobValue>,
      invalidate: async () => await child.request({ op: 'invalidate' }) as number,
      checkpoint: async (held, signal) => {
        let id = 0;
        let holding: Promise<void> | undefined;
        const onAbort = (): void => { child.tell({ op: 'checkpoint-abort', checkpoint: id }); };
        signal.addEventListener('abort', onAbort);
        try {
          await child.request({ op: 'checkpoint' }, {
            idOut: (assigned) => { id = assigned; },
            onHeld: (point) => {
              holding = held(point).finally(() => { child.tell({ op: 'checkpoint-release', checkpoint: id }); });
              holding.catch(() => undefined);
            },
          });
          await holding;
        } finally {
          signal.removeEventListener('abort', onAbort);
        }
      },
    };
  }


  private settingsFor(entry: VolumeEntry): VolumeProcessSettings {
    return {
      name: entry.name,
      backing: entry.backing,
      cachePath: this.options.cachePath,
      tuning: this.options.tuning,
      backingConnections: this.options.backingConnections,
      busyPollUs: this.options.busyPollUs,
      logLevel: this.options.logLevel,
      metrics: this.options.requestCounters !== undefined,
      relayPath: this.relayDirectory === undefined ? undefined : path.join(this.relayDirectory, `${++this.relaysMade}.sock`),
    };
  }

  private formatOf(entry: VolumeEntry): ShareFormat {
    return { segmentSizeBytes: this.pool.segmentSizeBytes, gcPercent: entry.gcPercent, dataCrc: entry.dataCrc };
  }

  /** Starts a volume process and has it open the backing device; answers it and the device's identity and size. */
  private async spawn(entry: VolumeEntry): Promise<{ child: VolumeChild; identity: string | undefined; sizeBytes: number }> {
    const settings = this.settingsFor(entry);
    const child = new VolumeChild(entry.name, settings.relayPath);
    try {
      const opened = await withTimeout(child.request({ op: 'open-backing', settings }), startTimeoutMs, `volume "${entry.name}": its volume process did not open its backing device within ${startTimeoutMs / 1000} s`) as { identity: string | null; sizeBytes: number };
      return { child, identity: opened.identity ?? undefined, sizeBytes: opened.sizeBytes };
    } catch (error) {
      child.kill();
      await child.exited;
      throw error;
    }
  }

  /**
   * Starts a volume: its process (unless `spawned` by add), its cache, its export. A failure
   * that is a PcacheError becomes a failed volume: logged, not exported, the others serve on.
   */
  private async start(entry: VolumeEntry, spawned: { child: VolumeChild; identity: string | undefined; sizeBytes: number } | undefined): Promise<ChildVolume> {
    let child = spawned?.child;
    try {
      const opened = spawned ?? await this.spawn(entry);
      child = opened.child;
      await child.request({ op: 'open-cache', geometry: this.pool.volumeGeometry(entry), format: this.formatOf(entry), mode: undefined });
      const volume: ChildVolume = { entry, child, failure: undefined, identity: opened.identity, snapshot: undefined, leaving: false, counted: undefined, restartsAtMs: [] };
      this.watch(volume, child);
      this.exports.add({ name: entry.name, description: `pcache volume ${entry.name}: ${entry.backing} cached on ${this.options.cachePath}`, export: sizeOnly(opened.sizeBytes), handOff: (socket, terms, leftover) => { child?.handOff(socket, terms, leftover); } });
      this.log.info({ volume: entry.name, volumePid: child.pid }, 'volume process serving');
      return volume;
    } catch (error) {
      if (!(error instanceof PcacheError)) throw error;
      if (child !== undefined) {
        child.kill();
        await child.exited;
      }
      this.log.error({ volume: entry.name, backing: entry.backing, reason: error.message }, 'volume not served: it cannot be opened (the other volumes serve on)');
      return { entry, child: undefined, failure: error.message, identity: spawned?.identity, snapshot: undefined, leaving: false, counted: undefined, restartsAtMs: [] };
    }
  }

  /**
   * A volume process that exits unasked: logged, the volume failed, its export withdrawn (its
   * clients lost their connections with it), and the volume started again after a delay —
   * its cache recovers as after any crash — unless it has been restarted volumeRestartsMax
   * times within volumeRestartWindowMs already: then it stays failed until the server restarts
   * (a volume that keeps crashing should not take the machine's CPU in a loop).
   */
  private watch(volume: ChildVolume, child: VolumeChild): void {
    void child.exited.then(({ code, signal }) => {
      if (volume.child !== child || volume.leaving || this.stopping) return;
      const why = signal !== null ? `its volume process (pid ${child.pid}) was killed by ${signal}` : `its volume process (pid ${child.pid}) exited with status ${code ?? 'unknown'}`;
      const nowMs = performance.now();
      const recent = volume.restartsAtMs.filter((atMs) => nowMs - atMs < volumeRestartWindowMs);
      volume.snapshot = undefined;
      this.exports.remove(volume.entry.name);
      if (recent.length >= volumeRestartsMax) {
        volume.failure = `${why}; restarted ${recent.length} times within ${volumeRestartWindowMs / 60_000} minutes, it is not started again: restart the server to serve it again`;
        this.log.error({ volume: volume.entry.name, volumePid: child.pid, code, signal, restarts: recent.length }, 'volume process ended again: its volume is not served until the server restarts (the other volumes serve on)');
        return;
      }
      const delayMs = volumeRestartDelayMs * 4 ** recent.length;
      volume.failure = `${why}; starting it again in ${delayMs / 1000} s`;
      this.log.error({ volume: volume.entry.name, volumePid: child.pid, code, signal, restartInMs: delayMs }, 'volume process ended: its volume is started again after a delay (the other volumes serve on)');
      const timer = setTimeout(() => {
        this.restartTimers.delete(timer);
        void this.changes.run(() => this.restart(volume, [...recent, performance.now()])).catch((error: unknown) => {
          this.log.error({ volume: volume.entry.name, reason: error instanceof Error ? error.message : String(error) }, 'volume not started again');
        });
      }, delayMs);
      this.restartTimers.add(timer);
    });
  }

  /** Starts a volume whose process ended unasked again, unless it was removed or the server stops meanwhile. */
  private async restart(volume: ChildVolume, restartsAtMs: number[]): Promise<void> {
    if (this.stopping || this.volumes.get(volume.entry.name) !== volume) return;
    const started = await this.start(volume.entry, undefined);
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition -- closeAll may have set it during the await
    if (this.stopping) {
      // The server began to stop while the volume process started: closeAll did not see it.
      started.leaving = true;
      this.exports.remove(volume.entry.name);
      await started.child?.stop();
      return;
    }
    started.restartsAtMs = restartsAtMs;
    this.volumes.set(volume.entry.name, started);
    if (started.failure === undefined) this.log.info({ volume: volume.entry.name, volumePid: started.child?.pid, restarts: restartsAtMs.length }, 'volume process started again: its volume serves');
  }

  private async addNow(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    const { name, backing, shareBytes, gcPercent, dataCrc } = addRequestOf(fields);
    // Everything the table can tell, before the backing device is opened.
    const planned = this.pool.planVolume({ name, backing, shareBytes, ...(gcPercent === undefined ? {} : { gcPercent }) });
    const spawned = await this.spawn(planned);
    let committed = false;
    try {
      const identity = spawned.identity;
      const twin = identity === undefined ? undefined : [...this.volumes.values()].find((volume) => volume.identity === identity);
      if (twin !== undefined) throw new PcacheError('EINVAL', `backing device ${backing} is the one volume "${twin.entry.name}" uses (${twin.entry.backing})`);
      const entry = await this.pool.addVolume({ name, backing, shareBytes, ...(gcPercent === undefined ? {} : { gcPercent }), ...(dataCrc === undefined ? {} : { dataCrc }) }, async (_share, formatted) => {
        await spawned.child.request({ op: 'format', geometry: this.pool.volumeGeometry(formatted), format: this.formatOf(formatted) });
      });
      committed = true;
      const volume = await this.start(entry, spawned);
      this.volumes.set(name, volume);
      this.log.info({ volume: name, backing, shareBytes: volumeUnits(entry) * this.pool.segmentSizeBytes, failure: volume.failure ?? null }, 'volume added');
      return (await this.list()).find((summary) => summary.name === name) ?? {};
    } catch (error) {
      if (!committed) {
        spawned.child.kill();
        await spawned.child.exited;
      }
      throw error;
    }
  }

  private async removeNow(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    const request = removeRequestOf(fields, stringField(fields, 'name'));
    const { name, drain, disconnect } = request;
    const volume = volumeNamed(this.volumes, name);
    const child = volume.child;
    const failure = volume.failure ?? (child === undefined ? 'it failed to open' : undefined);
    const snapshot = failure === undefined && child !== undefined ? await child.request({ op: 'snapshot' }) as VolumeSnapshot : undefined;
    refuseRemoval(request, { failure, connections: snapshot?.connections ?? 0, dirtyBytes: snapshot?.cache?.dirtyBytes ?? 0, backing: volume.entry.backing });
    assert(child !== undefined, 'a removable volume has its process');
    // No new client from here on; the connected ones go before the drain.
    const exported = this.exports.remove(name);
    try {
      if (disconnect) await child.request({ op: 'disconnect' });
      if (drain) await child.request({ op: 'drain' });
    } catch (error) {
      if (exported !== undefined && child.alive) this.exports.add(exported);
      throw error;
    }
    volume.leaving = true;
    this.volumes.delete(name);
    await child.stop();
    await this.pool.removeVolume(name);
    const freedBytes = volumeUnits(volume.entry) * this.pool.segmentSizeBytes;
    this.log.info({ volume: name, freedBytes, drained: drain, disconnected: disconnect }, 'volume removed');
    return { removed: name, freedBytes };
  }

  /** As VolumeSet.resizeNow, with the cache's part done by the volume process (see the file comment). */
  private async resizeNow(fields: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>> {
    const name = stringField(fields, 'name');
    const shareBytes = resizeShareBytesOf(fields);
    const volume = volumeNamed(this.volumes, name);
    this.control(volume); // ENODEV when it is not serving
    const child = volume.child;
    assert(child !== undefined, 'a serving volume without its process');
    const before = volumeUnits(volume.entry);
    if (volumeUnits(this.pool.planResize(name, shareBytes)) === before) return (await this.list()).find((summary) => summary.name === name) ?? {};
    const startedMs = performance.now();
    const { mode } = await child.request({ op: 'close-cache' }) as { mode: CacheMode | null };
    const pausedMs = performance.now();
    let failure: Error | undefined;
    try {
      volume.entry = await this.pool.resizeVolume(name, shareBytes, async (_share, resized) => {
        await child.request({ op: 'format', geometry: this.pool.volumeGeometry(resized), format: this.formatOf(resized) });
      });
    } catch (error) {
      failure = error instanceof Error ? error : new Error(String(error));
      volume.entry = this.pool.volume(name) ?? volume.entry;
    }
    // The volume process formats a share left blank by a format cut short before it opens it.
    try {
      await child.request({ op: 'open-cache', geometry: this.pool.volumeGeometry(volume.entry), format: this.formatOf(volume.entry), mode: mode ?? undefined });
    } catch (error) {
      if (!(error instanceof PcacheError)) throw error;
      // No cache to serve the held requests: the volume fails (its clients are cut off), the others serve on.
      volume.failure = `its cache cannot be opened after the resize: ${error.message}`;
      volume.leaving = true;
      this.exports.remove(name);
      this.log.error({ volume: name, reason: error.message }, 'volume not served: its cache cannot be opened after the resize (the other volumes serve on)');
      child.kill();
      await child.exited;
      throw failure ?? error;
    }
    if (failure !== undefined) throw failure;
    const units = volumeUnits(volume.entry);
    this.log.info({ volume: name, fromBytes: before * this.pool.segmentSizeBytes, toBytes: units * this.pool.segmentSizeBytes, pausedMs: Math.round(performance.now() - pausedMs), totalMs: Math.round(performance.now() - startedMs) }, 'volume resized');
    return (await this.list()).find((summary) => summary.name === name) ?? {};
  }
}

async function withTimeout<T>(promise: Promise<T>, timeoutMs: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([promise, new Promise<never>((_resolve, reject) => { timer = setTimeout(() => { reject(new PcacheError('ETIMEDOUT', message)); }, timeoutMs); })]);
  } finally {
    clearTimeout(timer);
  }
}
