// `pcache serve` without --backing: the volumes of one cache device (cache/cache_pool.ts),
// each exported under its own name, added and removed at run time through the control socket
// (`pcache volume`).
//
// Start-up: take the systemd socket and TLS credentials; create the cache file if asked
// (--cache-size); refuse a device another process has open; open the cache device — a blank
// one is formatted as a pool with no volumes, a pool is opened, a single-volume cache (served
// with --backing) or anything else is refused without writing a byte; open every volume (one
// that fails is reported, the others serve); listen for NBD, on the control socket and for
// metrics. Stop: as serve_cmd.ts, for every volume.
//
// Where the volumes run: each in a process of its own (volume_processes.ts; the default), or
// all in this one (volume_set.ts, `--volume-processes off`). Both offer the same PoolVolumes;
// the control socket, the metrics and the stop do not care which.

import fs from 'node:fs';
import { probeDevice } from '../cache/cache_metadata.js';
import { CachePool, holdsPool } from '../cache/cache_pool.js';
import { FileDevice } from '../device/file_device.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { formatSize } from '../lib/units.js';
import { ExportMap } from '../nbd/server/export_catalog.js';
import { NbdServer } from '../nbd/server/server.js';
import type { ServeArgs } from './args.js';
import { ControlServer } from './control.js';
import { ensureDeviceFile, sizeFlagIgnored } from './devices.js';
import { refuseIfInUse } from './in_use.js';
import type { Logger } from './log.js';
import { createMetricsRegistry, MetricsServer, NbdRequestCounters } from './metrics.js';
import { writePidFile } from './pid_file.js';
import { beginServe, checkNetworkExposure, closeAll, stopAll, uriOf, uvThreadPoolSize, type Closer, type StopRequests } from './serve_lifecycle.js';
import { tuningOf } from './serve_open.js';
import { notificationsWanted, notifySystemd } from './systemd.js';
import type { Terminal } from './terminal.js';
import { packageVersion } from './version.js';
import { VolumeProcesses, type VolumeControl } from './volume_processes.js';
import { VolumeSet, type VolumeClients } from './volume_set.js';
import type { CacheStatus } from '../cache/cache.js';
import type { NbdServerStats } from '../nbd/server/server.js';

/** What the pool's volumes offer serve, wherever they run (VolumeSet, VolumeProcesses). */
interface PoolVolumes {
  openAll(): Promise<void>;
  attach(clients: VolumeClients, uriOf: (name: string) => string): void;
  list(): Record<string, unknown>[] | Promise<Record<string, unknown>[]>;
  status(): Record<string, unknown> | Promise<Record<string, unknown>>;
  caches(): { volume: string; status: CacheStatus }[];
  served(name: string | undefined): VolumeControl;
  allServed(): VolumeControl[];
  add(request: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>>;
  remove(request: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>>;
  resize(request: Readonly<Record<string, unknown>>): Promise<Record<string, unknown>>;
  closeAll(): Promise<void>;
  /** Volume processes serve their own clients: --drain-on-exit stops them before the drain (VolumeSet's are the server's). */
  closeClients?(): Promise<void>;
}

export async function servePool(args: ServeArgs, terminal: Terminal): Promise<number> {
  const { stops, log, startedAt, inherited, tls } = beginServe(args);
  const closers: Closer[] = [];
  let created = false;
  let listening = false;
  let removePidFile: (() => void) | undefined;
  let volumes: PoolVolumes;
  let nbd: NbdServer;
  try {
    const note = sizeFlagIgnored(args.cachePath, args.cacheSizeBytes, '--cache-size');
    if (note !== undefined) log.warn({}, note);
    created = ensureDeviceFile(args.cachePath, args.cacheSizeBytes, '--cache-size');
    refuseIfInUse(args.cachePath, 'serve');
    const device = await FileDevice.open(args.cachePath, { blocking: true });
    closers.push(() => device.close());
    const pool = await openPool(device, args, log);
    const exports = new ExportMap();
    const requestCounters = args.metrics === undefined ? undefined : new NbdRequestCounters();
    const processes = !args.volumeProcesses ? undefined : new VolumeProcesses(pool, exports, log, {
      cachePath: args.cachePath, tuning: tuningOf(args), backingConnections: args.backingConnections, busyPollUs: args.busyPollUs, logLevel: args.logLevel, relay: tls !== undefined, requestCounters,
    });
    volumes = processes ?? new VolumeSet(pool, exports, log, { cachePath: args.cachePath, tuning: tuningOf(args), backingConnections: args.backingConnections });
    const set = volumes;
    closers.push(() => set.closeAll());
    await volumes.openAll();
    nbd = new NbdServer({
      catalog: exports,
      busyPollUs: args.busyPollUs,
      ...(requestCounters === undefined ? {} : { observer: requestCounters }),
      ...(tls === undefined ? {} : { tls: tls.config }),
      onTlsFailure: (failure) => { log.warn({ peer: failure.peer, reason: failure.reason }, 'TLS handshake failed'); },
    });
    const server = nbd;
    const address = await nbd.listen(inherited === undefined ? args.listen : { fd: inherited.fd });
    listening = true;
    closers.push(() => server.close());
    if ('port' in address) checkNetworkExposure(args, address.host ?? '127.0.0.1', address.port, inherited !== undefined, log);
    volumes.attach({ connectionCount: (name) => server.connectionCount(name), disconnect: async (name) => { await server.disconnect(name); } }, (name) => uriOf(address, name, tls));
    const threadPoolSize = uvThreadPoolSize(process.env.UV_THREADPOOL_SIZE);
    const listUri = uriOf(address, '', tls);
    const nbdStats = (): NbdServerStats => processes?.nbdStats(server.stats()) ?? server.stats();
    const status = async (): Promise<Record<string, unknown>> => {
      const volumesStatus = await set.status();
      return {
        pid: process.pid,
        uvThreadPoolSize: threadPoolSize,
        startedAt: startedAt.toISOString(),
        uptimeMs: Date.now() - startedAt.getTime(),
        uri: listUri,
        cachePath: args.cachePath,
        volumeProcesses: processes !== undefined,
        ...volumesStatus,
        nbd: nbdStats(),
      };
    };
    const control = new ControlServer({
      status,
      drain: async (volume) => {
        const targets = volume === undefined ? set.allServed() : [set.served(volume)];
        await Promise.all(targets.map((served) => served.drain()));
      },
      set: async (changes, volume) => {
        const settings = await set.served(volume).set(changes);
        if (Object.keys(changes).length > 0) log.info({ volume: volume ?? null, changes, settings }, 'settings changed');
        return settings;
      },
      invalidate: async (volume) => {
        const droppedBytes = await set.served(volume).invalidate();
        log.info({ volume: volume ?? null, droppedBytes }, 'clean cached copies dropped');
        return droppedBytes;
      },
      checkpoint: (held, signal, volume) => set.served(volume).checkpoint(held, signal),
      detach: () => Promise.reject(new PcacheError('ENOTSUP', 'detach is for a server of one backing device; a volume lets go of its backing device with `pcache volume remove NAME --drain`')),
      volumes: {
        list: () => set.list(),
        add: (request) => set.add(request),
        remove: (request) => set.remove(request),
        resize: (request) => set.resize(request),
      },
    }, { version: packageVersion() });
    // serveArgs requires --control without --backing.
    await control.listen(args.controlPath ?? '');
    closers.push(() => control.close());
    let metricsUrl: string | undefined;
    if (args.metrics !== undefined && requestCounters !== undefined) {
      const registry = createMetricsRegistry(requestCounters, { caches: () => set.caches(), perVolume: true, nbdStats });
      const metrics = await MetricsServer.listen(registry, args.metrics.host, args.metrics.port, processes === undefined ? undefined : () => processes.refresh());
      closers.push(() => metrics.server.close());
      metricsUrl = metrics.url;
    }
    if (args.pidFile !== undefined) removePidFile = writePidFile(args.pidFile);
    const names = pool.table.volumes.map((entry) => entry.name);
    log.info({ uri: listUri, cache: args.cachePath, volumes: names, freeBytes: pool.freeUnitCount() * pool.segmentSizeBytes, control: args.controlPath ?? null, metrics: metricsUrl ?? null, ...tls?.facts }, 'serving');
    terminal.out(`serving ${names.length} volume${names.length === 1 ? '' : 's'} of ${args.cachePath} (${formatSize(device.sizeBytes)}, ${formatSize(pool.freeUnitCount() * pool.segmentSizeBytes)} free) at ${listUri}` +
      `${names.length === 0 ? '' : `: ${names.join(', ')}`} (list them with: nbdinfo --list '${uriOf(address, '', tls, true)}'; add one with: pcache volume add --control ${args.controlPath ?? ''} --name NAME --backing PATH --cache-size SIZE)`);
    if (metricsUrl !== undefined) terminal.out(`metrics at ${metricsUrl}`);
    if (notificationsWanted()) {
      const failure = await notifySystemd({ READY: '1', STATUS: `serving ${names.length} volumes at ${listUri}` });
      if (failure !== undefined) log.error({ reason: failure }, 'cannot tell systemd that the service is ready (Type=notify needs NotifyAccess=all)');
    }
  } catch (error) {
    await closeAll(closers);
    removePidFile?.();
    if (!listening && created) fs.rmSync(args.cachePath, { force: true });
    throw error;
  }
  const request = await stops.nth(0);
  log.info({ reason: request.reason }, 'stopping');
  if (notificationsWanted()) void notifySystemd({ STOPPING: '1', STATUS: `stopping (${request.reason})` });
  if (args.drainOnExit) await drainVolumesBeforeExit(args, nbd, volumes, stops, log, terminal);
  const status = await stopAll(closers, request, terminal, log);
  removePidFile?.();
  return status;
}

/** The pool on the cache device: formatted when blank; a single-volume cache or foreign data is refused untouched. */
async function openPool(device: FileDevice, args: ServeArgs, log: Logger): Promise<CachePool> {
  if (await holdsPool(device)) return CachePool.open(device);
  const contents = await probeDevice(device);
  if (contents === 'blank') {
    const pool = await CachePool.format(device, args.segmentSizeBytes === undefined ? {} : { segmentSizeBytes: args.segmentSizeBytes });
    log.info({ cache: args.cachePath, segments: pool.sb.unitCount, segmentSizeBytes: pool.segmentSizeBytes }, 'formatted the cache device for volumes (none yet)');
    return pool;
  }
  if (contents === 'pcache') {
    throw new PcacheError('FOREIGN', `${args.cachePath} holds a cache of one backing device (formatted by serve --backing or an earlier pcache), not volumes: serve it with --backing PATH as before. ` +
      'To serve volumes, give serve a new cache file (or drain this one and clear it): nothing was written', { reason: 'single-volume' });
  }
  throw new PcacheError('FOREIGN', `${args.cachePath} holds data that is not a pcache cache; refusing to touch it`, { reason: 'not-pcache' });
}

/** --drain-on-exit with volumes: clients first, then every volume written back (a second stop or the timeout stops waiting). */
async function drainVolumesBeforeExit(args: ServeArgs, server: NbdServer, volumes: PoolVolumes, stops: StopRequests, log: Logger, terminal: Terminal): Promise<void> {
  await server.close();
  await volumes.closeClients?.();
  terminal.out('writing back every volume before stopping (stop again to skip)');
  let timer: NodeJS.Timeout | undefined;
  const outcome = await Promise.race([
    Promise.all(volumes.allServed().map((served) => served.drain())).then(() => 'drained' as const, (error: unknown) => {
      if (!isPcacheError(error)) throw error;
      return error;
    }),
    stops.nth(1).then(() => 'interrupted' as const),
    new Promise<'timeout'>((resolve) => { timer = setTimeout(() => { resolve('timeout'); }, args.drainTimeoutMs); }),
  ]);
  clearTimeout(timer);
  if (outcome === 'drained') {
    log.info({}, 'drained before exit');
    return;
  }
  const why = outcome === 'interrupted' ? 'a second stop request' : outcome === 'timeout' ? `the drain timeout (${args.drainTimeoutMs / 1000} s)` : outcome.message;
  log.warn({ reason: why }, 'stopping without a complete drain');
  terminal.out(`stopping before the drain finished (${why}); dirty data stays safe in the cache for the next start`);
}
