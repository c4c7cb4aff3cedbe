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
import { defaultServe, exitFailure, exitOk, insecureBindProblem, isLoopback, UsageError, type ServeArgs } from './args.js';
import { ControlServer } from './control.js';
import { describeDevice, sizeFlagIgnored } from './devices.js';
import { refuseIfInUse } from './in_use.js';
import { createLogger, type Logger } from './log.js';
import { createMetricsRegistry, MetricsServer, NbdRequestCounters } from './metrics.js';
import { writePidFile } from './pid_file.js';
import { noCacheExport, openBacking, openCache, prepareFiles, recorded, type Closer, type Served } from './serve_open.js';
import { loadServeTls, type ServeTls } from './serve_tls.js';
import { notificationsWanted, notifySystemd, takeInheritedSocket } from './systemd.js';
import type { Terminal } from './terminal.js';
import { packageVersion } from './version.js';

/** How long a stop may take before pcache gives up on it. */
const stopTimeoutMs = 60_000;
/**
 * Stop requests this close together count as one: one event can bring several signals (Ctrl-C
 * pressed twice, a closing terminal's SIGHUP after a SIGINT), and only a later, deliberate one
 * should cut a --drain-on-exit drain short.
 */
const stopRepeatWindowMs = 1000;
/** How often the cache's state is looked at, to log its changes. */
const stateWatchIntervalMs = 1000;

/** A stop request: the signal that asked. */
export interface StopRequest {
  readonly reason: string;
}

/**
 * Stop requests: SIGINT, SIGTERM or SIGHUP; installed before anything opens. The first one
 * starts the stop; a later one cuts a --drain-on-exit drain short.
 */
class StopRequests {
  private readonly received: (StopRequest & { readonly atMs: number })[] = [];
  private waiters: ((request: StopRequest) => void)[] = [];

  constructor() {
    const stop = (reason: string): void => {
      const nowMs = performance.now();
      const last = this.received[this.received.length - 1];
      if (last !== undefined && nowMs - last.atMs < stopRepeatWindowMs) return;
      const request = { reason, atMs: nowMs };
      this.received.push(request);
      for (const waiter of this.waiters.splice(0)) waiter(request);
    };
    this.stop = stop;
    process.on('SIGINT', () => { stop('SIGINT'); });
    process.on('SIGTERM', () => { stop('SIGTERM'); });
    process.on('SIGHUP', () => { stop('SIGHUP'); }); // the terminal went away
  }

  /** Asks for a stop from inside (`pcache detach`), as a signal would. */
  readonly stop: (reason: string) => void;

  /** Resolves with the request number `index` (0 = the first), at once if it already came. */
  nth(index: number): Promise<StopRequest> {
    const request = this.received[index];
    if (request !== undefined) return Promise.resolve(request);
    return new Promise((resolve) => {
      const wait = (): void => {
        const got = this.received[index];
        if (got !== undefined) resolve(got);
        else this.waiters.push(wait);
      };
      this.waiters.push(wait);
    });
  }
}

export async function serveCommand(args: ServeArgs, terminal: Terminal): Promise<number> {
  const stops = new StopRequests();
  const log = createLogger(args.logLevel);
  const closers: Closer[] = [];
  const startedAt = new Date();
  // Before anything is created or opened: where to listen, and with what credentials.
  const inherited = takeInheritedSocket();
  if (inherited !== undefined && args.listenGiven) {
    throw new UsageError('serve: --socket and --port cannot be used under systemd socket activation (LISTEN_FDS is set): the listening socket comes from the .socket unit');
  }
  const tls = args.tls === undefined ? undefined : loadServeTls(args.tls);
  if (tls?.certNotAfter !== undefined && tls.certNotAfter.getTime() < Date.now()) {
    log.warn({ notAfter: tls.certNotAfter.toISOString() }, 'the TLS server certificate has expired: clients that verify it will refuse to connect');
  }
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
    if (args.controlPath !== undefined) {
      const control = new ControlServer({
        status,
        drain: () => served.drain(),
        set: async (changes) => {
          const settings = await served.set(changes);
          if (Object.keys(changes).length > 0) log.info({ changes, settings }, 'settings changed');
          return settings;
        },
        invalidate: async () => {
          const droppedBytes = await served.invalidate();
          log.info({ droppedBytes }, 'clean cached copies dropped');
          return droppedBytes;
        },
        checkpoint: async (held, signal) => {
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
      const registry = createMetricsRegistry(requestCounters, { cacheStatus: () => served.cacheStatus(), nbdStats: () => nbd.stats() });
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
    const watcher = watchState(served, log);
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
 * An NBD export on a network address: refused without --tls require or --allow-insecure when
 * systemd handed us the socket (the command line was checked already, args_serve.ts); with
 * --allow-insecure it is served, and the log says so.
 */
function checkNetworkExposure(args: ServeArgs, host: string, port: number, inherited: boolean, log: Logger): void {
  if (inherited) {
    const problem = insecureBindProblem(host, port, args.tls?.mode, args.allowInsecure);
    if (problem !== undefined) throw new PcacheError('EINVAL', `the socket systemd passed: ${problem}`);
  }
  if (!isLoopback(host) && args.tls?.mode !== 'require') {
    log.warn({ address: `${host}:${port}`, tls: args.tls?.mode ?? 'off' }, 'serving NBD on a network address without required TLS (--allow-insecure): anyone who reaches it can read and write the disk');
  }
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

/** Logs every change of the cache's state (running, draining, degraded, backing offline...). */
function watchState(served: Served, log: Logger): NodeJS.Timeout {
  let last = served.cacheStatus()?.state;
  const timer = setInterval(() => {
    const status = served.cacheStatus();
    if (status === undefined || status.state === last) return;
    const fields = { from: last, to: status.state, reason: status.stateReason ?? null, dirtyBytes: status.dirtyBytes };
    if (status.state === 'backing-offline' || status.state === 'degraded' || status.state === 'failed') log.warn(fields, `cache ${status.state}`);
    else log.info(fields, `cache ${status.state}`);
    last = status.state;
  }, stateWatchIntervalMs);
  timer.unref();
  return timer;
}

async function stopAll(closers: Closer[], request: StopRequest, terminal: Terminal, log: Logger): Promise<number> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<'timeout'>((resolve) => { timer = setTimeout(() => { resolve('timeout'); }, stopTimeoutMs); });
  const outcome = await Promise.race([closeAll(closers).then(() => 'done' as const), timedOut]);
  clearTimeout(timer);
  if (outcome === 'timeout') {
    log.error({ reason: request.reason, timeoutMs: stopTimeoutMs }, 'stop did not finish');
    terminal.err(`pcache: stop (${request.reason}) did not finish within ${stopTimeoutMs / 1000} s (a device is not answering); exiting anyway`);
    return exitFailure;
  }
  log.info({ reason: request.reason }, 'stopped');
  terminal.out(`stopped (${request.reason})`);
  return exitOk;
}

/** Runs the closers in reverse order; every one runs even if an earlier one fails; the first failure is rethrown. */
async function closeAll(closers: Closer[]): Promise<void> {
  let failure: Error | undefined;
  for (const close of closers.splice(0).reverse()) {
    try {
      await close();
    } catch (error) {
      failure ??= error instanceof Error ? error : new Error(String(error));
    }
  }
  if (failure !== undefined) throw failure;
}

/**
 * The size of libuv's thread pool, as libuv derives it from UV_THREADPOOL_SIZE when the pool
 * starts (src/threadpool.c): 4 when unset, atoi of the value, 0 counted as 1, at most 1024.
 * Nothing changes the variable once the pool has started (the bin sets it before that).
 */
export function uvThreadPoolSize(value: string | undefined): number {
  if (value === undefined) return 4;
  const parsed = Number(/^\s*[+-]?\d+/.exec(value)?.[0] ?? 0);
  if (parsed === 0) return 1;
  return parsed < 0 || parsed > 1024 ? 1024 : parsed;
}

/**
 * The NBD URI of the server: nbds:// forms when it offers TLS. `withCredentials` adds what a
 * libnbd client needs to use them (tls-certificates=, or a PSK user and tls-psk-file=).
 */
export function uriOf(address: NbdBoundAddress, exportName: string, tls?: ServeTls, withCredentials = false): string {
  const name = encodeURIComponent(exportName);
  const scheme = tls === undefined ? 'nbd' : 'nbds';
  const credentials = tls !== undefined && withCredentials ? tls.clientParameters : undefined;
  const user = credentials?.user === undefined ? '' : `${encodeURIComponent(credentials.user)}@`;
  const extra = credentials === undefined ? [] : [credentials.query];
  if ('path' in address) return `${scheme}+unix://${user}/${name}?${[`socket=${path.resolve(address.path)}`, ...extra].join('&')}`;
  const host = address.host ?? '127.0.0.1';
  return `${scheme}://${user}${host.includes(':') ? `[${host}]` : host}:${address.port}/${name}${extra.length === 0 ? '' : `?${extra.join('&')}`}`;
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
