// The control socket: a local Unix socket on which a running `pcache serve` answers `status`,
// `drain` and `set`, and the client that `pcache status --control`, `drain` and `set` use.
//
// Protocol, version 1 (controlProtocolVersion): newline-delimited JSON, one object per line.
//   request   {"v":1,"id":7,"op":"status"}          op: "hello" | "status" | "drain" | "set"
//             {"v":1,"id":8,"op":"set","settings":{"gc_percent":50}}   (empty: list them)
//   success   {"v":1,"id":7,"ok":true,"result":...}
//   failure   {"v":1,"id":7,"ok":false,"error":{"code":"EINVAL","message":"..."}}
// `id` (a number or a string) is echoed; replies may come out of order, because `status` is
// answered at once even while a `drain` on the same connection is still running. A request
// with another `v` gets an EPROTO error naming the version spoken here.
//
// Invariants (one bad client cannot hurt the server or the other clients):
// - a request line longer than controlRequestBytesMax gets an error and the connection is
//   closed (its framing can no longer be trusted); nothing longer is ever buffered;
// - at most controlConnectionsMax connections, each with at most controlPendingMax
//   unanswered requests; an idle connection (nothing pending) is closed after
//   controlIdleTimeoutMs; socket errors end that connection only;
// - `status` is computed synchronously from memory: it never waits for a drain, a device,
//   or another client.

import fs from 'node:fs';
import net from 'node:net';
import { assert } from '../lib/assert.js';
import { PcacheError, isPcacheError, type PcacheErrorCode } from '../lib/errors.js';
import { prepareSocketPath } from '../nbd/server/server.js';

export const controlProtocolVersion = 1;
/** Longest request line accepted; real requests are a few dozen bytes. */
export const controlRequestBytesMax = 4096;
export const controlConnectionsMax = 16;
/** Unanswered requests per connection (drains in progress count). */
export const controlPendingMax = 4;
export const controlIdleTimeoutMs = 60_000;
/** How long the client waits for an answer to anything but drain. */
const clientTimeoutMs = 10_000;

export type ControlOp = 'hello' | 'status' | 'drain' | 'set';
const controlOps: readonly ControlOp[] = ['hello', 'status', 'drain', 'set'];

export interface ControlHandlers {
  /** The server's state, computed synchronously. */
  status(): unknown;
  /** Resolves once everything written before the call is on the backing device, synced. */
  drain(): Promise<void>;
  /**
   * Applies `{name: value}` changes all together or none (an empty object changes nothing) and
   * resolves to every setting's value afterwards; refuses with a PcacheError.
   */
  set(changes: Readonly<Record<string, unknown>>): Promise<unknown>;
}

interface Reply {
  readonly v: number;
  readonly id: number | string | null;
  readonly ok: boolean;
  readonly result?: unknown;
  readonly error?: { readonly code: string; readonly message: string };
}

export class ControlServer {
  private readonly handlers: ControlHandlers;
  private readonly listener: net.Server;
  private readonly connections = new Set<ControlConnection>();
  private path: string | undefined;
  private closing = false;

  constructor(handlers: ControlHandlers) {
    this.handlers = handlers;
    // allowHalfOpen: a client that shuts down its sending side still gets its pending answers.
    this.listener = net.createServer({ allowHalfOpen: true }, (socket) => { this.accept(socket); });
    this.listener.maxConnections = controlConnectionsMax;
    this.listener.on('error', () => undefined); // accept failures concern one client only
  }

  /** Listens on `path` (a stale socket left by a killed server is replaced); only this user may connect. */
  async listen(path: string): Promise<void> {
    assert(this.path === undefined, 'listen called twice');
    await prepareSocketPath(path);
    await new Promise<void>((resolve, reject) => {
      const onError = (error: Error): void => { reject(new PcacheError('EINVAL', `cannot listen on ${path}: ${error.message}`, { cause: error })); };
      this.listener.once('error', onError);
      this.listener.listen(path, () => {
        this.listener.off('error', onError);
        resolve();
      });
    });
    this.path = path;
    fs.chmodSync(path, 0o600);
  }

  /** Stops listening; requests still pending are answered with ESHUTDOWN; every connection closes. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const closed = new Promise<void>((resolve) => {
      if (this.listener.listening) this.listener.close(() => { resolve(); });
      else resolve();
    });
    for (const connection of [...this.connections]) connection.shutdown();
    await closed;
  }

  get stopping(): boolean {
    return this.closing;
  }

  forget(connection: ControlConnection): void {
    this.connections.delete(connection);
  }

  run(op: string, request: { readonly settings?: unknown }): { now: unknown } | { later: Promise<unknown> } {
    switch (op) {
      case 'hello':
        return { now: { protocol: controlProtocolVersion, ops: controlOps } };
      case 'status':
        return { now: this.handlers.status() };
      case 'drain':
        return { later: this.handlers.drain().then(() => ({ drained: true })) };
      case 'set': {
        const settings = request.settings === undefined ? {} : request.settings;
        if (typeof settings !== 'object' || settings === null || Array.isArray(settings)) {
          throw new ControlError('EINVAL', 'set takes "settings": an object of name: value');
        }
        return { later: this.handlers.set(settings as Record<string, unknown>) };
      }
      default:
        throw new ControlError('EINVAL', `unknown op ${JSON.stringify(op)} (ops: ${controlOps.join(', ')})`);
    }
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    this.connections.add(new ControlConnection(socket, this));
  }
}

/** An error answered to the client (not an operating error of the cache). */
class ControlError extends Error {
  readonly code: string;

  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

class ControlConnection {
  private readonly socket: net.Socket;
  private readonly server: ControlServer;
  private buffered = '';
  /** Unanswered requests: sequence number -> the client's id. */
  private readonly pending = new Map<number, number | string | null>();
  private sequence = 0;
  private ended = false;
  private idleTimer: NodeJS.Timeout | undefined;

  constructor(socket: net.Socket, server: ControlServer) {
    this.socket = socket;
    this.server = server;
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => { this.onData(chunk); });
    socket.on('end', () => { this.endWhenIdle(); });
    socket.on('error', () => undefined); // 'close' follows
    socket.on('close', () => {
      this.ended = true;
      clearTimeout(this.idleTimer);
      server.forget(this);
    });
    this.armIdleTimer();
  }

  /** The server is stopping: answer what is pending with ESHUTDOWN, then close. */
  shutdown(): void {
    for (const id of this.pending.values()) this.fail(id, new ControlError('ESHUTDOWN', 'the server is stopping'));
    this.pending.clear();
    this.ended = true;
    this.socket.end();
    setTimeout(() => { this.socket.destroy(); }, 1000).unref();
  }

  private onData(chunk: string): void {
    if (this.ended) return;
    this.buffered += chunk;
    let newline = this.buffered.indexOf('\n');
    while (newline >= 0 && this.open()) {
      const line = this.buffered.slice(0, newline);
      this.buffered = this.buffered.slice(newline + 1);
      if (line.trim() !== '') this.handle(line);
      newline = this.buffered.indexOf('\n');
    }
    if (this.buffered.length > controlRequestBytesMax) {
      this.send({ v: controlProtocolVersion, id: null, ok: false, error: { code: 'E2BIG', message: `request longer than ${controlRequestBytesMax} bytes` } });
      this.buffered = '';
      this.ended = true;
      this.socket.end();
    }
  }

  /** Whether requests are still read (a method, so the check is redone after each request). */
  private open(): boolean {
    return !this.ended;
  }

  private handle(line: string): void {
    if (line.length > controlRequestBytesMax) {
      this.fail(null, new ControlError('E2BIG', `request longer than ${controlRequestBytesMax} bytes`));
      return;
    }
    let request: unknown;
    try {
      request = JSON.parse(line);
    } catch {
      this.fail(null, new ControlError('EINVAL', 'a request must be one JSON object per line'));
      return;
    }
    if (typeof request !== 'object' || request === null || Array.isArray(request)) {
      this.fail(null, new ControlError('EINVAL', 'a request must be a JSON object'));
      return;
    }
    const fields = request as { v?: unknown; id?: unknown; op?: unknown; settings?: unknown };
    const id = typeof fields.id === 'number' || typeof fields.id === 'string' ? fields.id : null;
    if (fields.v !== controlProtocolVersion) {
      this.fail(id, new ControlError('EPROTO', `unsupported protocol version ${JSON.stringify(fields.v)}; this server speaks ${controlProtocolVersion}`));
      return;
    }
    if (this.pending.size >= controlPendingMax) {
      this.fail(id, new ControlError('EBUSY', `more than ${controlPendingMax} requests pending on this connection`));
      return;
    }
    if (this.server.stopping) {
      this.fail(id, new ControlError('ESHUTDOWN', 'the server is stopping'));
      return;
    }
    let outcome: { now: unknown } | { later: Promise<unknown> };
    try {
      outcome = this.server.run(typeof fields.op === 'string' ? fields.op : String(fields.op), fields);
    } catch (error) {
      this.fail(id, error);
      return;
    }
    if ('now' in outcome) {
      this.send({ v: controlProtocolVersion, id, ok: true, result: outcome.now });
      return;
    }
    const sequence = ++this.sequence;
    this.pending.set(sequence, id);
    clearTimeout(this.idleTimer);
    outcome.later.then(
      (result) => { if (this.settled(sequence)) this.send({ v: controlProtocolVersion, id, ok: true, result }); },
      (error: unknown) => { if (this.settled(sequence)) this.fail(id, error); },
    );
  }

  /** Forgets a pending request; false when it was already answered (by shutdown). */
  private settled(sequence: number): boolean {
    const known = this.pending.delete(sequence);
    this.armIdleTimer();
    if (this.ended && this.pending.size === 0) this.socket.end();
    return known;
  }

  private fail(id: number | string | null, error: unknown): void {
    if (!(error instanceof ControlError) && !isPcacheError(error)) throw error;
    this.send({ v: controlProtocolVersion, id, ok: false, error: { code: error.code, message: error.message } });
  }

  private send(reply: Reply): void {
    if (this.socket.destroyed || !this.socket.writable) return;
    this.socket.write(`${JSON.stringify(reply)}\n`);
  }

  private endWhenIdle(): void {
    this.ended = true;
    if (this.pending.size === 0) this.socket.end();
  }

  private armIdleTimer(): void {
    clearTimeout(this.idleTimer);
    if (this.pending.size > 0 || this.socket.destroyed) return;
    this.idleTimer = setTimeout(() => { this.socket.destroy(); }, controlIdleTimeoutMs);
    this.idleTimer.unref();
  }
}

const knownCodes: readonly PcacheErrorCode[] = ['EIO', 'ENOSPC', 'ENODEV', 'EINVAL', 'EPERM', 'ENOTSUP', 'ESHUTDOWN', 'ETIMEDOUT', 'CORRUPT', 'FOREIGN'];

/**
 * Sends one request to the control socket at `path` and returns its result. Failures are
 * PcacheErrors with a one-line message: no server there, the server refused, or no answer
 * within `timeoutMs` (default 10 s; undefined for drain means wait as long as it takes).
 */
export function controlRequest(
  path: string,
  op: ControlOp,
  timeoutMs: number | undefined = op === 'drain' ? undefined : clientTimeoutMs,
  params: Readonly<Record<string, unknown>> = {},
): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(path);
    let buffered = '';
    let done = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = (error: PcacheError | undefined, result?: unknown): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      if (error !== undefined) reject(error);
      else resolve(result);
    };
    if (timeoutMs !== undefined) {
      timer = setTimeout(() => { finish(new PcacheError('ETIMEDOUT', `no answer to ${op} from ${path} within ${timeoutMs / 1000} s`)); }, timeoutMs);
    }
    socket.setEncoding('utf8');
    socket.on('connect', () => { socket.write(`${JSON.stringify({ ...params, v: controlProtocolVersion, id: 1, op })}\n`); });
    socket.on('error', (error: NodeJS.ErrnoException) => { finish(connectError(path, error)); });
    socket.on('close', () => { finish(new PcacheError('EIO', `the server at ${path} closed the connection without answering ${op}`)); });
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      const newline = buffered.indexOf('\n');
      if (newline < 0) return;
      let reply: Reply;
      try {
        reply = JSON.parse(buffered.slice(0, newline)) as Reply;
      } catch {
        finish(new PcacheError('EIO', `${path} answered something that is not JSON; is it a pcache control socket?`));
        return;
      }
      if (reply.ok) {
        finish(undefined, reply.result);
        return;
      }
      const code = knownCodes.find((known) => known === reply.error?.code) ?? 'EIO';
      finish(new PcacheError(code, `the server refused ${op}: ${reply.error?.message ?? 'no reason given'}`));
    });
  });
}

function connectError(path: string, error: NodeJS.ErrnoException): PcacheError {
  if (error.code === 'ENOENT') return new PcacheError('ENODEV', `no control socket at ${path} (is \`pcache serve --control ${path}\` running?)`);
  if (error.code === 'ECONNREFUSED') return new PcacheError('ENODEV', `nothing answers on ${path}: the server that made it is not running`);
  if (error.code === 'EACCES') return new PcacheError('EPERM', `not allowed to connect to ${path} (it belongs to the user running the server)`);
  return new PcacheError('EIO', `cannot talk to ${path}: ${error.message}`);
}
