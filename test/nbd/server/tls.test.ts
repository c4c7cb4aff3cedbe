// NbdServer over TLS, in this process, against clients built from node:tls and raw bytes: the
// upgrade on Unix sockets and TCP, the default (simple replies), structured-reply and
// multi-connection paths, FORCEDTLS refusing a plaintext client with no data, and every way a
// client can fail or attack the upgrade (wrong PSK, unknown user, expired, foreign or revoked
// certificate, no certificate, garbage instead of a ClientHello, garbage inside TLS, garbage
// TLS records, a stalled handshake, bytes behind STARTTLS), each refused with a reason and
// without disturbing the server, which goes on serving other clients.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { readCertificateDirectory, readPskFile } from '../../../src/lib/tls_credentials.js';
import { NbdRemoteDevice } from '../../../src/nbd/client/remote_device.js';
import { NbdServer, type NbdServerOptions } from '../../../src/nbd/server/server.js';
import type { NbdServerTls, NbdTlsFailure } from '../../../src/nbd/server/tls.js';
import { tlsFixture } from '../../helpers/tls_fixture.js';
import { patternBytes } from '../../helpers/bytes.js';
import { RawClient, ServerClosed } from '../../helpers/nbd_raw_client.js';
import { ControlledExport } from '../../helpers/nbd_server.js';
import { clientFlags, CMD, ERR, type ExportInfo, exportInfoOf, INFO, infoData, OPT, option, REP } from '../../helpers/nbd_wire.js';
import { waitUntil } from '../../helpers/wait.js';

const MiB = 1024 * 1024;
const errTlsReqd = 0x8000_0005;

interface TlsServer {
  readonly server: NbdServer;
  readonly exp: ControlledExport;
  readonly path: string;
  readonly port: number;
  readonly failures: NbdTlsFailure[];
}

/** A server on a Unix socket (and, with `tcp`, one more on 127.0.0.1 with the same export). */
async function startTlsServer(t: TestContext, tlsConfig: NbdServerTls | undefined, options: Partial<NbdServerOptions> = {}, extra: { tcp?: boolean; exp?: ControlledExport } = {}): Promise<TlsServer> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-tls-server-'));
  const exp = extra.exp ?? new ControlledExport(16 * MiB);
  exp.mode = 'sync';
  const failures: NbdTlsFailure[] = [];
  const make = (): NbdServer => new NbdServer({
    export: exp, exportName: 'pcache', readOnly: false, ...options,
    ...(tlsConfig === undefined ? {} : { tls: tlsConfig }),
    onTlsFailure: (failure) => { failures.push(failure); },
  });
  const server = make();
  const socketPath = path.join(dir, 'nbd.sock');
  await server.listen({ path: socketPath });
  let port = 0;
  const closers = [() => server.close()];
  if (extra.tcp === true) {
    const tcp = make();
    const bound = await tcp.listen({ port: 0, host: '127.0.0.1' });
    port = 'port' in bound ? bound.port : 0;
    closers.push(() => tcp.close());
  }
  t.after(async () => {
    for (const close of closers) await close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { server, exp, path: socketPath, port, failures };
}

function x509(mode: 'on' | 'require', dir: string, verifyPeer = false): NbdServerTls {
  return { mode, credentials: { kind: 'x509', files: readCertificateDirectory(dir, 'server'), verifyPeer } };
}

function psk(mode: 'on' | 'require'): NbdServerTls {
  return { mode, credentials: { kind: 'psk', keys: readPskFile(tlsFixture().psk) } };
}

/** node:tls options of a client with the certificates of `dir` (client-cert.pem if there). */
function certificateClient(dir: string): tls.ConnectionOptions {
  const files = readCertificateDirectory(dir, 'client');
  return {
    ca: files.ca,
    ...(files.cert === undefined || files.key === undefined ? {} : { cert: files.cert, key: files.key }),
    // Over a Unix socket there is no host name to check; the chain is checked.
    checkServerIdentity: () => undefined,
  };
}

function pskClient(username: string, keyHex: string, maxVersion: tls.SecureVersion = 'TLSv1.3'): tls.ConnectionOptions {
  return {
    pskCallback: () => ({ psk: Buffer.from(keyHex, 'hex'), identity: username }),
    ciphers: 'TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:ECDHE-PSK-CHACHA20-POLY1305',
    maxVersion,
    checkServerIdentity: () => undefined,
  };
}

/** Greeting, client flags, STARTTLS (ACK expected); returns the raw client. */
async function startTls(target: string | number): Promise<RawClient> {
  const raw = await RawClient.connect(target);
  await raw.greeting();
  raw.write(clientFlags(3));
  const replies = await raw.ask(OPT.startTls);
  assert.deepEqual(replies.map((reply) => reply.type), [REP.ack], 'STARTTLS acknowledged');
  return raw;
}

/** The TLS handshake on a raw client after STARTTLS: a RawClient on the TLS socket, or the error. */
function upgrade(raw: RawClient, options: tls.ConnectionOptions): Promise<RawClient> {
  return new Promise((resolve, reject) => {
    const secure = tls.connect({ ...options, socket: raw.socket });
    secure.once('secureConnect', () => {
      secure.off('error', reject);
      resolve(RawClient.over(secure));
    });
    secure.once('error', reject);
  });
}

/** STARTTLS and the TLS handshake; resolves once the client is inside TLS. */
async function tlsClient(target: string | number, options: tls.ConnectionOptions): Promise<RawClient> {
  return upgrade(await startTls(target), options);
}

/** Negotiation inside TLS (no greeting there: it went before STARTTLS): optionally structured replies, then GO. */
async function goInside(client: RawClient, structured = false): Promise<ExportInfo> {
  if (structured) assert.deepEqual((await client.ask(OPT.structuredReply)).map((reply) => reply.type), [REP.ack]);
  const replies = await client.ask(OPT.go, infoData('pcache', [INFO.blockSize]));
  assert.equal(replies.at(-1)?.type, REP.ack, 'GO inside TLS');
  return exportInfoOf(replies);
}

/** GO (inside TLS unless `plain`), a WRITE and a READ of it back, then DISC. */
async function roundTrip(client: RawClient, seed: number, plain = false): Promise<void> {
  const info = plain ? await client.go({ name: 'pcache' }) : await goInside(client);
  assert.equal(info.sizeBytes, BigInt(16 * MiB));
  const data = patternBytes(8192, seed);
  assert.equal(await client.command({ type: CMD.write, cookie: 1n, offset: 65536, length: data.length }, data), ERR.ok);
  client.send({ type: CMD.read, cookie: 2n, offset: 65536, length: data.length });
  const reply = await client.simpleReply(data.length);
  assert.equal(reply.error, ERR.ok);
  assert.deepEqual(reply.data, data, 'the data came back through TLS');
  client.disconnect();
  await client.readUntilClosed();
}

/** A TLS handshake that must fail: resolves once the client saw the failure (an error or the server hanging up). */
async function refused(target: string | number, options: tls.ConnectionOptions): Promise<void> {
  let client: RawClient;
  try {
    client = await tlsClient(target, options);
  } catch {
    return;
  }
  // TLS 1.3: a client certificate is judged after the client's side finished; the server
  // then hangs up before any NBD reply.
  client.write(option(OPT.go, infoData('pcache', [INFO.blockSize])));
  await assert.rejects(client.optionReplies(), ServerClosed, 'the server hung up instead of answering inside TLS');
}

describe('NbdServer with TLS: the upgrade', () => {
  it('X.509 over a Unix socket: STARTTLS, the handshake, GO and data inside TLS (simple replies); counted', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, x509('require', fixture.server));
    await roundTrip(await tlsClient(srv.path, certificateClient(fixture.clientNoCert)), 1);
    assert.equal(srv.server.stats().tlsSessionsTotal, 1);
    assert.equal(srv.server.stats().tlsFailuresTotal, 0);
    assert.deepEqual(srv.failures, []);
  });

  it('X.509 over TCP with pcache\'s own client: nbds://127.0.0.1 (the certificate\'s IP name checked), structured replies, four connections, 32 MiB moved', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, x509('require', fixture.server), {}, { tcp: true });
    const device = await NbdRemoteDevice.open(`nbds://127.0.0.1:${srv.port}/pcache?tls-certificates=${fixture.clientNoCert}`, { connections: 4 });
    t.after(() => device.close());
    assert.equal(device.state().connectionsConnected, 4);
    assert.equal(device.state().structuredReplies, true);
    assert.equal(device.state().multiConn, true);
    // Four 4 MiB writes at once, spread over the connections, then all 16 MiB read back.
    const data = patternBytes(16 * MiB, 7);
    await Promise.all([0, 1, 2, 3].map((i) => device.write(data.subarray(i * 4 * MiB, (i + 1) * 4 * MiB), i * 4 * MiB)));
    await device.sync();
    const back = Buffer.alloc(data.length);
    await device.read(back, 0);
    assert.ok(back.equals(data), 'the 16 MiB came back intact');
  });

  it('PSK over TLS 1.3 and over TLS 1.2 (ECDHE-PSK), and the server reports which username failed', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, psk('require'));
    await roundTrip(await tlsClient(srv.path, pskClient('alice', fixture.aliceKeyHex)), 2);
    const tls12 = await tlsClient(srv.path, pskClient('alice', fixture.aliceKeyHex, 'TLSv1.2'));
    assert.ok(tls12.socket instanceof tls.TLSSocket);
    assert.equal(tls12.socket.getProtocol(), 'TLSv1.2');
    await roundTrip(tls12, 3);
    assert.equal(srv.server.stats().tlsSessionsTotal, 2);
  });

  it('--tls on: a plaintext client is served as before, and a TLS client too', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, x509('on', fixture.server));
    const plain = await RawClient.connect(srv.path);
    await roundTrip(plain, 4, true);
    await roundTrip(await tlsClient(srv.path, certificateClient(fixture.clientNoCert)), 5);
    assert.equal(srv.server.stats().tlsSessionsTotal, 1);
  });

  it('a large transfer inside TLS (32 MiB write and read back) goes through backpressure intact', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, x509('require', fixture.server), {}, { exp: new ControlledExport(64 * MiB) });
    const client = await tlsClient(srv.path, certificateClient(fixture.clientNoCert));
    await goInside(client, true);
    const data = patternBytes(32 * MiB, 11);
    assert.equal(await client.command({ type: CMD.write, cookie: 1n, offset: 0, length: data.length }, data), ERR.ok);
    client.send({ type: CMD.read, cookie: 2n, offset: 0, length: data.length });
    const chunk = await client.reply();
    assert.equal(chunk.kind, 'chunk');
    assert.ok(chunk.payload.subarray(8).equals(data), 'the 32 MiB came back intact');
  });

  it('pipelined reads of mixed sizes, and a DISC right behind them: every reply arrives whole and in order, then the close', async (t) => {
    // A TLS socket is written one piece of at most 128 KiB at a time (reply_batch.ts): replies
    // larger than a piece are cut, small ones joined. Sizes straddle the piece size; an error
    // reply sits in the middle; the DISC makes the last flush hand over everything at once.
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, x509('require', fixture.server), {}, { exp: new ControlledExport(64 * MiB) });
    const client = await tlsClient(srv.path, certificateClient(fixture.clientNoCert));
    await goInside(client, false);
    const data = patternBytes(32 * MiB, 7);
    assert.equal(await client.command({ type: CMD.write, cookie: 1n, offset: 0, length: data.length }, data), ERR.ok);
    const sizes = [MiB, 4096, 128 * 1024, 128 * 1024 + 512, 512, 3 * MiB + 4096, 65536, 1536, 2 * MiB];
    const reads = Array.from({ length: 30 }, (_, index) => ({ length: sizes[index % sizes.length] as number, offset: (index * 1_048_576 + index * 4096) % (30 * MiB) }));
    const badIndex = 13; // beyond the end of the export: an error reply among the data
    for (const [index, read] of reads.entries()) {
      client.send({ type: CMD.read, cookie: BigInt(100 + index), offset: index === badIndex ? 64 * MiB : read.offset, length: read.length });
    }
    client.disconnect();
    for (const [index, read] of reads.entries()) {
      const reply = await client.simpleReply(index === badIndex ? 0 : read.length);
      assert.equal(reply.cookie, BigInt(100 + index), 'replies in request order');
      if (index === badIndex) {
        assert.notEqual(reply.error, ERR.ok, 'the read past the end failed');
        continue;
      }
      assert.equal(reply.error, ERR.ok);
      assert.ok(reply.data.equals(data.subarray(read.offset, read.offset + read.length)), `read ${index} (${read.length} bytes) intact`);
    }
    assert.equal((await client.readUntilClosed()).length, 0, 'nothing after the last reply; the server closed');
  });
});

describe('NbdServer with --tls require: a plaintext client gets nothing', () => {
  it('LIST, INFO, GO and STRUCTURED_REPLY are answered ERR_TLS_REQD; EXPORT_NAME is hung up on; the export is never called', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, x509('require', fixture.server));
    const raw = await RawClient.connect(srv.path);
    await raw.greeting();
    raw.write(clientFlags(3));
    for (const [code, data] of [[OPT.list, undefined], [OPT.info, infoData('pcache', [INFO.blockSize])], [OPT.structuredReply, undefined], [OPT.go, infoData('', [INFO.blockSize])]] as const) {
      const replies = await raw.ask(code, data);
      assert.deepEqual(replies.map((reply) => [reply.option, reply.type]), [[code, errTlsReqd]]);
    }
    raw.write(option(OPT.exportName, Buffer.from('pcache')));
    assert.equal((await raw.readUntilClosed()).length, 0, 'no size, no flags: the connection is closed');
    assert.deepEqual(srv.exp.calls, [], 'no export call');
  });
});

describe('NbdServer with TLS: refused clients, and the server goes on', () => {
  it('PSK: a wrong key and an unknown username are refused, each with the reason logged', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, psk('require'));
    const wrongKey = /^alice:([0-9a-f]+)$/m.exec(fs.readFileSync(fixture.pskWrongKey, 'utf8'))?.[1] ?? '';
    await refused(srv.path, pskClient('alice', wrongKey));
    await refused(srv.path, pskClient('mallory', fixture.aliceKeyHex));
    await refused(srv.path, certificateClient(fixture.clientNoCert));
    await waitUntil(() => srv.failures.length === 3, 'three failures reported');
    assert.match(srv.failures[0]?.reason ?? '', /PSK username 'alice' failed \(wrong key\?\)/);
    assert.match(srv.failures[1]?.reason ?? '', /unknown PSK username 'mallory'/);
    assert.match(srv.failures[2]?.reason ?? '', /offered no pre-shared key/);
    assert.equal(srv.failures[0]?.peer, 'unix socket');
    assert.equal(srv.server.stats().tlsFailuresTotal, 3);
    await roundTrip(await tlsClient(srv.path, pskClient('alice', fixture.aliceKeyHex)), 6);
  });

  it('--tls-verify-peer: a good client certificate passes; none, an expired one, another CA\'s and a revoked one are refused, each logged', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, x509('require', fixture.serverCrl, true));
    await roundTrip(await tlsClient(srv.path, certificateClient(fixture.client)), 7);
    const cases: [string, RegExp][] = [
      [fixture.clientNoCert, /certificate/i],
      [fixture.clientExpired, /^client certificate rejected \(CERT_HAS_EXPIRED\)$/],
      [fixture.clientOtherCa, /^client certificate rejected \((UNABLE_TO_GET_ISSUER_CERT|UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\)$/],
      [fixture.clientRevoked, /^client certificate rejected \(CERT_REVOKED\)$/],
    ];
    for (const [dir, reason] of cases) {
      const before = srv.failures.length;
      await refused(srv.path, certificateClient(dir));
      await waitUntil(() => srv.failures.length === before + 1, `the failure for ${path.basename(dir)} reported`);
      assert.match(srv.failures[before]?.reason ?? '', reason, path.basename(dir));
    }
    assert.equal(srv.exp.calls.length, 2, 'only the good client reached the export');
    await roundTrip(await tlsClient(srv.path, certificateClient(fixture.client)), 8);
  });

  it('a client that does not trust the server\'s CA gives up; the server reports the hang-up and serves the next client', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, x509('require', fixture.server));
    await assert.rejects(tlsClient(srv.path, certificateClient(fixture.clientOtherCaTrust)), /certificate/);
    // The client's hang-up ends the handshake (the reason says so; the time limit would say otherwise).
    await waitUntil(() => srv.failures.length === 1, 'the failure reported');
    assert.match(srv.failures[0]?.reason ?? '', /the client closed the connection during the TLS handshake \(did it reject the server's certificate\?\)/);
    await roundTrip(await tlsClient(srv.path, certificateClient(fixture.clientNoCert)), 9);
  });

  it('garbage instead of a ClientHello: the connection is closed with the TLS error logged; others are served', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, x509('require', fixture.server));
    for (const garbage of [randomBytes(300), Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'), Buffer.alloc(5000, 0x16)]) {
      const raw = await startTls(srv.path);
      raw.write(garbage);
      await raw.readUntilClosed();
    }
    await waitUntil(() => srv.failures.length === 3, 'three failures reported');
    for (const failure of srv.failures) assert.match(failure.reason, /^TLS handshake failed: /);
    await roundTrip(await tlsClient(srv.path, certificateClient(fixture.clientNoCert)), 10);
    await waitUntil(() => srv.server.stats().connectionsOpen === 0, 'every connection gone');
  });

  it('garbage inside TLS (as options, and as requests) closes that connection as a protocol violation; garbage TLS records too', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, x509('require', fixture.server));
    const options = await tlsClient(srv.path, certificateClient(fixture.clientNoCert));
    options.write(randomBytes(64));
    await options.readUntilClosed();

    const requests = await tlsClient(srv.path, certificateClient(fixture.clientNoCert));
    await goInside(requests);
    requests.write(randomBytes(64));
    await requests.readUntilClosed();
    await waitUntil(() => srv.server.stats().protocolViolationsTotal === 2, 'two protocol violations counted');

    // Bytes that are not TLS records, written on the plaintext socket under an established
    // TLS session (node writes them straight to the socket, past the TLS layer).
    const raw = await startTls(srv.path);
    const records = await upgrade(raw, certificateClient(fixture.clientNoCert));
    await goInside(records);
    raw.socket.write(randomBytes(100));
    await records.readUntilClosed();
    await roundTrip(await tlsClient(srv.path, certificateClient(fixture.clientNoCert)), 11);
    assert.deepEqual(srv.exp.calls.map((call) => call.method), ['write', 'read']);
  });

  it('bytes sent behind STARTTLS, before its reply, close the connection without an ACK', async (t) => {
    const fixture = tlsFixture();
    const srv = await startTlsServer(t, x509('require', fixture.server));
    const raw = await RawClient.connect(srv.path);
    await raw.greeting();
    raw.write(Buffer.concat([clientFlags(3), option(OPT.startTls), Buffer.from([0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5])]));
    assert.equal((await raw.readUntilClosed()).length, 0, 'no ACK, nothing');
    assert.equal(srv.server.stats().tlsSessionsTotal, 0);
    await roundTrip(await tlsClient(srv.path, certificateClient(fixture.clientNoCert)), 12);
  });

  it('a client that stalls in the TLS handshake is cut off at the handshake time limit, and the log says so', async (t) => {
    const srv = await startTlsServer(t, x509('require', tlsFixture().server), { limits: { handshakeTimeoutMs: 300 } });
    const raw = await startTls(srv.path);
    raw.write(Buffer.from([0x16, 0x03, 0x01]));
    await raw.readUntilClosed(10_000);
    await waitUntil(() => srv.failures.length === 1, 'the failure reported');
    assert.match(srv.failures[0]?.reason ?? '', /did not finish within the handshake time limit/);
  });

  it('close() during a TLS handshake ends it without reporting a client failure', async (t) => {
    const srv = await startTlsServer(t, x509('require', tlsFixture().server));
    const raw = await startTls(srv.path);
    await srv.server.close();
    await raw.readUntilClosed();
    assert.deepEqual(srv.failures, []);
  });
});
