// TLS credentials for the tests, generated when a test file first asks for them (never
// committed): certtool and psktool from the Debian package gnutls-bin, the tools nbdkit's and
// qemu's documentation use. One set per test process, in a temporary directory removed at exit.
//
// What there is (directories in nbdkit's, qemu's and libnbd's layout):
// - server:       ca-cert.pem, server-cert.pem, server-key.pem (CN localhost; DNS localhost,
//                 IP 127.0.0.1 and ::1), for pcache serve, nbdkit and qemu-nbd;
// - serverCrl:    the same plus ca-crl.pem, which revokes the `revoked` client certificate;
// - serverExpired: a server certificate that expired in 2020;
// - serverOtherCa: a server certificate signed by another CA;
// - client:       ca-cert.pem, client-cert.pem, client-key.pem (a good client), for libnbd,
//                 qemu (tls-creds-x509 endpoint=client) and pcache's client;
// - clientNoCert: ca-cert.pem only (verifies the server, presents nothing);
// - clientExpired, clientOtherCa, clientRevoked: client certificates that must be refused;
// - clientOtherCaTrust: trusts only the other CA (so our server's certificate fails);
// - psk:          keys.psk (alice, bob) for servers; pskWrongKey: alice with another key;
//                 pskDir: a directory holding keys.psk (qemu's tls-creds-psk dir= layout).

import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface TlsFixture {
  readonly root: string;
  readonly server: string;
  readonly serverCrl: string;
  readonly serverExpired: string;
  readonly serverOtherCa: string;
  readonly client: string;
  readonly clientNoCert: string;
  readonly clientExpired: string;
  readonly clientOtherCa: string;
  readonly clientRevoked: string;
  readonly clientOtherCaTrust: string;
  /** keys.psk with alice and bob. */
  readonly psk: string;
  /** alice with a key that is not the server's. */
  readonly pskWrongKey: string;
  /** A directory with keys.psk in it (qemu's tls-creds-psk dir=). */
  readonly pskDir: string;
  /** alice's key in hex, as psk holds it. */
  readonly aliceKeyHex: string;
}

let fixture: TlsFixture | undefined;

/** Fails (never skips) when certtool or psktool is missing, naming the package. */
export function requireGnutlsTools(): void {
  for (const tool of ['certtool', 'psktool']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) {
      throw new Error(`${tool} is not installed: install the Debian package gnutls-bin (apt-get install gnutls-bin)`);
    }
  }
}

/** The test credentials, made on first use. */
export function tlsFixture(): TlsFixture {
  fixture ??= makeFixture();
  return fixture;
}

function run(command: string, args: string[], cwd: string): void {
  const result = spawnSync(command, args, { cwd, encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')} failed: ${result.stderr}`);
}

/** A private key (ECDSA P-256: fast to make; every TLS stack here takes it). */
function key(dir: string, name: string): string {
  run('certtool', ['--generate-privkey', '--key-type=ecdsa', '--no-text', '--outfile', name], dir);
  return path.join(dir, name);
}

function template(dir: string, name: string, lines: string[]): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, `${lines.join('\n')}\n`);
  return file;
}

interface Ca {
  readonly cert: string;
  readonly key: string;
}

function makeCa(work: string, name: string): Ca {
  const caKey = key(work, `${name}-key.pem`);
  const info = template(work, `${name}.info`, [`cn = ${name}`, 'ca', 'cert_signing_key', 'crl_signing_key', 'expiration_days = 30']);
  run('certtool', ['--generate-self-signed', '--load-privkey', caKey, '--template', info, '--outfile', `${name}-cert.pem`], work);
  return { cert: path.join(work, `${name}-cert.pem`), key: caKey };
}

/** Signs a certificate for `role` into `cert` (a path) with key `keyFile`; `validity` is a template's date lines. */
function sign(work: string, ca: Ca, keyFile: string, cert: string, cn: string, role: 'server' | 'client', validity: string[]): void {
  const names = role === 'server' ? ['dns_name = localhost', 'ip_address = 127.0.0.1', 'ip_address = ::1', 'tls_www_server'] : ['tls_www_client'];
  const info = template(work, `${path.basename(cert)}.info`, ['organization = pcache tests', `cn = ${cn}`, ...names, 'signing_key', 'encryption_key', ...validity]);
  run('certtool', ['--generate-certificate', '--load-ca-certificate', ca.cert, '--load-ca-privkey', ca.key, '--load-privkey', keyFile, '--template', info, '--outfile', cert], work);
}

const valid = ['expiration_days = 30'];
const expired = ['activation_date = "2020-01-01 00:00:00 UTC"', 'expiration_date = "2020-12-31 00:00:00 UTC"'];

/** A credentials directory: the CA certificate to trust, and optionally one identity. */
function directory(root: string, name: string, trust: Ca, identity?: { role: 'server' | 'client'; ca: Ca; cn: string; validity: string[] }): string {
  const dir = path.join(root, name);
  fs.mkdirSync(dir, { mode: 0o700 });
  fs.copyFileSync(trust.cert, path.join(dir, 'ca-cert.pem'));
  if (identity !== undefined) {
    const keyFile = key(dir, `${identity.role}-key.pem`);
    sign(dir, identity.ca, keyFile, path.join(dir, `${identity.role}-cert.pem`), identity.cn, identity.role, identity.validity);
    for (const leftover of fs.readdirSync(dir).filter((file) => file.endsWith('.info'))) fs.rmSync(path.join(dir, leftover));
  }
  return dir;
}

function makeFixture(): TlsFixture {
  requireGnutlsTools();
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-tls-'));
  process.once('exit', () => { fs.rmSync(root, { recursive: true, force: true }); });
  const work = path.join(root, 'ca');
  fs.mkdirSync(work, { mode: 0o700 });
  const ca = makeCa(work, 'pcache-test-ca');
  const otherCa = makeCa(work, 'other-ca');

  const server = directory(root, 'server', ca, { role: 'server', ca, cn: 'localhost', validity: valid });
  const serverExpired = directory(root, 'server-expired', ca, { role: 'server', ca, cn: 'localhost', validity: expired });
  const serverOtherCa = directory(root, 'server-other-ca', ca, { role: 'server', ca: otherCa, cn: 'localhost', validity: valid });
  const client = directory(root, 'client', ca, { role: 'client', ca, cn: 'good-client', validity: valid });
  const clientNoCert = directory(root, 'client-no-cert', ca);
  const clientExpired = directory(root, 'client-expired', ca, { role: 'client', ca, cn: 'expired-client', validity: expired });
  const clientOtherCa = directory(root, 'client-other-ca', ca, { role: 'client', ca: otherCa, cn: 'stranger', validity: valid });
  const clientRevoked = directory(root, 'client-revoked', ca, { role: 'client', ca, cn: 'revoked-client', validity: valid });
  const clientOtherCaTrust = directory(root, 'client-other-ca-trust', otherCa);

  // The server directory again, with a CRL that revokes clientRevoked's certificate.
  const serverCrl = path.join(root, 'server-crl');
  fs.cpSync(server, serverCrl, { recursive: true });
  const crlInfo = template(work, 'crl.info', ['crl_next_update = 30', 'crl_number = 1']);
  run('certtool', ['--generate-crl', '--load-ca-privkey', ca.key, '--load-ca-certificate', ca.cert,
    '--load-certificate', path.join(clientRevoked, 'client-cert.pem'), '--template', crlInfo, '--outfile', path.join(serverCrl, 'ca-crl.pem')], work);

  const pskDir = path.join(root, 'psk');
  fs.mkdirSync(pskDir, { mode: 0o700 });
  const psk = path.join(pskDir, 'keys.psk');
  run('psktool', ['-u', 'alice', '-p', psk], pskDir);
  run('psktool', ['-u', 'bob', '-p', psk], pskDir);
  const wrongDir = path.join(root, 'psk-wrong');
  fs.mkdirSync(wrongDir, { mode: 0o700 });
  const pskWrongKey = path.join(wrongDir, 'keys.psk');
  run('psktool', ['-u', 'alice', '-p', pskWrongKey], wrongDir);
  const aliceKeyHex = /^alice:([0-9a-f]+)$/m.exec(fs.readFileSync(psk, 'utf8'))?.[1];
  if (aliceKeyHex === undefined) throw new Error(`psktool wrote no key for alice into ${psk}`);

  return {
    root, server, serverCrl, serverExpired, serverOtherCa, client, clientNoCert, clientExpired, clientOtherCa, clientRevoked,
    clientOtherCaTrust, psk, pskWrongKey, pskDir, aliceKeyHex,
  };
}
