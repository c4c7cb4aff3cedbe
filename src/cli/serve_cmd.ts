// `pcache serve`: the wiring that joins the cache engine, the devices and the NBD server.
//
// Start-up, in order: take the listening socket systemd passed (socket activation) and read
// the TLS credentials, before anything is created or opened; create the files asked for;
// refuse a cache device that another process has open; open the backing device (a file or block device with asynchronous I/O, many
// requests in flight through libuv's thread pool, or an NBD export over several connections)
// and the cache device with synchronous I/O (fast storage); open the cache (formatting a blank
// device, refusing anything that is not this backing device's cache, without writing a byte);
// listen for NBD and, if asked, on the control socket and the metrics endpoint; print where it
// listens, write the PID file and tell systemd it is ready (Type=notify; systemd.ts). Every
// step that succeeded is undone, in reverse, if a later one fails.
//
// Stop (SIGINT, SIGTERM or SIGHUP, straight to this process: there is no supervisor): the NBD
// server stops taking requests and finishes the ones in flight; with --drain-on-exit the
// cache is then written back (status still answers; a second stop request or the drain
// timeout stops waiting, and the data stays dirty in the cache, safe); the control socket and
// metrics close; the cache closes (open ksets made durable, running writeback and GC rounds
// finish); the devices close; exit status 0. A stop that cannot finish within stopTimeoutMs
// (a backing device that never answers) gives up with status 1 — acknowledged, flushed
// writes are in the cache log by then or were never promised.
//
// Logs (log.ts) say what happened to the server, never what happened to one request. A failed
// TLS handshake is logged (warn, with the peer and the reason): it is a client refused, and
// how an operator finds a wrong key or an expired certificate.

import fs from 'node:fs';
import path from 'node:path';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { NbdServer, type NbdBoundAddress } from '../nbd/server/server.js';
import { defaultServe, type ServeArgs } from './args.js';
import { ControlServer } from './control.js';
import { describeDevice, sizeFlagIgnored } from './devices.js';
import { refuseIfInUse } from './in_use.js';
import type { Logger } from './log.js';
import { createMetricsRegistry, MetricsServer, NbdRequestCounters } from './metrics.js';
import { writePidFile } from './pid_file.js';
import { noCacheExport, openBacking, openCache, prepareFiles, recorded, type Served } from './serve_open.js';
import { beginServe, checkNetworkExposure, closeAll, stopAll, uriOf, uvThreadPoolSize, watchState, type Closer, type StopRequests } from './serve_lifecycle.js';
import { servePool } from './serve_pool.js';
import { notificationsWanted, notifySystemd } from './systemd.js';
import type { Terminal } from './terminal.js';
import { packageVersion } from './version.js';

export async function serveCommand(args: ServeArgs, terminal: Terminal): Promise<number> {
  if (args.volumes) return servePool(args, terminal);
  // Before anything is created or opened: where to listen, and with what credentials.
  const { stops, log, startedAt, inherited, tls } = beginServe(args);
  const closers: Closer[] = [];
  let served: Served;
  let server: NbdServer;
  let created: string[] = [];
  let listening = false;
  let removePidFile: (() => void) | undefined;
  try {
    for (const note of [sizeFlagIgnored(args.backingPath, args.backingSizeBytes, '--backing-size'), sizeFlagIgnored(args.cachePath, args.cacheSizeBytes, '--cache-size')]) {
      if (note !== undefined && !args.defaultMode) log.warn({}, note);
    }
    created = prepareFiles(args);
    if (!args.noCache) refuseIfInUse(args.cachePath, 'serve');
    const opened = await openBacking(args, log);
    const backing = recorded(args, 'backing', opened.device);
    closers.push(() => backing.close());
    served = args.noCache ? noCacheExport(backing) : await openCache(args, backing, closers, log);
    // Writeback may be in a back-off of up to 30 s: a returning connection ends it at once.
    opened.whenBackOnline(() => { served.retryBacking(); });
    const requestCounters = args.metrics === undefined ? undefined : new NbdRequestCounters();
    const nbd = new NbdServer({
      export: served.export,
      exportName: args.exportName,
      description: args.noCache ? `pcache export of ${args.backingPath} (no cache)` : `pcache: ${args.backingPath} cached on ${args.cachePath}`,
      readOnly: args.readOnly,
      busyPollUs: args.busyPollUs,
      ...(requestCounters === undefined ? {} : { observer: requestCounters }),
      ...(tls === undefined ? {} : { tls: tls.config }),
      onTlsFailure: (failure) => { log.warn({ peer: failure.peer, reason: failure.reason }, 'TLS handshake failed'); },
    });
    server = nbd;
    const address = await server.listen(inherited === undefined ? args.listen : { fd: inherited.fd });
    listening = true;
    closers.push(() => nbd.close());
    if ('port' in address) checkNetworkExposure(args, address.host ?? '127.0.0.1', address.port, inherited !== undefined, log);
    const uri = uriOf(address, args.exportName, tls);
    const threadPoolSize = uvThreadPoolSize(process.env.UV_THREADPOOL_SIZE);
    const backingName = args.backingIsUri ? args.backingPath : path.resolve(args.backingPath);
    const status = (): Record<string, unknown> => ({
      pid: process.pid,
      uvThreadPoolSize: threadPoolSize,
      startedAt: startedAt.toISOString(),
      uptimeMs: Date.now() - startedAt.getTime(),
      uri,
      exportName: args.exportName,
      readOnly: args.readOnly,
      cachePath: args.noCache ? null : path.resolve(args.cachePath),
      backingPath: backingName,
      backingRemote: opened.remote?.state() ?? null,
      ...served.status(),
      nbd: nbd.stats(),
    });
    // A server of one backing device knows one volume: its export.
    const onlyVolume = (volume: string | undefined): void => {
      if (volume !== undefined && volume !== args.exportName) throw new PcacheError('EINVAL', `this server serves one backing device, as export "${args.exportName}": there is no volume "${volume}"`);
    };
    if (args.controlPath !== undefined) {
      const control = new ControlServer({
        status,
        drain: (volume) => {
          onlyVolume(volume);
          return served.drain();
        },
        set: async (changes, volume) => {
          onlyVolume(volume);
          const settings = await served.set(changes);
          if (Object.keys(changes).length > 0) log.info({ changes, settings }, 'settings changed');
          return settings;
        },
        invalidate: async (volume) => {
          onlyVolume(volume);
          const droppedBytes = await served.invalidate();
          log.info({ droppedBytes }, 'clean cached copies dropped');
          return droppedBytes;
        },
        checkpoint: async (held, signal, volume) => {
          onlyVolume(volume);
          const startedMs = performance.now();
          await served.checkpoint(async (point) => {
            const heldMs = performance.now();
            log.info({ seq: point.seq, writebackMs: Math.round(heldMs - startedMs) }, 'checkpoint: backing device held');
            try {
              await held(point);
            } finally {
              log.info({ seq: point.seq, heldMs: Math.round(performance.now() - heldMs) }, 'checkpoint: released');
            }
          }, signal);
        },
        detach: async () => {
          // No client request may land between the drain and the mark: clients go first.
          log.info({ dirtyBytes: served.cacheStatus()?.dirtyBytes ?? 0 }, 'detaching: closing the NBD server, then writing everything back');
          await nbd.close();
          try {
            await served.detach();
            log.info({}, 'detached: the backing device holds everything and may be used without pcache');
          } finally {
            // The stop closes the control socket too: it comes once this answer has been sent
            // (the answer goes out in the promise callbacks, before the next immediate).
            setImmediate(() => { stops.stop('detach'); });
          }
        },
      }, { version: packageVersion() });
      await control.listen(args.controlPath);
      closers.push(() => control.close());
    }
    let metricsUrl: string | undefined;
    if (args.metrics !== undefined && requestCounters !== undefined) {
      const registry = createMetricsRegistry(requestCounters, {
        caches: () => {
          const status = served.cacheStatus();
          return status === undefined ? [] : [{ volume: args.exportName, status }];
        },
        perVolume: false,
        nbdStats: () => nbd.stats(),
      });
      const metrics = await MetricsServer.listen(registry, args.metrics.host, args.metrics.port);
      closers.push(() => metrics.server.close());
      metricsUrl = metrics.url;
    }
    const what = args.noCache
      ? `${describeDevice(args.backingPath, backing.sizeBytes)} without a cache`
      : `${describeDevice(args.backingPath, backing.sizeBytes)} through cache ${describeDevice(args.cachePath, served.cacheSizeBytes)}${served.formatted ? ' (formatted now)' : ''}`;
    // Before the line that says "serving": whoever waits for that line finds the PID file too.
    if (args.pidFile !== undefined) removePidFile = writePidFile(args.pidFile);
    const socketFacts = inherited === undefined ? {} : { socketActivated: true, socketName: inherited.name ?? null };
    log.info({ uri, cache: args.noCache ? null : args.cachePath, backing: backingName, control: args.controlPath ?? null, metrics: metricsUrl ?? null, uvThreadPoolSize: threadPoolSize, ...socketFacts, ...tls?.facts, ...served.startFacts }, 'serving');
    if (args.defaultMode) {
      terminal.out(defaultModeGuide({ created, what, uri, address }));
    } else {
      terminal.out(`serving ${what} at ${uri} (connect with: nbdinfo '${uriOf(address, args.exportName, tls, true)}')`);
    }
    if (metricsUrl !== undefined) terminal.out(`metrics at ${metricsUrl}`);
    const watcher = watchState(() => served.cacheStatus(), log);
    closers.push(() => {
      clearInterval(watcher);
      return Promise.resolve();
    });
    if (notificationsWanted()) {
      const failure = await notifySystemd({ READY: '1', STATUS: `serving ${uri}` });
      if (failure !== undefined) log.error({ reason: failure }, 'cannot tell systemd that the service is ready (Type=notify needs NotifyAccess=all)');
    }
  } catch (error) {
    await closeAll(closers);
    removePidFile?.();
    // Files this start created hold nothing of anyone's until a client could connect: a start
    // that fails before listening removes them, so a mistyped flag leaves no litter behind.
    if (!listening) for (const file of created) fs.rmSync(file, { force: true });
    throw error;
  }
  const request = await stops.nth(0);
  log.info({ reason: request.reason }, 'stopping');
  // Not awaited: the stop must not wait for the service manager.
  if (notificationsWanted()) void notifySystemd({ STOPPING: '1', STATUS: `stopping (${request.reason})` });
  if (args.drainOnExit) await drainBeforeExit(args, server, served, stops, log, terminal);
  const status = await stopAll(closers, request, terminal, log);
  removePidFile?.();
  return status;
}

/**
 * --drain-on-exit: no more client requests, then everything written back. A second stop
 * request or the timeout stops waiting; the dirty data then stays in the cache, safe.
 */
async function drainBeforeExit(args: ServeArgs, server: NbdServer, served: Served, stops: StopRequests, log: Logger, terminal: Terminal): Promise<void> {
  await server.close();
  const dirtyBytes = served.cacheStatus()?.dirtyBytes ?? 0;
  log.info({ dirtyBytes }, 'draining before exit');
  terminal.out(`writing back ${dirtyBytes} dirty bytes before stopping (stop again to skip)`);
  const startedMs = performance.now();
  let timer: NodeJS.Timeout | undefined;
  const outcome = await Promise.race([
    served.drain().then(() => 'drained' as const, (error: unknown) => {
      if (!isPcacheError(error)) throw error;
      return error;
    }),
    stops.nth(1).then(() => 'interrupted' as const),
    new Promise<'timeout'>((resolve) => { timer = setTimeout(() => { resolve('timeout'); }, args.drainTimeoutMs); }),
  ]);
  clearTimeout(timer);
  const seconds = ((performance.now() - startedMs) / 1000).toFixed(1);
  const left = served.cacheStatus()?.dirtyBytes ?? 0;
  if (outcome === 'drained') {
    log.info({ seconds }, 'drained before exit');
    terminal.out(`drained in ${seconds} s`);
    return;
  }
  const why = outcome === 'interrupted' ? 'a second stop request' : outcome === 'timeout' ? `the drain timeout (${args.drainTimeoutMs / 1000} s)` : outcome.message;
  log.warn({ reason: why, dirtyBytes: left }, 'stopping without a complete drain');
  terminal.out(`stopping before the drain finished (${why}); ${left} dirty bytes stay safe in the cache for the next start`);
}

function defaultModeGuide(facts: { created: string[]; what: string; uri: string; address: NbdBoundAddress }): string {
  const socket = 'path' in facts.address ? path.resolve(facts.address.path) : '';
  const uri = `'${facts.uri}'`;
  const lines = [
    ...facts.created.map((file) => `created ${file} (sparse)`),
    `serving ${facts.what} at ${facts.uri}`,
    '',
    'Connect with any NBD client (libnbd-bin, qemu-utils, nbd-client):',
    `  nbdinfo ${uri}`,
    `  nbdcopy disk.img ${uri}        # copy an image in; swap the two to copy it out`,
    `  mkdir -p /tmp/pcache-fuse && nbdfuse /tmp/pcache-fuse ${uri} &`,
    '                                 # /tmp/pcache-fuse/nbd is then the disk as a file',
    `  qemu-img info ${uri}`,
    `  qemu-system-x86_64 -drive file=${facts.uri},format=raw,if=virtio ...`,
    `  sudo modprobe nbd && sudo nbd-client -unix ${socket} /dev/nbd0 -N pcache -b 4096 -C 4`,
    '',
    `Status: pcache status --control ${defaultServe.control}`,
    `Write everything back: pcache drain --control ${defaultServe.control}`,
    `Stop: Ctrl-C or kill -TERM ${process.pid} (data stays in ./pcache-data for the next start).`,
  ];
  return lines.join('\n');
}
