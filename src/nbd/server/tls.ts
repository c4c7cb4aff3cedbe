// TLS for the NBD server: the credentials it serves with (X.509 certificates or pre-shared
// keys, in nbdkit's layouts: src/lib/tls_credentials.ts reads them), and the upgrade of one
// accepted connection once its STARTTLS has been acknowledged (connection.ts drives it; the
// handshake codec decides when, protocol/handshake_server.ts).
//
// How a connection is upgraded: node's tls.Server applies a server's TLS policy (client
// certificates requested and checked against the CA and the CRL, the handshake time limit,
// PSK lookup) to sockets it is handed through its 'connection' event, the documented way to
// give a server a socket that is already connected. A TLSSocket built by hand skips that
// check: node verifies a server's peer only in tls.Server's own 'secure' handler. So each
// upgrade hands the plaintext socket to a tls.Server of its own, which is never listening and
// serves exactly that one socket, so that its 'secureConnection' or 'tlsClientError' can only
// be about it. Building one costs about 1.5 ms of CPU (an SSL_CTX, the key parsed), less than
// the handshake's own public-key operations, once per connection.
//
// Invariants:
// - The credentials are checked when ServerTls is built (a PcacheError 'EINVAL' then), so an
//   upgrade can fail only because of the client or the network, never because of our files.
// - upgrade() calls `done` exactly once: with the TLS socket once the handshake succeeded and
//   the client passed the checks (certificate with verifyPeer, key with PSK), or with the
//   reason it did not. A failed upgrade leaves the plaintext socket destroyed.
// - Nothing here writes to the plaintext socket: the STARTTLS acknowledgement has been handed to
//   it before, and node orders the TLS bytes after it.

import type net from 'node:net';
import tls from 'node:tls';
import { PcacheError } from '../../lib/errors.js';
import type { CertificateFiles } from '../../lib/tls_credentials.js';
import { tlsErrorReason } from '../../lib/tls_errors.js';

/**
 * Pre-TLS 1.3 PSK cipher suites, with forward secrecy and AEAD, for clients that cannot do TLS
 * 1.3 (OpenSSL leaves PSK suites out by default). TLS 1.3 clients use its own suites.
 */
const tls12PskCiphers = 'ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:DHE-PSK-CHACHA20-POLY1305';

export type NbdServerTlsCredentials =
  /** Certificates; with verifyPeer a client must present one signed by the CA (and not revoked). */
  | { readonly kind: 'x509'; readonly files: CertificateFiles; readonly verifyPeer: boolean }
  /** Pre-shared keys by username: a client must prove it holds one of them. */
  | { readonly kind: 'psk'; readonly keys: ReadonlyMap<string, Uint8Array> };

export interface NbdServerTls {
  /** 'on': a client may upgrade; 'require': it must, before anything else (handshake_server.ts). */
  readonly mode: 'on' | 'require';
  readonly credentials: NbdServerTlsCredentials;
}

/** A TLS handshake that failed, for the server's owner to log. */
export interface NbdTlsFailure {
  /** Who: `HOST:PORT`, or `unix socket` (a Unix socket has no peer address). */
  readonly peer: string;
  /** Why, in words: a rejected certificate, an unknown PSK username, what the TLS library said. */
  readonly reason: string;
}

export type TlsUpgradeResult =
  | { readonly ok: true; readonly socket: tls.TLSSocket }
  | { readonly ok: false; readonly reason: string };

export class ServerTls {
  readonly mode: 'on' | 'require';
  private readonly credentials: NbdServerTlsCredentials;
  private readonly options: tls.TlsOptions;

  constructor(config: NbdServerTls, handshakeTimeoutMs: number) {
    this.mode = config.mode;
    this.credentials = config.credentials;
    this.options = serverOptions(config.credentials, handshakeTimeoutMs);
  }

  /**
   * Runs the server side of a TLS handshake on `plain`, an accepted socket whose STARTTLS was
   * just acknowledged, and reports the outcome once to `done`.
   */
  upgrade(plain: net.Socket, done: (result: TlsUpgradeResult) => void): void {
    const credentials = this.credentials;
    let pskUsername: string | undefined;
    const options: tls.TlsOptions = credentials.kind === 'psk'
      ? {
        ...this.options,
        pskCallback: (_socket, identity) => {
          pskUsername = identity;
          const key = credentials.keys.get(identity);
          // null: OpenSSL refuses the identity (unknown_psk_identity, or a failed TLS 1.3 handshake).
          return key === undefined ? null : key;
        },
      }
      : this.options;
    const server = new tls.Server(options);
    let settled = false;
    const finish = (result: TlsUpgradeResult): void => {
      if (settled) return;
      settled = true;
      done(result);
    };
    // A client that shuts its side during the handshake can never finish it: without half-open
    // the TLS socket ends at once and the failure is reported now, not at the time limit. The
    // TLS socket takes the setting from the plaintext one; it gets the server's back after the
    // handshake (a client may half-close after its last request and still read the replies).
    const halfOpen = plain.allowHalfOpen;
    plain.allowHalfOpen = false;
    server.on('secureConnection', (socket: tls.TLSSocket) => {
      socket.allowHalfOpen = halfOpen;
      finish({ ok: true, socket });
    });
    server.on('tlsClientError', (error: Error, socket: tls.TLSSocket) => {
      finish({ ok: false, reason: failureReason(error, socket, credentials, pskUsername) });
      socket.destroy();
      plain.destroy();
    });
    server.emit('connection', plain);
  }
}

/**
 * Checks that `config`'s credentials make a TLS server (a PcacheError 'EINVAL' when not), so a
 * caller can refuse them before it opens anything else.
 */
export function checkServerTls(config: NbdServerTls): void {
  serverOptions(config.credentials, 1);
}

/** node's TLS server options for the credentials, checked by building a context from them. */
function serverOptions(credentials: NbdServerTlsCredentials, handshakeTimeoutMs: number): tls.TlsOptions {
  const common: tls.TlsOptions = { handshakeTimeout: handshakeTimeoutMs, minVersion: 'TLSv1.2' };
  let options: tls.TlsOptions;
  if (credentials.kind === 'x509') {
    const files = credentials.files;
    if (files.cert === undefined || files.key === undefined) throw new PcacheError('EINVAL', `${files.dir}: a TLS server needs its certificate and key`);
    options = {
      ...common,
      cert: files.cert,
      key: files.key,
      ca: files.ca,
      ...(files.crl === undefined ? {} : { crl: files.crl }),
      requestCert: credentials.verifyPeer,
      rejectUnauthorized: credentials.verifyPeer,
    };
  } else {
    if (credentials.keys.size === 0) throw new PcacheError('EINVAL', 'a TLS-PSK server needs at least one key');
    options = { ...common, ciphers: pskCiphers(), dhparam: 'auto' };
  }
  try {
    tls.createSecureContext(options);
  } catch (error) {
    const where = credentials.kind === 'x509' ? credentials.files.dir : 'the PSK keys';
    throw new PcacheError('EINVAL', `${where}: the TLS credentials cannot be used: ${tlsErrorReason(error)}`, { cause: error });
  }
  return options;
}

/** Why a handshake failed, for a log line that lets an operator act on it. */
function failureReason(error: Error, socket: tls.TLSSocket, credentials: NbdServerTlsCredentials, pskUsername: string | undefined): string {
  // A client certificate that fails verification: node's tls.Server destroys the socket without
  // an error and says why in authorizationError (an OpenSSL code such as CERT_HAS_EXPIRED).
  const authorization = socket.authorizationError as Error | string | null | undefined;
  if (authorization !== null && authorization !== undefined) {
    const code = typeof authorization === 'string' ? authorization : authorization.message;
    return `client certificate rejected (${code})`;
  }
  const hungUp = (error as NodeJS.ErrnoException).code === 'ECONNRESET';
  if (credentials.kind === 'psk') {
    if (pskUsername === undefined) {
      return hungUp
        ? 'the client closed the connection during the TLS handshake'
        : `the client offered no pre-shared key (this server authenticates clients by PSK): ${tlsErrorReason(error)}`;
    }
    if (!credentials.keys.has(pskUsername)) return `unknown PSK username '${pskUsername}'`;
    return `TLS handshake with PSK username '${pskUsername}' failed (wrong key?): ${tlsErrorReason(error)}`;
  }
  if (hungUp) return 'the client closed the connection during the TLS handshake (did it reject the server\'s certificate?)';
  return `TLS handshake failed: ${tlsErrorReason(error)}`;
}

/**
 * The cipher list of a PSK session: TLS 1.3's suites as node orders them, then the pre-1.3
 * PSK suites. node's default list ends in !PSK, which no later entry can undo.
 */
function pskCiphers(): string {
  const tls13 = tls.DEFAULT_CIPHERS.split(':').filter((suite) => suite.startsWith('TLS_'));
  return [...tls13, tls12PskCiphers].join(':');
}
