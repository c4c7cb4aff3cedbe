// TLS for the NBD client: what an nbds:// URI's credentials become (read once, when a remote
// device is opened, so that a missing file is an error at start and not at every reconnect),
// and the options of the TLS handshake connect.ts runs after the server acknowledged STARTTLS.
//
// Credentials, as libnbd takes them from a URI (client/uri.ts parses them):
// - tls-psk-file=FILE with the user part as username (the local user name by default, as
//   libnbd does): the key is looked up now; the server's identity is proven by the key.
// - tls-certificates=DIR: ca-cert.pem checks the server's certificate, client-cert.pem and
//   client-key.pem (if there) are presented to a server that asks, ca-crl.pem (if there)
//   revokes. The server's name is checked against tls-hostname=, else the TCP host; over a
//   Unix socket there is no name to check, so only the chain is (libnbd checks nothing there).
// - neither: the server's certificate must chain to a public CA (node's bundled store) and
//   carry the host's name.
// - tls-verify-peer=false: the server's certificate is not checked at all (encryption
//   without authentication; say so where it is used).
//
// Invariants:
// - Reading credentials fails with a PcacheError 'EINVAL' naming the file (lib/tls_credentials.ts).
// - tlsFailureCode sorts a failed handshake: the network failing (an errno code) is 'ENODEV',
//   like any lost connection, and retried; TLS refusing (a certificate, a key, an alert) is
//   'EPERM', which no retry fixes by itself.

import net from 'node:net';
import os from 'node:os';
import tls from 'node:tls';
import type { PcacheErrorCode } from '../../lib/errors.js';
import { PcacheError } from '../../lib/errors.js';
import { readCertificateDirectory, readPskFile } from '../../lib/tls_credentials.js';
import { tlsErrorReason } from '../../lib/tls_errors.js';
import type { NbdUriTls } from './uri.js';

/** Pre-TLS 1.3 PSK suites with forward secrecy (OpenSSL leaves PSK out by default); TLS 1.3 has its own. */
const tls12PskCiphers = 'ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:DHE-PSK-CHACHA20-POLY1305';

/** The client's TLS credentials, loaded: what a connection to one export upgrades with. */
export interface ClientTls {
  /** How the server is authenticated, for messages ("certificates from DIR", "PSK user alice"). */
  readonly description: string;
  /** Options for tls.connect over the connected socket; `tcpHost` is the URI's host (undefined over a Unix socket). */
  connectOptions(tcpHost: string | undefined): tls.ConnectionOptions;
}

/** Reads the credentials an nbds:// URI names; a PcacheError 'EINVAL' when they cannot be used. */
export function loadClientTls(uriTls: NbdUriTls): ClientTls {
  const common: tls.ConnectionOptions = { minVersion: 'TLSv1.2' };
  if (uriTls.pskFile !== undefined) {
    const file = uriTls.pskFile;
    const username = uriTls.username ?? os.userInfo().username;
    const key = readPskFile(file).get(username);
    if (key === undefined) throw new PcacheError('EINVAL', `TLS PSK file ${file} has no key for user '${username}' (give the user as nbds://USER@...)`);
    return {
      description: `PSK user ${username}`,
      connectOptions: () => ({
        ...common,
        ciphers: pskCiphers(),
        pskCallback: () => ({ psk: key, identity: username }),
        // The key proves the server's identity: there is no certificate to check.
        checkServerIdentity: () => undefined,
      }),
    };
  }
  const verifyPeer = uriTls.verifyPeer;
  const files = uriTls.certificatesDir === undefined ? undefined : readCertificateDirectory(uriTls.certificatesDir, 'client');
  const credentialOptions: tls.ConnectionOptions = files === undefined ? {} : {
    ca: files.ca,
    ...(files.cert === undefined || files.key === undefined ? {} : { cert: files.cert, key: files.key }),
    ...(files.crl === undefined ? {} : { crl: files.crl }),
  };
  try {
    tls.createSecureContext(credentialOptions);
  } catch (error) {
    throw new PcacheError('EINVAL', `${uriTls.certificatesDir ?? 'TLS'}: the TLS credentials cannot be used: ${tlsErrorReason(error)}`, { cause: error });
  }
  const source = files === undefined ? 'public CAs' : `certificates from ${files.dir}`;
  return {
    description: verifyPeer ? source : `${source}, server not verified (tls-verify-peer=false)`,
    connectOptions: (tcpHost) => {
      const expected = uriTls.hostname ?? tcpHost;
      return {
        ...common,
        ...credentialOptions,
        rejectUnauthorized: verifyPeer,
        // SNI carries host names only (RFC 6066): never an IP address.
        ...(expected !== undefined && !isIpAddress(expected) ? { servername: expected } : {}),
        checkServerIdentity: (_name, certificate) => (expected === undefined ? undefined : tls.checkServerIdentity(expected, certificate)),
      };
    },
  };
}

/** 'ENODEV' when the network failed during the handshake (retry), 'EPERM' when TLS refused. */
export function tlsFailureCode(error: unknown): PcacheErrorCode {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  return typeof code === 'string' && /^E[A-Z]+$/.test(code) ? 'ENODEV' : 'EPERM';
}

/**
 * A failed TLS handshake as a PcacheError for `where`. Some servers (GnuTLS ones: nbdkit,
 * qemu-nbd) refuse a wrong key or certificate by hanging up without an alert, so a hang-up
 * names the credentials used.
 */
export function tlsFailure(where: string, error: unknown, credentials: ClientTls): PcacheError {
  const code = tlsFailureCode(error);
  const why = (error as NodeJS.ErrnoException | undefined)?.code === 'ECONNRESET'
    ? `the server closed the connection during the TLS handshake (does it accept ${credentials.description}?)`
    : `TLS handshake failed: ${tlsErrorReason(error)} (${credentials.description})`;
  return new PcacheError(code, `${where}: ${why}`, { cause: error });
}

/**
 * The server hung up right after the TLS handshake, before answering anything inside it. With
 * TLS 1.3 a server judges the client's certificate after the client's side of the handshake is
 * done, and GnuTLS servers (nbdkit, qemu-nbd) then just close: most likely our credentials.
 */
export function tlsHangup(where: string, credentials: ClientTls, detail: string): PcacheError {
  return new PcacheError('ENODEV', `${where}: the server closed the connection right after the TLS handshake (does it accept ${credentials.description}? a server that checks client certificates needs client-cert.pem and client-key.pem in tls-certificates=): ${detail}`);
}

function isIpAddress(host: string): boolean {
  return net.isIP(host) !== 0;
}

/**
 * The cipher list of a PSK session: TLS 1.3's suites as node orders them, then the pre-1.3
 * PSK suites. node's default list ends in !PSK, which no later entry can undo.
 */
function pskCiphers(): string {
  const tls13 = tls.DEFAULT_CIPHERS.split(':').filter((suite) => suite.startsWith('TLS_'));
  return [...tls13, tls12PskCiphers].join(':');
}
