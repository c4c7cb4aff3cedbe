// What every `pcache serve` shares, whatever it serves: the stop requests (signals), closing
// what was opened in reverse order within a time limit, the NBD URI it prints, the rule for a
// network address without TLS, and the log of each cache's state changes.

import path from 'node:path';
import { PcacheError } from '../lib/errors.js';
import type { NbdBoundAddress } from '../nbd/server/server.js';
import { exitFailure, exitOk, insecureBindProblem, isLoopback, UsageError, type ServeArgs } from './args.js';
import { createLogger, type Logger } from './log.js';
import { loadServeTls, type ServeTls } from './serve_tls.js';
import { takeInheritedSocket } from './systemd.js';
import type { Terminal } from './terminal.js';

export type Closer = () => Promise<void>;

/** What every serve sets up before it creates or opens anything: stop requests, the log, the socket systemd passed, the TLS credentials. */
export interface ServeStart {
  readonly stops: StopRequests;
  readonly log: Logger;
  readonly startedAt: Date;
  readonly inherited: ReturnType<typeof takeInheritedSocket>;
  readonly tls: ServeTls | undefined;
}

export function beginServe(args: ServeArgs): ServeStart {
  const stops = new StopRequests();
  const log = createLogger(args.logLevel);
  const inherited = takeInheritedSocket();
  if (inherited !== undefined && args.listenGiven) {
    throw new UsageError('serve: --socket and --port cannot be used under systemd socket activation (LISTEN_FDS is set): the listening socket comes from the .socket unit');
  }
  const tls = args.tls === undefined ? undefined : loadServeTls(args.tls);
  if (tls?.certNotAfter !== undefined && tls.certNotAfter.getTime() < Date.now()) {
    log.warn({ notAfter: tls.certNotAfter.toISOString() }, 'the TLS server certificate has expired: clients that verify it will refuse to connect');
  }
  return { stops, log, startedAt: new Date(), inherited, tls };
}

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
export class StopRequests {
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


/**
 * An NBD export on a network address: refused without --tls require or --allow-insecure when
 * systemd handed us the socket (the command line was checked already, args_serve.ts); with
 * --allow-insecure it is served, and the log says so.
 */
export function checkNetworkExposure(args: ServeArgs, host: string, port: number, inherited: boolean, log: Logger): void {
  if (inherited) {
    const problem = insecureBindProblem(host, port, args.tls?.mode, args.allowInsecure);
    if (problem !== undefined) throw new PcacheError('EINVAL', `the socket systemd passed: ${problem}`);
  }
  if (!isLoopback(host) && args.tls?.mode !== 'require') {
    log.warn({ address: `${host}:${port}`, tls: args.tls?.mode ?? 'off' }, 'serving NBD on a network address without required TLS (--allow-insecure): anyone who reaches it can read and write the disk');
  }
}

/** Logs every change of the cache's state (running, draining, degraded, backing offline...). */
export function watchState(cacheStatus: () => { readonly state: string; readonly stateReason?: string | undefined; readonly dirtyBytes: number } | undefined, log: Logger, what = 'cache'): NodeJS.Timeout {
  let last = cacheStatus()?.state;
  const timer = setInterval(() => {
    const status = cacheStatus();
    if (status === undefined || status.state === last) return;
    const fields = { from: last, to: status.state, reason: status.stateReason ?? null, dirtyBytes: status.dirtyBytes };
    if (status.state === 'backing-offline' || status.state === 'degraded' || status.state === 'failed') log.warn(fields, `${what} ${status.state}`);
    else log.info(fields, `${what} ${status.state}`);
    last = status.state;
  }, stateWatchIntervalMs);
  timer.unref();
  return timer;
}

export async function stopAll(closers: Closer[], request: StopRequest, terminal: Terminal, log: Logger): Promise<number> {
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
export async function closeAll(closers: Closer[]): Promise<void> {
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
