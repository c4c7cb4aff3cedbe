// The control socket's client, which `pcache status --control`, `drain` and `set` are thin
// wrappers of: one HTTP request on its own connection to the routes of control_api.ts.
//
// Every failure is a PcacheError with a one-line message: no server there (ENODEV), not
// allowed (EPERM), the server refused (its code, for the engine's codes; EIO for the
// protocol's own), something that is not a pcache control socket (EIO), or no answer in time
// (ETIMEDOUT).

import http from 'node:http';
import { PcacheError } from '../lib/errors.js';
import { controlRoutes, engineCodes, type ControlErrorBody, type ControlOp, type ControlRoute } from './control_api.js';

/** How long the client waits for an answer to anything but drain. */
const defaultTimeoutMs = 10_000;
/** The largest answer read; a status is a few KiB. */
const answerBytesMax = 1 << 20;

export interface ControlRequestOptions {
  /** Give up after this long (ETIMEDOUT); undefined waits as long as it takes. Default: 10 s, and no limit for drain. */
  readonly timeoutMs?: number | undefined;
  /** The JSON body (PATCH /settings). */
  readonly body?: unknown;
  /** The volume the request is for (`?volume=NAME`), on a server of several. */
  readonly volume?: string | undefined;
}

/** The route's path, for one volume (`?volume=NAME`) when given. */
function routePath(route: ControlRoute, volume: string | undefined): string {
  return volume === undefined ? route.path : `${route.path}?volume=${encodeURIComponent(volume)}`;
}

/** Sends `op` to the control socket at `path` and resolves to the server's JSON answer. */
export function controlRequest(path: string, op: ControlOp, options: ControlRequestOptions = {}): Promise<unknown> {
  const route = controlRoutes[op];
  const what = route.command;
  const timeoutMs = 'timeoutMs' in options ? options.timeoutMs : op === 'drain' || op === 'detach' ? undefined : defaultTimeoutMs;
  const payload = options.body === undefined ? undefined : JSON.stringify(options.body);
  return new Promise((resolve, reject) => {
    let done = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = (error: PcacheError | undefined, result?: unknown): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      request.destroy();
      if (error !== undefined) reject(error);
      else resolve(result);
    };
    const headers: Record<string, string> = { host: 'localhost', accept: 'application/json' };
    if (payload !== undefined) Object.assign(headers, { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(payload)) });
    const target = routePath(route, options.volume);
    const request = http.request({ socketPath: path, method: route.method, path: target, headers, agent: false }, (response) => {
      const chunks: Buffer[] = [];
      let bytes = 0;
      response.on('data', (chunk: Buffer) => {
        bytes += chunk.length;
        if (bytes > answerBytesMax) finish(new PcacheError('EIO', `${path} answered ${what} with more than ${answerBytesMax} bytes; is it a pcache control socket?`));
        else chunks.push(chunk);
      });
      response.on('error', () => undefined); // the request's 'error' reports it
      response.on('end', () => {
        let answer: unknown;
        try {
          answer = JSON.parse(Buffer.concat(chunks).toString('utf8'));
        } catch {
          finish(new PcacheError('EIO', `${path} answered ${what} with something that is not JSON; is it a pcache control socket?`));
          return;
        }
        if (response.statusCode === 200) finish(undefined, answer);
        else finish(refusal(what, response.statusCode, answer));
      });
    });
    if (timeoutMs !== undefined) {
      timer = setTimeout(() => { finish(new PcacheError('ETIMEDOUT', `no answer to ${what} from ${path} within ${timeoutMs / 1000} s`)); }, timeoutMs);
    }
    request.on('error', (error: NodeJS.ErrnoException) => { finish(connectError(path, what, error)); });
    request.end(payload);
  });
}

/** The PcacheError for a failure answer: the engine's code comes back as itself, the protocol's as EIO. */
function refusal(what: string, status: number | undefined, answer: unknown): PcacheError {
  const error = (answer as Partial<ControlErrorBody> | null)?.error;
  const code = engineCodes.find((known) => known === error?.code) ?? 'EIO';
  const message = typeof error?.message === 'string' ? error.message : `HTTP status ${String(status)}, no reason given`;
  return new PcacheError(code, `the server refused ${what}: ${message}`);
}

function connectError(path: string, what: string, error: NodeJS.ErrnoException): PcacheError {
  const code = error.code ?? '';
  if (code === 'ENOENT') return new PcacheError('ENODEV', `no control socket at ${path} (is \`pcache serve --control ${path}\` running?)`);
  if (code === 'ECONNREFUSED') return new PcacheError('ENODEV', `nothing answers on ${path}: the server that made it is not running`);
  if (code === 'EACCES') return new PcacheError('EPERM', `not allowed to connect to ${path} (it belongs to the user running the server)`);
  if (code === 'ECONNRESET' || code === 'EPIPE') return new PcacheError('EIO', `the server at ${path} closed the connection without answering ${what}`);
  if (code.startsWith('HPE_')) return new PcacheError('EIO', `${path} answered ${what} with something that is not HTTP; is it a pcache control socket?`);
  return new PcacheError('EIO', `cannot talk to ${path}: ${error.message}`);
}

/** Where the server holds the backing device (POST /checkpoint's first line). */
export interface HeldPoint {
  readonly seq: number;
  readonly lsn: number;
  readonly time: string;
}

/**
 * POST /checkpoint: waits until the server holds the backing device, runs `whileHeld`, then
 * closes the connection, which releases the hold. Resolves to whileHeld's result. Fails with
 * ETIMEDOUT after `timeoutMs` (undefined: no limit) if the hold has not come by then, and with
 * EIO if the server let go of the connection before whileHeld was done (the hold may have
 * ended early).
 */
export function controlCheckpoint<T>(path: string, whileHeld: (point: HeldPoint) => Promise<T>, timeoutMs: number | undefined, volume?: string): Promise<T> {
  const route = controlRoutes.checkpoint;
  const what = route.command;
  return new Promise((resolve, reject) => {
    let settled = false;
    let held = false;
    let lost = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = (error: PcacheError | undefined, result?: T): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      request.destroy();
      if (error !== undefined) reject(error);
      else resolve(result as T);
    };
    const target = routePath(route, volume);
    const request = http.request({ socketPath: path, method: route.method, path: target, headers: { host: 'localhost', accept: 'application/x-ndjson', 'content-length': '0' }, agent: false }, (response) => {
      const chunks: Buffer[] = [];
      let bytes = 0;
      response.on('data', (chunk: Buffer) => {
        if (held) return;
        bytes += chunk.length;
        if (bytes > answerBytesMax) {
          finish(new PcacheError('EIO', `${path} answered ${what} with more than ${answerBytesMax} bytes; is it a pcache control socket?`));
          return;
        }
        chunks.push(chunk);
        const text = Buffer.concat(chunks).toString('utf8');
        const newline = text.indexOf('\n');
        if (response.statusCode !== 200 || newline < 0) return;
        const point = (JSON.parse(text.slice(0, newline)) as { held?: HeldPoint } | null)?.held;
        if (typeof point?.seq !== 'number' || typeof point.lsn !== 'number' || typeof point.time !== 'string') {
          finish(new PcacheError('EIO', `${path} answered ${what} with something unexpected`));
          return;
        }
        held = true;
        clearTimeout(timer);
        whileHeld(point).then(
          (result) => {
            if (lost) finish(new PcacheError('EIO', `the server at ${path} let go of the checkpoint before the command was done: the hold may have ended early`));
            else finish(undefined, result);
          },
          (error: unknown) => {
            if (error instanceof PcacheError) finish(error);
            else {
              // Not an operating error: a bug of the caller, passed on as it is.
              settled = true;
              request.destroy();
              reject(error instanceof Error ? error : new Error(String(error)));
            }
          },
        );
      });
      response.on('error', () => undefined); // the request's 'error' (or close) reports it
      response.on('end', () => {
        if (held) {
          lost = true;
          return;
        }
        let answer: unknown;
        try {
          answer = JSON.parse(Buffer.concat(chunks).toString('utf8'));
        } catch {
          finish(new PcacheError('EIO', `${path} answered ${what} with something that is not JSON; is it a pcache control socket?`));
          return;
        }
        finish(refusal(what, response.statusCode, answer));
      });
    });
    if (timeoutMs !== undefined) {
      timer = setTimeout(() => { finish(new PcacheError('ETIMEDOUT', `the backing device did not reach the checkpoint within ${timeoutMs / 1000} s (is it offline? see pcache status)`)); }, timeoutMs);
    }
    request.on('close', () => { if (held) lost = true; });
    request.on('error', (error: NodeJS.ErrnoException) => {
      if (held) lost = true;
      else finish(connectError(path, what, error));
    });
    request.end();
  });
}
