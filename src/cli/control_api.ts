// The control socket's API, shared by the server (control.ts) and the client
// (control_client.ts): HTTP/1.1 with JSON bodies on a Unix socket, so that any HTTP client
// speaks it — `curl --unix-socket /run/pcache.ctl http://localhost/status`.
//
//   GET   /          the service, its version and these routes
//   GET   /status    the server's status (computed from memory at once, never waits for a drain)
//   POST  /drain     answers once everything written before the request is on the backing
//                    device, synced: {"drained":true} (the connection stays open meanwhile)
//   GET   /settings  every setting and its value
//   PATCH /settings  a JSON object of name: value, applied all together or none; answers every
//                    setting's value afterwards ({} changes nothing)
//   POST  /invalidate  drops every clean cached copy (dirty data stays): {"droppedBytes":N}
//   POST  /detach    writes everything back, drops every clean copy, marks the cache detached
//                    and stops the server: {"detached":true}
//   POST  /checkpoint  writes back everything the log held durably at the request and holds
//                    writeback there for as long as the connection stays open: once held, the
//                    answer's head and a first line {"held":{"seq":N,"lsn":N,"time":"..."}} are
//                    sent (application/x-ndjson) and the answer stays open; closing the
//                    connection releases the hold (a client that dies releases it too)
//   GET   /volumes   the volumes of a server that serves a cache device's volumes
//   POST  /volumes   adds a volume: {"name","backing","cacheSizeBytes"[,"gcPercent","dataCrc"]};
//                    answers its entry once it is recorded durably and exported
//   POST  /volumes/remove  removes one: {"name"[,"drain","disconnect"]}; answers once its
//                    share is free
//   POST  /volumes/resize  gives one a new share: {"name","cacheSizeBytes"}; writes it back,
//                    formats the share at its new size (clients wait meanwhile, connected)
//
// With volumes, drain, settings, invalidate and checkpoint take `?volume=NAME` (drain without
// it drains every volume; the others need it when there are several).
//
// Success is 200 with the JSON result. A failure is {"error":{"code":"EINVAL","message":"..."}}
// (with "reason" when the engine gave one) and an HTTP status that fits: controlErrorStatus
// for the engine's codes, and the protocol's own below (404, 405, 413, 429, 503...).

import type { PcacheErrorCode } from '../lib/errors.js';

export type ControlMethod = 'GET' | 'POST' | 'PATCH';

/** What the client asks for; each is one route. */
export type ControlOp = 'routes' | 'status' | 'drain' | 'settings' | 'set' | 'invalidate' | 'detach' | 'checkpoint' | 'volumes' | 'volumeAdd' | 'volumeRemove' | 'volumeResize';

export interface ControlRoute {
  readonly method: ControlMethod;
  readonly path: string;
  readonly summary: string;
  /** What a client's messages call the request: the pcache command that sends it. */
  readonly command: string;
}

export const controlRoutes: Readonly<Record<ControlOp, ControlRoute>> = {
  routes: { method: 'GET', path: '/', summary: 'the service, its version and its routes', command: 'GET /' },
  status: { method: 'GET', path: '/status', summary: "the server's status (answered at once, even during a drain)", command: 'status' },
  drain: { method: 'POST', path: '/drain', summary: 'write back everything written before the request; answers when the backing device holds it, synced', command: 'drain' },
  settings: { method: 'GET', path: '/settings', summary: 'every setting and its value', command: 'set' },
  set: { method: 'PATCH', path: '/settings', summary: 'change settings: a JSON object of name: value, applied all together or none', command: 'set' },
  invalidate: { method: 'POST', path: '/invalidate', summary: 'drop every clean cached copy (dirty data stays); answers the bytes dropped', command: 'invalidate' },
  checkpoint: { method: 'POST', path: '/checkpoint', summary: 'write back what the log held durably and hold the backing device there while the connection stays open (a snapshot)', command: 'checkpoint' },
  detach: { method: 'POST', path: '/detach', summary: 'write everything back, drop every clean copy, mark the cache detached and stop the server', command: 'detach' },
  volumes: { method: 'GET', path: '/volumes', summary: 'the volumes served from the cache device', command: 'volume list' },
  volumeAdd: { method: 'POST', path: '/volumes', summary: 'add a volume: {"name","backing","cacheSizeBytes"[,"gcPercent","dataCrc"]}; answers once it is recorded and exported', command: 'volume add' },
  volumeRemove: { method: 'POST', path: '/volumes/remove', summary: 'remove a volume: {"name"[,"drain","disconnect"]}; answers once its share is free', command: 'volume remove' },
  volumeResize: { method: 'POST', path: '/volumes/resize', summary: 'resize a volume\'s share: {"name","cacheSizeBytes"}; writes it back and formats the share at its new size while its clients wait', command: 'volume resize' },
};

/** The body of every failure. */
export interface ControlErrorBody {
  readonly error: { readonly code: string; readonly message: string; readonly reason?: string };
}

/** The HTTP status of a failure, by its code: the engine's codes, then the protocol's own. */
export const controlErrorStatus: Readonly<Record<string, number>> = {
  EINVAL: 400, // not JSON, not an object, a setting refused
  EPERM: 403, // the settings of a cache served --read-only
  ENOENT: 404, // no such route
  EMETHOD: 405, // the route takes another method (the Allow header lists it)
  ENOTSUP: 409, // served --no-cache: there are no settings; volumes asked of a single-volume server
  E2BIG: 413, // a request body over controlLimits.bodyBytesMax (the connection is closed)
  EBUSY: 429, // more than controlLimits.pendingPerConnectionMax unanswered requests on one connection
  ESHUTDOWN: 503, // the server is stopping
  // Everything else (EIO, ENOSPC, ENODEV, CORRUPT, FOREIGN...): 500, an operating error.
};

/** The HTTP status for a failure with `code`. */
export function httpStatusOf(code: string): number {
  return controlErrorStatus[code] ?? 500;
}

/** The engine's codes a client turns back into a PcacheError of the same code (the protocol's own become EIO). */
export const engineCodes: readonly PcacheErrorCode[] = ['EIO', 'ENOSPC', 'ENODEV', 'EINVAL', 'EPERM', 'ENOTSUP', 'ESHUTDOWN', 'ETIMEDOUT', 'CORRUPT', 'FOREIGN'];

/** The bounds that keep one client from hurting the server or the others. */
export interface ControlLimits {
  /** The longest request body; real ones are a few dozen bytes. */
  readonly bodyBytesMax: number;
  /** The longest request head (request line and headers). */
  readonly headerBytesMax: number;
  readonly connectionsMax: number;
  /** Unanswered requests per connection (drains in progress count; pipelined requests beyond get 429). */
  readonly pendingPerConnectionMax: number;
  /** A connection idle between requests is closed after this long. */
  readonly idleTimeoutMs: number;
  /** The request head must have arrived this long after the connection or the previous request (408 otherwise). */
  readonly headersTimeoutMs: number;
  /** The whole request (head and body) must have arrived this long after it began; answering it may take longer (a drain). */
  readonly requestTimeoutMs: number;
  /** How often the two timeouts above are checked. */
  readonly timeoutCheckIntervalMs: number;
  /** On close: how long answered connections may take to go before they are cut. */
  readonly closeGraceMs: number;
}

export const controlLimits: ControlLimits = {
  bodyBytesMax: 4096,
  headerBytesMax: 8192,
  connectionsMax: 16,
  pendingPerConnectionMax: 4,
  idleTimeoutMs: 60_000,
  headersTimeoutMs: 10_000,
  requestTimeoutMs: 30_000,
  timeoutCheckIntervalMs: 1000,
  closeGraceMs: 1000,
};
