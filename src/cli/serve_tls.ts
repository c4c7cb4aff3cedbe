// The TLS of `pcache serve`: the credentials its flags name, read and checked before anything
// else is opened (so a missing certificate or a malformed PSK file fails the start with one
// line and leaves nothing behind), and the URIs that reach the server with them.

import path from 'node:path';
import { PcacheError } from '../lib/errors.js';
import { readCertificateDirectory, readPskFile } from '../lib/tls_credentials.js';
import { checkServerTls, type NbdServerTls } from '../nbd/server/tls.js';
import type { TlsArgs } from './args.js';

export interface ServeTls {
  readonly config: NbdServerTls;
  /** For the 'serving' log line. */
  readonly facts: Readonly<Record<string, unknown>>;
  /** When the server's certificate expires (X.509 only). */
  readonly certNotAfter: Date | undefined;
  /** The query parameters and user part a libnbd client needs to connect with these credentials. */
  readonly clientParameters: { readonly user: string | undefined; readonly query: string };
}

/** Reads the credentials of --tls-certificates or --tls-psk; a PcacheError naming the flag when they cannot serve. */
export function loadServeTls(args: TlsArgs): ServeTls {
  const flag = args.certificatesDir !== undefined ? '--tls-certificates' : '--tls-psk';
  try {
    if (args.certificatesDir !== undefined) {
      const files = readCertificateDirectory(args.certificatesDir, 'server');
      const config: NbdServerTls = { mode: args.mode, credentials: { kind: 'x509', files, verifyPeer: args.verifyPeer } };
      checkServerTls(config);
      return {
        config,
        facts: { tls: args.mode, tlsCredentials: 'x509', tlsCertificates: path.resolve(files.dir), tlsVerifyPeer: args.verifyPeer },
        certNotAfter: files.certNotAfter,
        clientParameters: { user: undefined, query: `tls-certificates=${path.resolve(files.dir)}` },
      };
    }
    const file = args.pskFile ?? '';
    const keys = readPskFile(file);
    const config: NbdServerTls = { mode: args.mode, credentials: { kind: 'psk', keys } };
    checkServerTls(config);
    return {
      config,
      facts: { tls: args.mode, tlsCredentials: 'psk', tlsPskFile: path.resolve(file), tlsPskUsers: keys.size },
      certNotAfter: undefined,
      clientParameters: { user: keys.keys().next().value, query: `tls-psk-file=${path.resolve(file)}` },
    };
  } catch (error) {
    if (error instanceof PcacheError) throw new PcacheError(error.code, `${flag}: ${error.message}`, { cause: error });
    throw error;
  }
}
