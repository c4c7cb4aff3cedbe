// TLS credentials as nbdkit, qemu-nbd and libnbd keep them on disk, read and checked once, when
// a server starts or a client is configured, so that a missing file, an unreadable key or a
// malformed PSK file is a clear error then, and never a failed handshake later.
//
// Two forms, shared by the NBD server (which serves with them) and the NBD client (which
// connects with them):
// - A certificate directory: ca-cert.pem (the CA that signs the peers), server-cert.pem and
//   server-key.pem for a server, client-cert.pem and client-key.pem for a client (both or
//   neither: a client certificate is optional), and optionally ca-crl.pem (revoked
//   certificates). The names are nbdkit's (--tls-certificates), qemu's (tls-creds-x509 dir=)
//   and libnbd's (tls-certificates=), so one directory serves all of them.
// - A PSK file in psktool's format: one `username:hexkey` line per user, as nbdkit's
//   --tls-psk, qemu's tls-creds-psk (dir/keys.psk) and libnbd's tls-psk-file= read it.
//
// Invariants:
// - Every problem is a PcacheError 'EINVAL' naming the file and what is wrong with it; nothing
//   here logs, and nothing is read again after these functions return.
// - Keys and certificates are parsed (node:crypto) before they are returned, and a certificate
//   is checked against its private key, so a TLS context built from them cannot fail on them.
// - A PSK file yields at least one user; usernames are unique, non-empty and free of ':';
//   keys are 1..pskKeyMaxBytes bytes of hex, as OpenSSL accepts them.

import { createPrivateKey, X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { PcacheError } from './errors.js';

/** Longest pre-shared key accepted (OpenSSL's PSK_MAX_PSK_LEN is larger; psktool writes 32 bytes). */
export const pskKeyMaxBytes = 256;
/** Longest PSK username accepted: OpenSSL passes identities of up to 128 bytes to a server. */
export const pskUsernameMaxBytes = 128;
/** A credentials file larger than this is not a PEM file or a PSK file. */
const credentialFileMaxBytes = 1024 * 1024;

/** The file names of a certificate directory, as nbdkit, qemu and libnbd expect them. */
export const certificateFileNames = {
  ca: 'ca-cert.pem',
  crl: 'ca-crl.pem',
  server: { cert: 'server-cert.pem', key: 'server-key.pem' },
  client: { cert: 'client-cert.pem', key: 'client-key.pem' },
} as const;

export type CertificateRole = 'server' | 'client';

/** The PEM files of a certificate directory, checked. */
export interface CertificateFiles {
  readonly dir: string;
  /** ca-cert.pem: the CA(s) that peers' certificates must be signed by. */
  readonly ca: Buffer;
  /** This side's certificate and key: always for a server; for a client, when it has one. */
  readonly cert: Buffer | undefined;
  readonly key: Buffer | undefined;
  /** ca-crl.pem, when present. */
  readonly crl: Buffer | undefined;
  /** When this side's own certificate expires (undefined without one). */
  readonly certNotAfter: Date | undefined;
}

/**
 * Reads the certificate directory `dir` for a server (ca-cert.pem, server-cert.pem and
 * server-key.pem required) or a client (ca-cert.pem required; client-cert.pem and
 * client-key.pem optional, but both or neither); ca-crl.pem is read when present.
 */
export function readCertificateDirectory(dir: string, role: CertificateRole): CertificateFiles {
  const names = certificateFileNames[role];
  const layout = role === 'server'
    ? `a server needs ${certificateFileNames.ca}, ${names.cert} and ${names.key} there (optionally ${certificateFileNames.crl}), as nbdkit and qemu-nbd do`
    : `a client needs ${certificateFileNames.ca} there, and ${names.cert} with ${names.key} to present a certificate (optionally ${certificateFileNames.crl}), as libnbd and qemu do`;
  let stat: fs.Stats;
  try {
    stat = fs.statSync(dir);
  } catch (error) {
    throw new PcacheError('EINVAL', `TLS certificate directory ${dir}: ${reasonOf(error)} (${layout})`, { cause: error });
  }
  if (!stat.isDirectory()) throw new PcacheError('EINVAL', `TLS certificate directory ${dir} is not a directory (${layout})`);
  const file = (name: string): string => path.join(dir, name);
  const present = (name: string): boolean => fs.existsSync(file(name));
  const ca = readCredentialFile(file(certificateFileNames.ca), layout);
  checkCertificates(file(certificateFileNames.ca), ca);

  let cert: Buffer | undefined;
  let key: Buffer | undefined;
  if (role === 'server' || present(names.cert) || present(names.key)) {
    cert = readCredentialFile(file(names.cert), layout);
    key = readCredentialFile(file(names.key), layout);
  }
  let certNotAfter: Date | undefined;
  if (cert !== undefined && key !== undefined) certNotAfter = checkKeyPair(file(names.cert), cert, file(names.key), key);
  const crl = present(certificateFileNames.crl) ? readCredentialFile(file(certificateFileNames.crl), layout) : undefined;
  if (crl !== undefined && !crl.includes('-----BEGIN X509 CRL-----')) {
    throw new PcacheError('EINVAL', `${file(certificateFileNames.crl)} is not a PEM certificate revocation list (no BEGIN X509 CRL line)`);
  }
  return { dir, ca, cert, key, crl, certNotAfter };
}

/**
 * Reads a PSK file in psktool's format: `username:hexkey` lines (blank lines are skipped, a
 * trailing CR is allowed). Returns the keys by username.
 */
export function readPskFile(file: string): ReadonlyMap<string, Buffer> {
  const text = readCredentialFile(file, 'a TLS PSK file holds username:hexkey lines, as psktool writes them').toString('utf8');
  return parsePskFile(text, file);
}

/** The keys of a PSK file's text, by username; `file` names it in errors. */
export function parsePskFile(text: string, file: string): ReadonlyMap<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split('\n');
  lines.forEach((raw, index) => {
    const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
    if (line.trim() === '') return;
    const where = `PSK file ${file}, line ${index + 1}`;
    const colon = line.indexOf(':');
    if (colon < 0) throw new PcacheError('EINVAL', `${where}: expected username:hexkey (as psktool writes it), found no ':'`);
    const username = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (username === '') throw new PcacheError('EINVAL', `${where}: the username is empty`);
    if (Buffer.byteLength(username) > pskUsernameMaxBytes) throw new PcacheError('EINVAL', `${where}: the username is longer than ${pskUsernameMaxBytes} bytes`);
    if (!/^[0-9a-fA-F]+$/.test(hex) || hex.length % 2 !== 0) {
      throw new PcacheError('EINVAL', `${where}: the key of ${username} is not an even number of hex digits`);
    }
    if (hex.length / 2 > pskKeyMaxBytes) throw new PcacheError('EINVAL', `${where}: the key of ${username} is longer than ${pskKeyMaxBytes} bytes`);
    if (keys.has(username)) throw new PcacheError('EINVAL', `${where}: ${username} is listed twice`);
    keys.set(username, Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw new PcacheError('EINVAL', `PSK file ${file} holds no username:hexkey line`);
  return keys;
}

/** Reads one credentials file whole; `layout` says what was expected, for the error. */
function readCredentialFile(file: string, layout: string): Buffer {
  let bytes: Buffer;
  try {
    const stat = fs.statSync(file);
    if (!stat.isFile()) throw new PcacheError('EINVAL', `${file} is not a regular file (${layout})`);
    if (stat.size > credentialFileMaxBytes) throw new PcacheError('EINVAL', `${file} is larger than ${credentialFileMaxBytes} bytes: not a credentials file`);
    bytes = fs.readFileSync(file);
  } catch (error) {
    if (error instanceof PcacheError) throw error;
    throw new PcacheError('EINVAL', `cannot read ${file}: ${reasonOf(error)} (${layout})`, { cause: error });
  }
  return bytes;
}

/** Checks that a PEM file holds at least one certificate that parses. */
function checkCertificates(file: string, pem: Buffer): X509Certificate {
  if (!pem.includes('-----BEGIN CERTIFICATE-----')) throw new PcacheError('EINVAL', `${file} holds no PEM certificate (no BEGIN CERTIFICATE line)`);
  try {
    return new X509Certificate(pem);
  } catch (error) {
    throw new PcacheError('EINVAL', `${file}: the certificate does not parse: ${reasonOf(error)}`, { cause: error });
  }
}

/** Checks that the certificate parses and belongs to the private key; returns its expiry. */
function checkKeyPair(certFile: string, certPem: Buffer, keyFile: string, keyPem: Buffer): Date {
  const certificate = checkCertificates(certFile, certPem);
  let key: ReturnType<typeof createPrivateKey>;
  try {
    key = createPrivateKey(keyPem);
  } catch (error) {
    throw new PcacheError('EINVAL', `${keyFile}: the private key does not parse (encrypted keys are not supported): ${reasonOf(error)}`, { cause: error });
  }
  if (!certificate.checkPrivateKey(key)) throw new PcacheError('EINVAL', `${keyFile} is not the private key of ${certFile}`);
  return new Date(certificate.validTo);
}

function reasonOf(error: unknown): string {
  const code = (error as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return 'no such file or directory';
  if (code === 'EACCES') return 'permission denied';
  return error instanceof Error ? error.message : String(error);
}
