// pcache's NBD client over TLS, as a backing device reaches a remote export: nbds+unix:// to
// nbdkit --tls=require (certificates, with and without --tls-verify-peer, and a PSK) and to
// qemu-nbd --tls-creds (tls-creds-x509, which requires a client certificate by default, and
// tls-creds-psk); reconnection over TLS after the server restarts; and every refusal, with the
// error code and message a user acts on: a server without TLS, a plain URI against a server
// that requires it, an unknown CA, an expired server certificate, a wrong host name, a wrong
// key, missing credential files.
//
// nbdkit and qemu-nbd come from the Debian packages nbdkit and qemu-utils, the credentials
// from certtool and psktool (gnutls-bin); a missing tool fails its test with the package name.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { PcacheError, type PcacheErrorCode } from '../../../src/lib/errors.js';
import { NbdRemoteDevice } from '../../../src/nbd/client/remote_device.js';
import { tlsFixture } from '../../helpers/tls_fixture.js';
import { patternBytes } from '../../helpers/bytes.js';
import { Nbdkit } from '../../helpers/nbdkit.js';
import { requireTool } from '../../helpers/tools.js';
import { waitUntil } from '../../helpers/wait.js';

const MiB = 1024 * 1024;

function isCode(code: PcacheErrorCode, message: RegExp): (error: unknown) => boolean {
  return (error: unknown) => {
    assert.ok(error instanceof PcacheError, `a PcacheError, got ${String(error)}`);
    assert.equal(error.code, code, error.message);
    assert.match(error.message, message);
    return true;
  };
}

async function open(t: TestContext, uri: string, connections = 2): Promise<NbdRemoteDevice> {
  const device = await NbdRemoteDevice.open(uri, { connections, limits: { connectTimeoutMs: 10_000 } });
  t.after(() => device.close());
  return device;
}

/** Writes, flushes and reads back 1 MiB through the device. */
async function roundTrip(device: NbdRemoteDevice, seed: number): Promise<void> {
  const data = patternBytes(MiB, seed);
  await device.write(data, 4 * MiB);
  await device.sync();
  const back = Buffer.alloc(MiB);
  await device.read(back, 4 * MiB);
  assert.ok(back.equals(data), 'the data came back through TLS');
}

function nbdkitTls(t: TestContext, flags: string[]): Promise<Nbdkit> {
  return Nbdkit.start(t, { plugin: 'memory', args: ['64M'], flags });
}

/** qemu-nbd serving a 64 MiB file on a Unix socket with `objectArgs` (its --object and --tls-creds). */
async function qemuNbd(t: TestContext, objectArgs: string[]): Promise<{ socket: string; file: string }> {
  requireTool('qemu-nbd', 'qemu-utils');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-qemu-nbd-'));
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, Buffer.alloc(64 * MiB));
  const socket = path.join(dir, 'nbd.sock');
  const child: ChildProcess = spawn('qemu-nbd', ['--persistent', '--shared=4', '-f', 'raw', '-k', socket, ...objectArgs, file], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (text: string) => { stderr += text; });
  // SIGKILL, as the nbdkit helper does: after a SIGTERM, qemu-nbd once (a full test run on a
  // loaded machine) stayed alive with no client left, and this hook waited for it for good.
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGKILL');
      await exited;
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });
  await waitUntil(() => {
    if (child.exitCode !== null) assert.fail(`qemu-nbd exited: ${stderr}`);
    return fs.existsSync(socket);
  }, 'qemu-nbd listens');
  return { socket, file };
}

describe('pcache\'s client against nbdkit over TLS', () => {
  it('nbds+unix:// with tls-certificates= to nbdkit --tls=require: two connections, data round trip', async (t) => {
    const fixture = tlsFixture();
    const nbdkit = await nbdkitTls(t, ['--tls=require', `--tls-certificates=${fixture.server}`]);
    const device = await open(t, `nbds+unix:///?socket=${nbdkit.socketPath}&tls-certificates=${fixture.clientNoCert}`);
    assert.equal(device.state().connectionsConnected, 2);
    assert.equal(device.sizeBytes, 64 * MiB);
    await roundTrip(device, 1);
  });

  it('nbdkit --tls-verify-peer: the client certificate from tls-certificates= is presented and accepted; without one the open is refused', async (t) => {
    const fixture = tlsFixture();
    const nbdkit = await nbdkitTls(t, ['--tls=require', `--tls-certificates=${fixture.server}`, '--tls-verify-peer']);
    await roundTrip(await open(t, `nbds+unix:///?socket=${nbdkit.socketPath}&tls-certificates=${fixture.client}`), 2);
    await assert.rejects(
      NbdRemoteDevice.open(`nbds+unix:///?socket=${nbdkit.socketPath}&tls-certificates=${fixture.clientNoCert}`),
      isCode('ENODEV', /closed the connection right after the TLS handshake \(does it accept certificates from .*client-no-cert/),
    );
  });

  it('nbdkit --tls-psk: the URI\'s user and tls-psk-file= connect; a wrong key is refused, naming the user', async (t) => {
    const fixture = tlsFixture();
    const nbdkit = await nbdkitTls(t, ['--tls=require', `--tls-psk=${fixture.psk}`]);
    await roundTrip(await open(t, `nbds+unix://alice@/?socket=${nbdkit.socketPath}&tls-psk-file=${fixture.psk}`), 3);
    await roundTrip(await open(t, `nbds+unix://bob@/?socket=${nbdkit.socketPath}&tls-psk-file=${fixture.psk}`), 4);
    await assert.rejects(
      NbdRemoteDevice.open(`nbds+unix://alice@/?socket=${nbdkit.socketPath}&tls-psk-file=${fixture.pskWrongKey}`),
      isCode('ENODEV', /PSK user alice/),
    );
  });

  it('reconnects over TLS after nbdkit restarts, and goes on serving', async (t) => {
    const fixture = tlsFixture();
    const nbdkit = await Nbdkit.start(t, (dir) => {
      fs.writeFileSync(path.join(dir, 'disk.img'), Buffer.alloc(16 * MiB));
      return { plugin: 'file', args: [`file=${path.join(dir, 'disk.img')}`], flags: ['--tls=require', `--tls-certificates=${fixture.server}`] };
    });
    const device = await NbdRemoteDevice.open(`nbds+unix:///?socket=${nbdkit.socketPath}&tls-certificates=${fixture.clientNoCert}`, {
      connections: 2, reconnect: { delayMinMs: 20, delayMaxMs: 200 },
    });
    t.after(() => device.close());
    await roundTrip(device, 5);
    await nbdkit.kill();
    await waitUntil(() => device.state().connectionsConnected === 0, 'the connections noticed nbdkit is gone');
    await nbdkit.restart();
    await waitUntil(() => device.state().connectionsConnected === 2, 'both connections are back, over TLS', 20_000);
    await roundTrip(device, 6);
  });
});

describe('pcache\'s client against qemu-nbd over TLS', () => {
  it('tls-creds-x509 (qemu-nbd verifies client certificates by default): the client certificate is presented', async (t) => {
    const fixture = tlsFixture();
    const qemu = await qemuNbd(t, ['--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${fixture.server}`, '--tls-creds', 'tls0']);
    await roundTrip(await open(t, `nbds+unix:///?socket=${qemu.socket}&tls-certificates=${fixture.client}`, 4), 7);
    const written = fs.readFileSync(qemu.file).subarray(4 * MiB, 5 * MiB);
    assert.ok(written.equals(patternBytes(MiB, 7)), 'qemu-nbd wrote what came through TLS to its file');
  });

  it('tls-creds-psk: alice\'s key', async (t) => {
    const fixture = tlsFixture();
    const qemu = await qemuNbd(t, ['--object', `tls-creds-psk,id=tls0,endpoint=server,dir=${fixture.pskDir}`, '--tls-creds', 'tls0']);
    await roundTrip(await open(t, `nbds+unix://alice@/?socket=${qemu.socket}&tls-psk-file=${fixture.psk}`), 8);
  });
});

describe('refusals, with the code and the message to act on', () => {
  it('nbds:// to a server without TLS: ENOTSUP, never a plaintext fallback', async (t) => {
    const nbdkit = await nbdkitTls(t, ['--tls=off']);
    await assert.rejects(
      NbdRemoteDevice.open(`nbds+unix:///?socket=${nbdkit.socketPath}&tls-certificates=${tlsFixture().clientNoCert}`),
      isCode('ENOTSUP', /does not offer TLS .* nbds:\/\/ URI requires it/),
    );
  });

  it('a plaintext nbd:// to nbdkit --tls=require: ENOTSUP naming nbds://', async (t) => {
    const nbdkit = await nbdkitTls(t, ['--tls=require', `--tls-certificates=${tlsFixture().server}`]);
    await assert.rejects(NbdRemoteDevice.open(`nbd+unix:///?socket=${nbdkit.socketPath}`), isCode('ENOTSUP', /requires TLS: connect with nbds:\/\//));
  });

  it('a server certificate from an unknown CA, an expired one, or for another name: EPERM with the reason', async (t) => {
    const fixture = tlsFixture();
    const foreign = await nbdkitTls(t, ['--tls=require', `--tls-certificates=${fixture.serverOtherCa}`]);
    await assert.rejects(
      NbdRemoteDevice.open(`nbds+unix:///?socket=${foreign.socketPath}&tls-certificates=${fixture.clientNoCert}`),
      isCode('EPERM', /TLS handshake failed: .*(unable to get local issuer|unable to verify)/),
    );
    const expired = await nbdkitTls(t, ['--tls=require', `--tls-certificates=${fixture.serverExpired}`]);
    await assert.rejects(
      NbdRemoteDevice.open(`nbds+unix:///?socket=${expired.socketPath}&tls-certificates=${fixture.clientNoCert}`),
      isCode('EPERM', /certificate has expired/),
    );
    const named = await nbdkitTls(t, ['--tls=require', `--tls-certificates=${fixture.server}`]);
    await assert.rejects(
      NbdRemoteDevice.open(`nbds+unix:///?socket=${named.socketPath}&tls-certificates=${fixture.clientNoCert}&tls-hostname=storage.example`),
      isCode('EPERM', /storage\.example.* is not in the cert's altnames/),
    );
    // The right name passes; and tls-verify-peer=false connects without checking anything.
    await roundTrip(await open(t, `nbds+unix:///?socket=${named.socketPath}&tls-certificates=${fixture.clientNoCert}&tls-hostname=localhost`), 9);
    await roundTrip(await open(t, `nbds+unix:///?socket=${expired.socketPath}&tls-verify-peer=false`), 10);
  });

  it('missing or malformed credential files: EINVAL before anything connects, naming the file', async () => {
    const fixture = tlsFixture();
    // A socket nobody listens on: the refusal must come before any connection attempt.
    const nowhere = path.join(os.tmpdir(), `pcache-nowhere-${process.pid}.sock`);
    await assert.rejects(NbdRemoteDevice.open(`nbds+unix:///?socket=${nowhere}&tls-certificates=/nonexistent/certs`), isCode('EINVAL', /\/nonexistent\/certs: no such file or directory/));
    await assert.rejects(NbdRemoteDevice.open(`nbds+unix:///?socket=${nowhere}&tls-certificates=${fixture.pskDir}`), isCode('EINVAL', /ca-cert\.pem: no such file/));
    await assert.rejects(NbdRemoteDevice.open(`nbds+unix://carol@/?socket=${nowhere}&tls-psk-file=${fixture.psk}`), isCode('EINVAL', /has no key for user 'carol'/));
    const bad = path.join(os.tmpdir(), `pcache-bad-${process.pid}.psk`);
    fs.writeFileSync(bad, 'alice=1234\n');
    try {
      await assert.rejects(NbdRemoteDevice.open(`nbds+unix://alice@/?socket=${nowhere}&tls-psk-file=${bad}`), isCode('EINVAL', /line 1: expected username:hexkey/));
    } finally {
      fs.rmSync(bad, { force: true });
    }
  });

  it('a server that hangs up in the middle of the TLS handshake: ENODEV, retried like a lost connection', async (t) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-tls-hangup-'));
    t.after(() => { fs.rmSync(dir, { recursive: true, force: true }); });
    const socketPath = path.join(dir, 'nbd.sock');
    // Greets, acknowledges STARTTLS, reads the ClientHello and hangs up.
    const server = net.createServer((socket) => {
      const greeting = Buffer.alloc(18);
      greeting.writeBigUInt64BE(0x4e42444d41474943n, 0);
      greeting.writeBigUInt64BE(0x49484156454f5054n, 8);
      greeting.writeUInt16BE(3, 16);
      socket.write(greeting);
      let received = 0;
      socket.on('data', (chunk: Buffer) => {
        received += chunk.length;
        if (received === 4 + 16) {
          const ack = Buffer.alloc(20);
          ack.writeBigUInt64BE(0x0003e889045565a9n, 0);
          ack.writeUInt32BE(5, 8);
          ack.writeUInt32BE(1, 12);
          socket.write(ack);
        } else if (received > 4 + 16) {
          socket.destroy();
        }
      });
      socket.on('error', () => undefined);
    });
    await new Promise<void>((resolve) => { server.listen(socketPath, resolve); });
    t.after(() => new Promise<void>((resolve) => { server.close(() => { resolve(); }); }));
    await assert.rejects(
      NbdRemoteDevice.open(`nbds+unix:///?socket=${socketPath}&tls-certificates=${tlsFixture().clientNoCert}`),
      isCode('ENODEV', /closed the connection during the TLS handshake \(does it accept certificates from/),
    );
  });
});
