// NbdServer: listens on a Unix socket or TCP and serves the exports of a catalog to many
// connections.
//
// The server owns the listener, the set of live connections, the limits every connection
// runs under, and shutdown. Everything protocol-shaped lives in ../protocol/:
// handshake_server.ts (negotiation) and transmission_server.ts (requests, replies, validation,
// error mapping); connection.ts serves one client. Which exports exist is the catalog's
// business (export_catalog.ts): either one Export given as `export` + `exportName` (it answers
// to its name and to the empty name), or an ExportCatalog the owner changes while the server
// runs. Each connection serves the Export it negotiated; every connection to one export shares
// that Export, which is why CAN_MULTI_CONN is advertised: a FLUSH on any connection covers
// writes completed on every connection to the same export.
//
// Invariants:
// - In the one-export form the name and description fit the protocol's 4096-byte string
//   limit and the export size is a safe integer multiple of 512, or construction fails
//   (PcacheError EINVAL); an ExportMap checks the same at add().
// - A stale Unix socket file (its server was killed) is replaced; a live one, or a path that
//   is not a socket, is never touched.
// - close() stops accepting at once, answers new requests with ESHUTDOWN, lets in-flight
//   requests finish and reply, then closes every socket; after shutdownTimeoutMs remaining
//   sockets are destroyed (an Export call that never settles cannot hold shutdown forever).
//   disconnect(name) does the same for the connections serving one export, and nothing else.
// - With `tls`, the credentials are checked at construction (tls.ts); the mode goes into every
//   connection's handshake (protocol/handshake_server.ts says what 'on' and 'require' mean),
//   and a failed TLS handshake is counted and reported to onTlsFailure, never thrown.
// - An export served elsewhere (an entry with handOff, export_catalog.ts) is negotiated here and
//   served by whoever adopt()s the connection: a server that is never told to listen can serve
//   only adopted connections. adopt() takes a connection only for an export its catalog has,
//   of the size the client was told, and within connectionsMax; otherwise the socket is
//   destroyed (the client sees its connection close).

import fs from 'node:fs';
import net from 'node:net';
import { assert } from '../../lib/assert.js';
import { PcacheError } from '../../lib/errors.js';
import { KiB, MiB } from '../../lib/units.js';
import { maxPayloadBytes, stringMaxBytes } from '../protocol/constants.js';
import type { HandshakeConfig } from '../protocol/handshake_server.js';
import { BufferPool } from './buffer_pool.js';
import { BusyPoll, busyPollWindowDefaultUs, busyPollWindowMaxUs, type BusyPollCounters } from './busy_poll.js';
import { Connection, type ConnectionHost } from './connection.js';
import type { ConnectionLimits, NbdCounters } from './connection_limits.js';
import type { Export } from './export.js';
import { catalogDirectory, singleExportCatalog, type ExportCatalog, type HandedOffTerms, type ServedExport } from './export_catalog.js';
import type { NbdRequestObserver } from './observer.js';
import { ServerTls, type NbdServerTls, type NbdTlsFailure } from './tls.js';

export interface NbdLimits extends ConnectionLimits {
  /** Largest option data accepted during the handshake; a longer option disconnects. */
  readonly optionLengthMaxBytes: number;
  /** Options accepted per connection before it is cut off (endless LIST/INFO loops). */
  readonly optionsMax: number;
  /** Connections served at once; further ones are refused by the listener. */
  readonly connectionsMax: number;
  /** How long close() waits for in-flight requests before destroying sockets. */
  readonly shutdownTimeoutMs: number;
}

export const defaultNbdLimits: NbdLimits = {
  handshakeTimeoutMs: 10_000,
  optionLengthMaxBytes: 64 * KiB,
  optionsMax: 128,
  inFlightRequestsMax: 512,
  inFlightBytesMax: 64 * MiB,
  replyBacklogBytesMax: 16 * MiB,
  closeGraceMs: 2_000,
  connectionsMax: 256,
  shutdownTimeoutMs: 30_000,
};

/**
 * What to serve is given one of two ways, never both (construction fails with EINVAL):
 * - one export: `export` + `exportName` (+ `description`, `readOnly`);
 * - `catalog`: the exports an ExportCatalog holds whenever a client asks (export_catalog.ts),
 *   each with its own description and read-only flag.
 */
export interface NbdServerOptions {
  readonly export?: Export;
  /** The export answers to this name and to the empty (default) name. */
  readonly exportName?: string;
  readonly description?: string;
  /** Advertise READ_ONLY and refuse WRITE, TRIM and WRITE_ZEROES with EPERM (one-export form). */
  readonly readOnly?: boolean;
  readonly catalog?: ExportCatalog;
  readonly limits?: Partial<NbdLimits>;
  /** Advertise NBD_FLAG_NO_ZEROES (default true). Turning it off exercises old clients. */
  readonly offerNoZeroes?: boolean;
  /** Accept NBD_OPT_STRUCTURED_REPLY (default true). Turning it off exercises fallbacks. */
  readonly offerStructuredReplies?: boolean;
  /** Told about every answered request (metrics); without one the server spends nothing on it. */
  readonly observer?: NbdRequestObserver;
  /** Busy-polling window after a connection's last reply, 0 for none (busy_poll.ts; default busyPollWindowDefaultUs). */
  readonly busyPollUs?: number;
  /** Offer TLS ('on') or require it ('require'); without it the server runs in NOTLS mode. */
  readonly tls?: NbdServerTls;
  /** Told about every failed TLS handshake (to log it); the connection is closed. */
  readonly onTlsFailure?: (failure: NbdTlsFailure) => void;
}

export type NbdListenAddress =
  | { readonly path: string }
  | { readonly port: number; readonly host?: string }
  /** A socket that is already bound and listening, inherited as this file descriptor (systemd socket activation). */
  | { readonly fd: number };

/** Where a server listens once it does: a Unix socket's path, or TCP's host and port. */
export type NbdBoundAddress = Exclude<NbdListenAddress, { readonly fd: number }>;

export interface NbdServerStats extends NbdCounters, BusyPollCounters {
  readonly connectionsOpen: number;
}

export class NbdServer implements ConnectionHost {
  readonly limits: NbdLimits;
  readonly counters: NbdCounters = {
    connectionsTotal: 0,
    requestsTotal: 0,
    requestErrorsTotal: 0,
    replyBatchesTotal: 0,
    readPausesTotal: 0,
    protocolViolationsTotal: 0,
    tlsSessionsTotal: 0,
    tlsFailuresTotal: 0,
  };
  /** READ reply and WRITE payload buffers, shared by all connections (one event loop, so no locking). */
  readonly buffers = new BufferPool();
  readonly busyPoll: BusyPoll;
  readonly observer: NbdRequestObserver | undefined;
  readonly tls: ServerTls | undefined;
  private readonly options: NbdServerOptions;
  /** Negotiation parameters shared by every connection; the exports in it are asked, never copied. */
  readonly handshakeConfig: HandshakeConfig<ServedExport>;
  private readonly listener: net.Server;
  private readonly connections = new Set<Connection>();
  private boundAddress: NbdBoundAddress | undefined;
  private stopping = false;
  private closed: Promise<void> | undefined;

  constructor(options: NbdServerOptions) {
    const limits = { ...defaultNbdLimits, ...options.limits };
    checkLimits(limits);
    const catalog = catalogOf(options);
    const busyPollUs = options.busyPollUs ?? busyPollWindowDefaultUs;
    if (!Number.isSafeInteger(busyPollUs) || busyPollUs < 0 || busyPollUs > busyPollWindowMaxUs) {
      throw new PcacheError('EINVAL', `busy poll window must be an integer in [0, ${busyPollWindowMaxUs}] microseconds`);
    }
    this.busyPoll = new BusyPoll(busyPollUs);
    this.tls = options.tls === undefined ? undefined : new ServerTls(options.tls, limits.handshakeTimeoutMs);
    this.options = options;
    this.limits = limits;
    this.handshakeConfig = {
      exports: catalogDirectory(catalog),
      offerNoZeroes: options.offerNoZeroes ?? true,
      offerStructuredReplies: options.offerStructuredReplies ?? true,
      optionLengthMaxBytes: limits.optionLengthMaxBytes,
      optionsMax: limits.optionsMax,
      tls: this.tls?.mode ?? 'off',
    };
    this.observer = options.observer;
    // allowHalfOpen: a client that shuts down its sending side still gets its replies.
    // pauseOnConnect: the connection starts reading only once it has chosen how (socket_input.ts).
    this.listener = net.createServer({ allowHalfOpen: true, noDelay: true, keepAlive: true, pauseOnConnect: true }, (socket) => {
      this.accept(socket);
    });
    // Accept failures (EMFILE and the like) affect one connection attempt, not the server.
    this.listener.on('error', () => undefined);
  }

  get shuttingDown(): boolean {
    return this.stopping;
  }

  /**
   * Starts listening on a Unix socket path or on TCP (host defaults to 127.0.0.1; port 0 picks
   * a free port), or accepts on an inherited listening socket (`fd`). Resolves with the address
   * actually bound: TCP's host and port, or a Unix socket's path (which an inherited Unix
   * socket reports too).
   */
  async listen(address: NbdListenAddress): Promise<NbdBoundAddress> {
    assert(this.boundAddress === undefined && !this.stopping, 'listen called twice or after close');
    if ('path' in address) await prepareSocketPath(address.path);
    await new Promise<void>((resolve, reject) => {
      const onError = (error: Error): void => {
        reject(new PcacheError('EINVAL', `cannot listen on ${describe(address)}: ${error.message}`, { cause: error }));
      };
      this.listener.once('error', onError);
      const done = (): void => {
        this.listener.off('error', onError);
        resolve();
      };
      if ('path' in address) this.listener.listen(address.path, done);
      else if ('fd' in address) this.listener.listen({ fd: address.fd }, done);
      else this.listener.listen({ port: address.port, host: address.host ?? '127.0.0.1' }, done);
    });
    const bound = this.listener.address();
    if (bound !== null && typeof bound === 'object') this.boundAddress = { host: bound.address, port: bound.port };
    else if ('path' in address) this.boundAddress = { path: address.path };
    else if (typeof bound === 'string' && bound !== '') this.boundAddress = { path: bound };
    else this.boundAddress = { path: 'fd' in address ? inheritedSocketPath(address.fd) ?? `(inherited file descriptor ${address.fd})` : '' };
    return this.boundAddress;
  }

  /** The bound address, once listening. */
  address(): NbdBoundAddress | undefined {
    return this.boundAddress;
  }

  stats(): NbdServerStats {
    return { ...this.counters, ...this.busyPoll.counters, connectionsOpen: this.connections.size };
  }

  /**
   * Graceful shutdown (idempotent): stop accepting, reply ESHUTDOWN to new requests, let
   * in-flight requests finish and reply, then close every connection.
   */
  close(): Promise<void> {
    this.closed ??= this.shutdown();
    return this.closed;
  }

  /** Connections in transmission with the export named `name` (its catalog name, whatever name the client sent). */
  connectionCount(name: string): number {
    let count = 0;
    for (const connection of this.connections) if (connection.exportName === name) count += 1;
    return count;
  }

  /**
   * Ends every connection in transmission with the export named `name`, the way close() ends
   * all of them: new requests get ESHUTDOWN, in-flight requests finish and reply, then the
   * socket closes; after shutdownTimeoutMs what remains is destroyed. Resolves with the number
   * of connections ended once all are gone. Clients still negotiating are not touched: remove
   * the export from the catalog first, and none of them can choose it.
   */
  async disconnect(name: string): Promise<number> {
    const ending = [...this.connections].filter((connection) => connection.exportName === name);
    await this.endConnections(ending);
    return ending.length;
  }

  /**
   * Serves a connection another server negotiated (an export it hands off): `terms` and
   * `leftover` as its HandOff received them. Returns false, with the socket destroyed, when
   * this server cannot serve it (see the file comment).
   */
  adopt(socket: net.Socket, terms: HandedOffTerms, leftover: Uint8Array): boolean {
    const served = this.handshakeConfig.exports.find(terms.exportName);
    if (this.stopping || this.connections.size >= this.limits.connectionsMax || served === undefined ||
      served.handOff !== undefined || served.sizeBytes !== terms.sizeBytes) {
      socket.destroy();
      return false;
    }
    this.connections.add(new Connection(socket, this, { served, terms, leftover }));
    return true;
  }

  connectionFinished(connection: Connection): void {
    this.connections.delete(connection);
  }

  tlsFailed(failure: NbdTlsFailure): void {
    this.options.onTlsFailure?.(failure);
  }

  private accept(socket: net.Socket): void {
    // The limit is kept here: net.Server's own count (maxConnections) stops counting a socket
    // once it has handed its handle over (socket_input.ts).
    if (this.stopping || this.connections.size >= this.limits.connectionsMax) {
      socket.destroy();
      return;
    }
    this.connections.add(new Connection(socket, this));
  }

  private async shutdown(): Promise<void> {
    this.stopping = true;
    this.busyPoll.stop();
    const listenerClosed = new Promise<void>((resolve) => {
      // Node also removes the Unix socket file when the listener closes.
      if (this.listener.listening) this.listener.close(() => { resolve(); });
      else resolve();
    });
    // Nothing is accepted from here on, so these are all the connections there will be.
    await this.endConnections([...this.connections]);
    await listenerClosed;
  }

  /** Gracefully ends `ending`, destroying whatever is left of them after shutdownTimeoutMs. */
  private async endConnections(ending: readonly Connection[]): Promise<void> {
    if (ending.length === 0) return;
    const allFinished = Promise.all(ending.map((connection) => connection.finished));
    for (const connection of ending) connection.beginShutdown();
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, this.limits.shutdownTimeoutMs);
    });
    await Promise.race([allFinished, timedOut]);
    clearTimeout(timer);
    for (const connection of ending) connection.destroy();
  }
}

/** The catalog the options describe (see NbdServerOptions). */
function catalogOf(options: NbdServerOptions): ExportCatalog {
  const { catalog, export: single, exportName, description, readOnly } = options;
  if (catalog !== undefined) {
    if (single !== undefined || exportName !== undefined || description !== undefined || readOnly !== undefined) {
      throw new PcacheError('EINVAL', 'give a server either a catalog or one export (export, exportName, description, readOnly), not both');
    }
    return catalog;
  }
  if (single === undefined || exportName === undefined) throw new PcacheError('EINVAL', 'a server needs a catalog, or an export and its name');
  return singleExportCatalog({
    name: exportName,
    export: single,
    readOnly: readOnly ?? false,
    ...(description === undefined ? {} : { description }),
  });
}

function checkLimits(limits: NbdLimits): void {
  const positive: (keyof NbdLimits)[] = [
    'handshakeTimeoutMs', 'optionsMax', 'inFlightRequestsMax', 'inFlightBytesMax', 'replyBacklogBytesMax',
    'closeGraceMs', 'connectionsMax', 'shutdownTimeoutMs',
  ];
  for (const key of positive) {
    if (!Number.isSafeInteger(limits[key]) || limits[key] <= 0) throw new PcacheError('EINVAL', `limit ${key} must be a positive integer`);
  }
  // An INFO/GO carrying a maximal (4096-byte) name must fit; 1 MiB keeps option buffers small.
  if (limits.optionLengthMaxBytes < stringMaxBytes + 6 || limits.optionLengthMaxBytes > MiB) {
    throw new PcacheError('EINVAL', `optionLengthMaxBytes must lie in [${stringMaxBytes + 6}, ${MiB}]`);
  }
  // One maximal READ or WRITE must always be admissible, or a client could stall forever.
  if (limits.inFlightBytesMax < maxPayloadBytes) {
    throw new PcacheError('EINVAL', `inFlightBytesMax must be at least ${maxPayloadBytes}`);
  }
}

/**
 * Makes `path` free for listening: nothing there is fine; a socket nobody answers on is a
 * leftover of a killed server and is removed; a live socket or any other file is refused.
 * Exported for other Unix-socket listeners of the same process (the CLI's control socket).
 */
export async function prepareSocketPath(path: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new PcacheError('EINVAL', `cannot inspect ${path}: ${(error as Error).message}`, { cause: error });
  }
  if (!stat.isSocket()) throw new PcacheError('EINVAL', `${path} exists and is not a socket; refusing to replace it`);
  if (await somethingListens(path)) throw new PcacheError('EINVAL', `${path} is in use by another server, or cannot be probed`);
  try {
    fs.unlinkSync(path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new PcacheError('EPERM', `cannot remove stale socket ${path}: ${(error as Error).message}`, { cause: error });
    }
  }
}

/** True when a server accepts connections on `path`, or when that cannot be ruled out. */
function somethingListens(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', (error: NodeJS.ErrnoException) => {
      // Refused: the file is a leftover with no listener. Gone: nothing to replace. Anything
      // else (EACCES, say) leaves the question open, and an open question is not a licence.
      resolve(error.code !== 'ECONNREFUSED' && error.code !== 'ENOENT');
    });
  });
}

/**
 * The path of an inherited Unix socket, which node does not report for a socket it did not
 * bind: /proc/self/fd names the socket's inode, and /proc/net/unix lists the path bound to it
 * (columns: Num RefCount Protocol Flags Type St Inode Path). Undefined if it cannot tell.
 */
function inheritedSocketPath(fd: number): string | undefined {
  try {
    const inode = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/self/fd/${fd}`))?.[1];
    if (inode === undefined) return undefined;
    for (const line of fs.readFileSync('/proc/net/unix', 'utf8').split('\n')) {
      const fields = line.trim().split(/\s+/);
      if (fields[6] === inode && fields[7] !== undefined) return fields[7];
    }
  } catch {
    // No /proc: the address is only reported, never used to listen.
  }
  return undefined;
}

function describe(address: NbdListenAddress): string {
  if ('path' in address) return address.path;
  if ('fd' in address) return `inherited file descriptor ${address.fd}`;
  return `${address.host ?? '127.0.0.1'}:${address.port}`;
}
