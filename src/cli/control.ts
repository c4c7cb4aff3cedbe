// The control socket's server: a local Unix socket (mode 0600) on which a running
// `pcache serve` answers HTTP/1.1 requests with JSON (control_api.ts lists the routes and
// the error statuses; control_client.ts is the client `pcache status`, `drain` and `set` use).
//
// Invariants (one bad client cannot hurt the server or the other clients):
// - a request body over limits.bodyBytesMax gets 413 and its connection is closed (nothing
//   longer is ever buffered); a request head over limits.headerBytesMax gets 431;
// - at most limits.connectionsMax connections (node drops the ones beyond); each has at most
//   limits.pendingPerConnectionMax unanswered requests (pipelined ones beyond get 429);
// - a connection idle between requests is closed after limits.idleTimeoutMs; a request whose
//   head or body does not arrive in time gets 408 (limits.headersTimeoutMs,
//   requestTimeoutMs). Answering is not timed: a drain may take hours, and its connection
//   stays open until it is answered. A socket error or a malformed request ends that
//   connection only;
// - `GET /status` is computed from memory (synchronously, or by the volume processes, each
//   from its own memory, within a time limit): it never waits for a drain, a device, or
//   another client (HTTP answers one connection's requests in order, so a status asked while
//   a drain runs comes on another connection, as any HTTP client does it);
// - close() stops listening, answers every request still pending with 503 ESHUTDOWN, and
//   closes every connection; a request arriving meanwhile gets 503 too.

import fs from 'node:fs';
import http from 'node:http';
import type net from 'node:net';
import { assert } from '../lib/assert.js';
import { isPcacheError } from '../lib/errors.js';
import { prepareSocketPath } from '../nbd/server/server.js';
import { controlLimits, controlRoutes, httpStatusOf, type ControlErrorBody, type ControlLimits, type ControlRoute } from './control_api.js';
import { listenOn } from './listen.js';

/**
 * The handlers answer for the whole server, or — `volume`, from the request's `?volume=NAME` —
 * for one volume of a server that serves a cache device's volumes (a single-volume server
 * refuses a volume it does not know).
 */
export interface ControlHandlers {
  /**
   * The server's state, from memory: computed synchronously, or (a server of volume processes)
   * gathered from each volume process's answer, which never waits for a drain either.
   */
  status(): unknown;
  /** Resolves once everything written before the call is on the backing device, synced. */
  drain(volume?: string): Promise<void>;
  /**
   * Applies `{name: value}` changes all together or none (an empty object changes nothing) and
   * resolves to every setting's value afterwards; refuses with a PcacheError.
   */
  set(changes: Readonly<Record<string, unknown>>, volume?: string): Promise<unknown>;
  /** Drops every clean cached copy; resolves to the bytes dropped. */
  invalidate(volume?: string): Promise<number>;
  /** Drains, drops every clean copy, marks the cache detached; the server then stops. */
  detach(): Promise<void>;
  /**
   * Brings the backing device to the log's durable state and holds it there while `held` runs;
   * `signal` (the client gone) gives up the wait.
   */
  checkpoint(held: (point: CheckpointPoint) => Promise<void>, signal: AbortSignal, volume?: string): Promise<void>;
  /** The volume routes; absent on a server of one backing device (they answer ENOTSUP). */
  readonly volumes?: VolumeHandlers;
}

export interface VolumeHandlers {
  list(): unknown;
  /** Adds a volume from the request's JSON object; resolves to its entry. */
  add(request: Readonly<Record<string, unknown>>): Promise<unknown>;
  remove(request: Readonly<Record<string, unknown>>): Promise<unknown>;
  resize(request: Readonly<Record<string, unknown>>): Promise<unknown>;
}

/** Where a checkpoint holds the backing device (Cache.checkpoint's point). */
export interface CheckpointPoint {
  readonly seq: number;
  readonly lsn: number;
}

/** A failure answered by the protocol itself (not an operating error of the cache). */
class ControlError extends Error {
  readonly code: string;
  readonly headers: Readonly<Record<string, string>>;

  constructor(code: string, message: string, headers: Readonly<Record<string, string>> = {}) {
    super(message);
    this.code = code;
    this.headers = headers;
  }
}

/** The control socket's mode: the user running the server, and nobody else, may connect. */
const socketMode = 0o600;
/** The umask that makes bind() create a socket file of socketMode. */
const ownerOnlyUmask = 0o177;

const shuttingDown = (): ControlError => new ControlError('ESHUTDOWN', 'the server is stopping');

interface Served extends ControlRoute {
  /**
   * The answer's JSON; a route that answers by itself (checkpoint) sends it on `response` and
   * resolves once done. `volume` is the request's `?volume=NAME`.
   */
  answer(body: string, response: http.ServerResponse, volume: string | undefined): unknown;
}

const singleVolume = (): ControlError => new ControlError('ENOTSUP', 'this server serves one backing device (serve --backing): volumes are served from a cache device served without --backing');

export class ControlServer {
  private readonly handlers: ControlHandlers;
  private readonly version: string;
  private readonly limits: ControlLimits;
  private readonly server: http.Server;
  private readonly routes: readonly Served[];
  /** The responses not yet sent, per connection: answered with ESHUTDOWN on close. */
  private readonly pending = new Map<net.Socket, Set<http.ServerResponse>>();
  private path: string | undefined;
  private closing = false;

  constructor(handlers: ControlHandlers, options: { readonly version: string; readonly limits?: Partial<ControlLimits> }) {
    this.handlers = handlers;
    this.version = options.version;
    this.limits = { ...controlLimits, ...options.limits };
    this.routes = [
      { ...controlRoutes.routes, answer: () => this.describe() },
      { ...controlRoutes.status, answer: () => this.handlers.status() },
      { ...controlRoutes.drain, answer: (_body, _response, volume) => this.handlers.drain(volume).then(() => ({ drained: true })) },
      { ...controlRoutes.settings, answer: (_body, _response, volume) => this.handlers.set({}, volume) },
      { ...controlRoutes.set, answer: (body, _response, volume) => this.handlers.set(objectOf(body, 'PATCH /settings', 'name: value'), volume) },
      { ...controlRoutes.invalidate, answer: (_body, _response, volume) => this.handlers.invalidate(volume).then((droppedBytes) => ({ droppedBytes })) },
      { ...controlRoutes.detach, answer: () => this.handlers.detach().then(() => ({ detached: true })) },
      { ...controlRoutes.checkpoint, answer: (_body, response, volume) => this.checkpoint(response, volume) },
      { ...controlRoutes.volumes, answer: () => this.volumeHandlers().list() },
      { ...controlRoutes.volumeAdd, answer: (body) => this.volumeHandlers().add(objectOf(body, 'POST /volumes', 'the volume\'s fields')) },
      { ...controlRoutes.volumeRemove, answer: (body) => this.volumeHandlers().remove(objectOf(body, 'POST /volumes/remove', 'the volume\'s fields')) },
      { ...controlRoutes.volumeResize, answer: (body) => this.volumeHandlers().resize(objectOf(body, 'POST /volumes/resize', 'the volume\'s fields')) },
    ];
    this.server = http.createServer({
      maxHeaderSize: this.limits.headerBytesMax,
      headersTimeout: this.limits.headersTimeoutMs,
      requestTimeout: this.limits.requestTimeoutMs,
      connectionsCheckingInterval: this.limits.timeoutCheckIntervalMs,
    }, (request, response) => { this.accept(request, response); });
    this.server.keepAliveTimeout = this.limits.idleTimeoutMs;
    this.server.timeout = 0; // an answer (a drain) is never timed
    this.server.maxConnections = this.limits.connectionsMax;
    this.server.on('connection', (socket: net.Socket) => {
      this.pending.set(socket, new Set());
      socket.once('close', () => { this.pending.delete(socket); });
    });
    this.server.on('clientError', (error: NodeJS.ErrnoException, socket: net.Socket) => { refuseMalformed(error, socket); });
  }

  /** Listens on `path` (a stale socket left by a killed server is replaced); only this user may connect. */
  async listen(path: string): Promise<void> {
    assert(this.path === undefined, 'listen called twice');
    await prepareSocketPath(path);
    await listenOn(this.server, path, (done) => {
      // The socket file is created by bind(), inside listen(), with the process umask: a
      // umask of 0177 for that one synchronous call creates it 0600, so there is no moment
      // in which another user may connect (a chmod after listening leaves one).
      const umask = process.umask(ownerOnlyUmask);
      try {
        this.server.listen(path, done);
      } finally {
        process.umask(umask);
      }
    });
    this.path = path;
    fs.chmodSync(path, socketMode);
  }

  /** Stops listening; requests still pending are answered with ESHUTDOWN; every connection closes. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const closed = new Promise<void>((resolve) => {
      if (this.server.listening) this.server.close(() => { resolve(); }); // also closes idle connections
      else resolve();
    });
    for (const responses of this.pending.values()) for (const response of responses) refuse(response, shuttingDown(), true);
    const cut = setTimeout(() => { this.server.closeAllConnections(); }, this.limits.closeGraceMs);
    cut.unref();
    await closed;
    clearTimeout(cut);
  }

  private accept(request: http.IncomingMessage, response: http.ServerResponse): void {
    const unsent = this.pending.get(request.socket) ?? new Set();
    const earlier = unsent.size;
    unsent.add(response);
    response.once('close', () => { unsent.delete(response); });
    if (this.closing) {
      refuse(response, shuttingDown(), true);
      return;
    }
    if (earlier >= this.limits.pendingPerConnectionMax) {
      refuse(response, new ControlError('EBUSY', `more than ${this.limits.pendingPerConnectionMax} requests pending on this connection`));
      return;
    }
    let route: Served;
    let volume: string | undefined;
    try {
      route = this.route(request);
      volume = new URL(request.url ?? '/', 'http://localhost').searchParams.get('volume') ?? undefined;
    } catch (error) {
      refuse(response, error);
      return;
    }
    readBody(request, this.limits.bodyBytesMax).then(
      (body) => {
        if (this.closing) return; // answered with ESHUTDOWN already
        new Promise((resolve) => { resolve(route.answer(body, response, volume)); }).then(
          (result) => { answer(response, 200, result); },
          (error: unknown) => { refuse(response, error); },
        );
      },
      (error: unknown) => { refuse(response, error, true); },
    );
  }

  /** The route a request names; unknown paths are 404, other methods 405. */
  private route(request: http.IncomingMessage): Served {
    const path = new URL(request.url ?? '/', 'http://localhost').pathname;
    const atPath = this.routes.filter((route) => route.path === path);
    const route = atPath.find((candidate) => candidate.method === request.method);
    if (route !== undefined) return route;
    if (atPath.length === 0) {
      throw new ControlError('ENOENT', `no route ${path} (routes: ${this.routes.map((known) => `${known.method} ${known.path}`).join(', ')})`);
    }
    const allowed = atPath.map((candidate) => candidate.method).join(', ');
    throw new ControlError('EMETHOD', `${path} takes ${allowed}, not ${request.method ?? 'nothing'}`, { allow: allowed });
  }

  /**
   * POST /checkpoint: the hold lasts while the connection does. Once held, the head and the
   * `held` line go out and the answer stays open; the connection's close (the client done, or
   * gone) ends the hold. A failure before that is answered as any other.
   */
  private volumeHandlers(): VolumeHandlers {
    if (this.handlers.volumes === undefined) throw singleVolume();
    return this.handlers.volumes;
  }

  private async checkpoint(response: http.ServerResponse, volume: string | undefined): Promise<unknown> {
    const gone = new AbortController();
    response.once('close', () => { gone.abort(); });
    await this.handlers.checkpoint(async (point) => {
      response.writeHead(200, { 'content-type': 'application/x-ndjson', 'cache-control': 'no-store' });
      response.write(`${JSON.stringify({ held: { seq: point.seq, lsn: point.lsn, time: new Date().toISOString() } })}\n`);
      if (gone.signal.aborted) return;
      await new Promise<void>((resolve) => { gone.signal.addEventListener('abort', () => { resolve(); }, { once: true }); });
    }, gone.signal, volume);
    return undefined; // answered already (answer() leaves a sent response alone)
  }

  private describe(): unknown {
    return {
      service: 'pcache',
      version: this.version,
      routes: this.routes.map(({ method, path, summary }) => ({ method, path, summary })),
    };
  }
}

/** A request's body that must be a JSON object (`PATCH /settings`: name: value). */
function objectOf(body: string, route: string, what: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(body);
  } catch {
    throw new ControlError('EINVAL', `${route} takes a JSON object of ${what}; the body is not JSON`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new ControlError('EINVAL', `${route} takes a JSON object of ${what}`);
  }
  return value as Record<string, unknown>;
}

/** The request's body as text, at most `limit` bytes (E2BIG beyond, without reading the rest). */
function readBody(request: http.IncomingMessage, limit: number): Promise<string> {
  const tooLong = (): ControlError => new ControlError('E2BIG', `request body longer than ${limit} bytes`);
  if (Number(request.headers['content-length'] ?? 0) > limit) return Promise.reject(tooLong());
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let bytes = 0;
    const onData = (chunk: Buffer): void => {
      bytes += chunk.length;
      if (bytes > limit) {
        request.off('data', onData);
        request.pause();
        reject(tooLong());
        return;
      }
      chunks.push(chunk);
    };
    request.on('data', onData);
    request.once('end', () => { resolve(Buffer.concat(chunks).toString('utf8')); });
    request.once('error', reject);
  });
}

/** Sends `body` as JSON with `status`, once: a response already sent (by close()) is left alone. */
function answer(response: http.ServerResponse, status: number, body: unknown, headers: Readonly<Record<string, string>> = {}): void {
  if (response.headersSent || response.writableEnded) return;
  const text = `${JSON.stringify(body)}\n`;
  response.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store', ...headers, 'content-length': String(Buffer.byteLength(text)) }).end(text);
}

/**
 * Answers a failure with its status and `{"error": {code, message, reason}}`; `close` ends the
 * connection afterwards. A failure that is neither a PcacheError nor a ControlError is a bug
 * and is thrown on.
 */
function refuse(response: http.ServerResponse, error: unknown, close = false): void {
  if (!(error instanceof ControlError) && !isPcacheError(error)) throw error;
  const reason = isPcacheError(error) ? error.reason : undefined;
  const body: ControlErrorBody = { error: { code: error.code, message: error.message, ...(reason === undefined ? {} : { reason }) } };
  const headers = { ...(error instanceof ControlError ? error.headers : {}), ...(close ? { connection: 'close' } : {}) };
  answer(response, httpStatusOf(error.code), body, headers);
}

/** A request node could not parse, or one that did not arrive in time: answered in JSON where the socket still can be, then closed. */
function refuseMalformed(error: NodeJS.ErrnoException, socket: net.Socket): void {
  if (!socket.writable || error.code === 'ECONNRESET') {
    socket.destroy();
    return;
  }
  const [status, code, message] =
    error.code === 'HPE_HEADER_OVERFLOW' ? [431, 'E2BIG', 'request head too long'] :
      error.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? [408, 'ETIMEDOUT', 'the request did not arrive in time'] :
        [400, 'EINVAL', `not an HTTP/1.1 request (${error.code ?? error.message})`];
  const text = `${JSON.stringify({ error: { code, message } } satisfies ControlErrorBody)}\n`;
  const head = `HTTP/1.1 ${status} ${http.STATUS_CODES[status] ?? ''}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(text)}\r\nconnection: close\r\n\r\n`;
  socket.end(`${head}${text}`, () => { socket.destroy(); });
}
