// Opening an NBD client connection: the socket (TCP or Unix), then the handshake in
// protocol/handshake_client.ts, with a TLS upgrade in the middle when the URI asked for TLS
// (STARTTLS first, then the TLS handshake with the credentials of client/tls.ts, then the rest
// of the negotiation inside TLS), all under one time limit; and the limits the open connection
// will run under. What comes out is a negotiated session, which NbdClient (client.ts) takes over.
//
// Invariants:
// - Every failure is a PcacheError: 'ENODEV' when nothing answers, the time limit passes or
//   the server hangs up, the handshake's own code when negotiation fails, 'EPERM' when TLS
//   refuses (a certificate, a key: client/tls.ts). A socket we gave up on is destroyed and its
//   later errors are swallowed: no server can crash the process.
// - With TLS, nothing but the client flags and STARTTLS is sent in plaintext, and nothing the
//   server sends in plaintext after its ACK is read (the codec fails on it); the session's
//   socket is then the TLS socket.
// - The session is handed over synchronously, in the 'data' callback that completed the
//   handshake, after our listeners are gone and before anything more is read: bytes that came
//   right behind the handshake's last reply wait in the session's input.
// - TCP sockets use TCP_NODELAY (small requests must not wait for Nagle) and keepalive.
// - Limits are checked before anything is opened; a bad one throws at once.

import net from 'node:net';
import tls from 'node:tls';
import { assert } from '../../lib/assert.js';
import { PcacheError } from '../../lib/errors.js';
import { MiB } from '../../lib/units.js';
import type { ByteQueue } from '../protocol/bytes.js';
import { ClientHandshake, type ExportInfo } from '../protocol/handshake_client.js';
import { tlsFailure, tlsFailureCode, tlsHangup, type ClientTls } from './tls.js';
import { describeAddress, type NbdAddress } from './uri.js';

export interface NbdClientLimits {
  /** Connecting and negotiating together must finish within this time. */
  readonly connectTimeoutMs: number;
  /** A request without a reply for this long means the server is gone (0: wait forever). */
  readonly requestTimeoutMs: number;
  /** Pieces on the wire at once on this connection. */
  readonly inFlightRequestsMax: number;
  /** READ/WRITE bytes on the wire at once on this connection (one piece is always admitted when nothing else is in flight). */
  readonly inFlightBytesMax: number;
  /** Pieces waiting for room on the wire; beyond this requests fail with EIO. */
  readonly queuedRequestsMax: number;
  /** disconnect() waits this long for requests in flight before it cuts them off. */
  readonly closeTimeoutMs: number;
}

export const defaultClientLimits: NbdClientLimits = {
  connectTimeoutMs: 10_000,
  requestTimeoutMs: 60_000,
  inFlightRequestsMax: 64,
  inFlightBytesMax: 64 * MiB,
  queuedRequestsMax: 8192,
  closeTimeoutMs: 5_000,
};

export interface NbdClientOptions {
  readonly exportName: string;
  /** Ask for structured replies (default true); the server may still refuse. */
  readonly structuredReplies?: boolean;
  readonly limits?: Partial<NbdClientLimits>;
  /** Upgrade to TLS with these credentials (STARTTLS first); without it the connection stays plaintext. */
  readonly tls?: ClientTls;
}

/** A connection whose handshake has succeeded, ready for transmission. */
export interface NbdSession {
  /** The TLS socket when the connection was upgraded. */
  readonly socket: net.Socket;
  readonly info: ExportInfo;
  /** The handshake's input queue: bytes received after its last reply are already in it. */
  readonly input: ByteQueue;
  readonly limits: NbdClientLimits;
  /** Where this connection goes, for messages. */
  readonly where: string;
}

/**
 * Connects and negotiates; resolves with what `open` makes of the session, or rejects with a
 * PcacheError saying why there is none. `open` runs synchronously once the handshake is done.
 */
export function connectSession<T>(address: NbdAddress, options: NbdClientOptions, open: (session: NbdSession) => T): Promise<T> {
  const limits = { ...defaultClientLimits, ...options.limits };
  checkLimits(limits);
  const where = describeAddress(address);
  return new Promise((resolve, reject) => {
    const plain = address.kind === 'unix'
      ? net.connect({ path: address.socketPath })
      : net.connect({ host: address.host, port: address.port, noDelay: true, keepAlive: true, keepAliveInitialDelay: 10_000 });
    /** The socket negotiation goes on: the plaintext one, then the TLS one. */
    let socket: net.Socket = plain;
    let upgrading = false;
    /** The server has said something inside TLS (so it accepted our credentials). */
    let repliedInsideTls = false;
    const handshake = new ClientHandshake({
      exportName: options.exportName,
      requestStructuredReplies: options.structuredReplies ?? true,
      startTls: options.tls !== undefined,
    });
    let settled = false;
    const cleanup = (): void => {
      settled = true;
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('error', onTlsError);
      socket.off('close', onClose);
    };
    const fail = (error: PcacheError): void => {
      if (settled) return;
      cleanup();
      // Later errors of a socket we gave up on must not become uncaught exceptions.
      socket.on('error', () => undefined);
      plain.on('error', () => undefined);
      socket.destroy();
      plain.destroy();
      reject(error);
    };
    const timer = setTimeout(() => {
      fail(new PcacheError('ENODEV', `${where}: no NBD session after ${limits.connectTimeoutMs} ms`));
    }, limits.connectTimeoutMs);
    const onError = (error: NodeJS.ErrnoException): void => {
      // Over TLS, the server may refuse our certificate or key only after our side of the
      // handshake finished (TLS 1.3): with an alert, or by hanging up before any reply.
      if (socket !== plain && options.tls !== undefined) {
        if (tlsFailureCode(error) === 'EPERM') return fail(tlsFailure(where, error, options.tls));
        if (!repliedInsideTls) return fail(tlsHangup(where, options.tls, error.message));
      }
      fail(new PcacheError('ENODEV', `cannot connect to ${where}: ${error.message}`, { cause: error }));
    };
    const onTlsError = (error: NodeJS.ErrnoException): void => {
      if (upgrading && options.tls !== undefined) fail(tlsFailure(where, error, options.tls));
      else onError(error);
    };
    const onClose = (): void => {
      if (socket !== plain && options.tls !== undefined && !upgrading && !repliedInsideTls) return fail(tlsHangup(where, options.tls, 'no reply'));
      const hint = handshake.status.kind === 'negotiating' ? ' (unknown export name, or too many connections?)' : '';
      fail(new PcacheError('ENODEV', `${where}: the server closed the connection during the ${upgrading ? 'TLS ' : ''}handshake${hint}`));
    };
    const onData = (chunk: Buffer): void => {
      if (socket !== plain) repliedInsideTls = true;
      const out: Uint8Array[] = [];
      const verdict = handshake.push(chunk, out);
      for (const bytes of out) socket.write(bytes);
      if (verdict.kind === 'failed') {
        fail(new PcacheError(verdict.code, `${where}: ${verdict.reason}`));
      } else if (verdict.kind === 'starttls') {
        startTls();
      } else if (verdict.kind === 'ready') {
        cleanup();
        resolve(open({ socket, info: verdict.info, input: handshake.input, limits, where }));
      }
    };
    /** The server acknowledged STARTTLS: the TLS handshake, then negotiation inside TLS. */
    const startTls = (): void => {
      const credentials = options.tls;
      assert(credentials !== undefined, 'STARTTLS acknowledged without TLS credentials');
      upgrading = true;
      plain.off('data', onData);
      plain.off('close', onClose);
      plain.off('error', onError);
      // node reports the plaintext socket's failures through the TLS socket from now on.
      plain.on('error', () => undefined);
      const secure = tls.connect({ ...credentials.connectOptions(address.kind === 'tcp' ? address.host : undefined), socket: plain });
      socket = secure;
      secure.on('error', onTlsError);
      secure.on('close', onClose);
      secure.once('secureConnect', () => {
        upgrading = false;
        secure.on('data', onData);
        const out: Uint8Array[] = [];
        handshake.tlsStarted(out);
        for (const bytes of out) secure.write(bytes);
      });
    };
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('close', onClose);
  });
}

function checkLimits(limits: NbdClientLimits): void {
  const positive: (keyof NbdClientLimits)[] = [
    'connectTimeoutMs', 'inFlightRequestsMax', 'inFlightBytesMax', 'queuedRequestsMax', 'closeTimeoutMs',
  ];
  for (const key of positive) {
    if (!Number.isSafeInteger(limits[key]) || limits[key] <= 0) {
      throw new PcacheError('EINVAL', `NBD client limit ${key} must be a positive integer`);
    }
  }
  if (!Number.isSafeInteger(limits.requestTimeoutMs) || limits.requestTimeoutMs < 0) {
    throw new PcacheError('EINVAL', 'NBD client limit requestTimeoutMs must be 0 (none) or a positive integer');
  }
}
