// Real TLS clients against NbdServer: nbdinfo and nbdcopy with nbds:// and nbds+unix:// URIs
// (libnbd's tls-certificates= and tls-psk-file=), qemu-img and qemu-io with tls-creds-x509
// (client certificates checked by --tls-verify-peer) and tls-creds-psk, fio's nbd engine over
// nbds+unix://; and the refusals a user meets: a plain client against --tls require, a wrong
// pre-shared key, a client certificate the server does not accept.
//
// The tools come from Debian packages (libnbd-bin, qemu-utils, fio); the credentials are made
// at test time by certtool and psktool (gnutls-bin). A missing tool fails its test with the
// package name. The server runs in this process: tools run asynchronously.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DeviceExport } from '../../../src/device/device_export.js';
import { MemoryDevice } from '../../../src/device/memory_device.js';
import { readCertificateDirectory, readPskFile } from '../../../src/lib/tls_credentials.js';
import { NbdServer } from '../../../src/nbd/server/server.js';
import type { NbdServerTls, NbdTlsFailure } from '../../../src/nbd/server/tls.js';
import { tlsFixture } from '../../helpers/tls_fixture.js';
import { patternBytes } from '../../helpers/bytes.js';
import { requireTool, runTool } from '../../helpers/tools.js';
import { waitUntil } from '../../helpers/wait.js';

const MiB = 1024 * 1024;
const deviceBytes = 64 * MiB;

interface Served {
  readonly server: NbdServer;
  readonly device: MemoryDevice;
  readonly socket: string;
  readonly port: number;
  readonly dir: string;
  readonly failures: NbdTlsFailure[];
}

/** A TLS server of a 64 MiB memory export, on a Unix socket and on 127.0.0.1 (same export). */
async function serve(t: TestContext, tls: NbdServerTls): Promise<Served> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-tls-interop-'));
  const device = new MemoryDevice(patternBytes(deviceBytes, 5));
  const failures: NbdTlsFailure[] = [];
  const make = (): NbdServer => new NbdServer({
    export: new DeviceExport(device), exportName: 'pcache', description: 'pcache over TLS', readOnly: false, tls,
    onTlsFailure: (failure) => { failures.push(failure); },
  });
  const server = make();
  const tcp = make();
  const socket = path.join(dir, 'nbd.sock');
  await server.listen({ path: socket });
  const bound = await tcp.listen({ port: 0, host: '127.0.0.1' });
  t.after(async () => {
    await server.close();
    await tcp.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { server, device, socket, port: 'port' in bound ? bound.port : 0, dir, failures };
}

function x509(mode: 'on' | 'require', dir: string, verifyPeer = false): NbdServerTls {
  return { mode, credentials: { kind: 'x509', files: readCertificateDirectory(dir, 'server'), verifyPeer } };
}

function psk(): NbdServerTls {
  return { mode: 'require', credentials: { kind: 'psk', keys: readPskFile(tlsFixture().psk) } };
}

interface NbdinfoReport {
  protocol: string;
  TLS: boolean;
  structured: boolean;
  exports: { 'export-name': string; 'export-size': number; description?: string }[];
}

async function nbdinfo(uri: string): Promise<NbdinfoReport> {
  const result = await runTool('nbdinfo', ['--json', uri]);
  assert.equal(result.code, 0, `nbdinfo ${uri} failed: ${result.stderr}`);
  return JSON.parse(result.stdout) as NbdinfoReport;
}

describe('libnbd clients over TLS (nbdinfo, nbdcopy, fio)', () => {
  it('nbdinfo: nbds+unix:// with tls-certificates=, and nbds:// over TCP (the server name checked), see the export over TLS', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const fixture = tlsFixture();
    const served = await serve(t, x509('require', fixture.server));
    for (const uri of [
      `nbds+unix:///pcache?socket=${served.socket}&tls-certificates=${fixture.client}`,
      `nbds://localhost:${served.port}/pcache?tls-certificates=${fixture.client}`,
      `nbds://127.0.0.1:${served.port}/pcache?tls-certificates=${fixture.client}`,
    ]) {
      const report = await nbdinfo(uri);
      assert.equal(report.TLS, true, uri);
      assert.equal(report.structured, true, uri);
      assert.deepEqual(report.exports.map((e) => [e['export-name'], e['export-size'], e.description]), [['pcache', deviceBytes, 'pcache over TLS']]);
    }
    assert.equal(served.server.stats().tlsSessionsTotal, 1);
    assert.deepEqual(served.failures, []);
  });

  it('nbdinfo with a pre-shared key: nbds+unix://alice@/...&tls-psk-file= (TLS 1.3 PSK, GnuTLS to OpenSSL)', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const fixture = tlsFixture();
    const served = await serve(t, psk());
    const report = await nbdinfo(`nbds+unix://alice@/pcache?socket=${served.socket}&tls-psk-file=${fixture.psk}`);
    assert.equal(report.TLS, true);
    assert.equal(report.exports[0]?.['export-size'], deviceBytes);
  });

  it('nbdcopy copies in and out over four TLS connections, byte for byte', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    const fixture = tlsFixture();
    const served = await serve(t, x509('require', fixture.server));
    const uri = `nbds+unix:///pcache?socket=${served.socket}&tls-certificates=${fixture.client}`;
    const source = path.join(served.dir, 'source.bin');
    const sourceBytes = patternBytes(24 * MiB, 23);
    fs.writeFileSync(source, sourceBytes);
    const copyIn = await runTool('nbdcopy', ['-C', '4', '-T', '4', '--flush', source, uri]);
    assert.equal(copyIn.code, 0, copyIn.stderr);
    assert.ok(served.server.stats().tlsSessionsTotal >= 4, `nbdcopy used four TLS connections (${served.server.stats().tlsSessionsTotal})`);
    assert.ok(Buffer.from(served.device.bytes.subarray(0, sourceBytes.length)).equals(sourceBytes), 'the copy landed intact');
    const out = path.join(served.dir, 'out.bin');
    const copyOut = await runTool('nbdcopy', ['-C', '4', '-T', '4', uri, out]);
    assert.equal(copyOut.code, 0, copyOut.stderr);
    assert.ok(fs.readFileSync(out).equals(Buffer.from(served.device.bytes)), 'the copy out equals the export');
  });

  it('fio\'s nbd engine over nbds+unix:// (certificates from $HOME/.pki/libnbd, as libnbd finds them) verifies every block', async (t) => {
    requireTool('fio', 'fio');
    const fixture = tlsFixture();
    const served = await serve(t, x509('require', fixture.server));
    // fio hands its URI to libnbd, which allows no file names in it by default: the
    // certificates come from the per-user directory libnbd looks in.
    const home = path.join(served.dir, 'home');
    fs.mkdirSync(path.join(home, '.pki'), { recursive: true });
    fs.cpSync(fixture.client, path.join(home, '.pki', 'libnbd'), { recursive: true });
    const result = await runToolWith({ HOME: home }, 'fio', [
      '--name=tls', '--ioengine=nbd', `--uri=nbds+unix:///pcache?socket=${served.socket}`, '--rw=randwrite', '--bs=4k',
      '--size=8m', '--numjobs=2', '--offset_increment=8m', '--iodepth=8', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1',
      '--verify_state_save=0', '--output-format=json',
    ]);
    assert.equal(result.code, 0, result.stderr);
    const report = JSON.parse(result.stdout.slice(result.stdout.indexOf('{'))) as { jobs: { error: number; read: { io_bytes: number } }[] };
    assert.deepEqual(report.jobs.map((job) => [job.error, job.read.io_bytes]), [[0, 8 * MiB], [0, 8 * MiB]]);
    assert.ok(served.server.stats().tlsSessionsTotal >= 2);
  });
});

describe('qemu over TLS (tls-creds-x509, tls-creds-psk)', () => {
  it('qemu-img info and qemu-io write and read back with a client certificate the server verifies (--tls-verify-peer)', async (t) => {
    requireTool('qemu-io', 'qemu-utils');
    const fixture = tlsFixture();
    const served = await serve(t, x509('require', fixture.serverCrl, true));
    // Over a Unix socket qemu has no host name to check the certificate against: give it one.
    const object = `tls-creds-x509,id=tls0,dir=${fixture.client},endpoint=client`;
    const info = await runTool('qemu-img', ['info', '--object', object, '--image-opts', `driver=nbd,server.type=unix,server.path=${served.socket},export=pcache,tls-creds=tls0,tls-hostname=localhost`]);
    assert.equal(info.code, 0, info.stderr);
    assert.match(info.stdout, /virtual size: 64 MiB \(67108864 bytes\)/);
    const io = await runTool('qemu-io', ['--object', object, '--image-opts',
      `driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port=${served.port},file.export=pcache,file.tls-creds=tls0`,
      '-c', 'write -P 0xab 4096 65536', '-c', 'read -P 0xab 4096 65536']);
    assert.equal(io.code, 0, io.stdout + io.stderr);
    assert.doesNotMatch(io.stdout + io.stderr, /fail|error|mismatch/i);
    assert.ok(Buffer.from(served.device.bytes.subarray(4096, 4096 + 65536)).equals(Buffer.alloc(65536, 0xab)), 'qemu-io wrote through TLS');
  });

  it('qemu-io with tls-creds-psk (dir with keys.psk, username alice)', async (t) => {
    requireTool('qemu-io', 'qemu-utils');
    const fixture = tlsFixture();
    const served = await serve(t, psk());
    const io = await runTool('qemu-io', ['--object', `tls-creds-psk,id=tls0,dir=${fixture.pskDir},username=alice,endpoint=client`, '--image-opts',
      `driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=${served.socket},file.export=pcache,file.tls-creds=tls0`,
      '-c', 'write -P 0x5c 0 8192', '-c', 'read -P 0x5c 0 8192']);
    assert.equal(io.code, 0, io.stdout + io.stderr);
    assert.ok(Buffer.from(served.device.bytes.subarray(0, 8192)).equals(Buffer.alloc(8192, 0x5c)));
  });
});

describe('refusals real clients see', () => {
  it('a plaintext nbdinfo against --tls require learns TLS is required and sees no export; qemu-img fails too', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    requireTool('qemu-img', 'qemu-utils');
    const served = await serve(t, x509('require', tlsFixture().server));
    const plain = await runTool('nbdinfo', ['--json', `nbd+unix:///pcache?socket=${served.socket}`]);
    assert.notEqual(plain.code, 0);
    assert.doesNotMatch(plain.stdout, /export-size/);
    const list = await runTool('nbdinfo', ['--list', `nbd+unix:///?socket=${served.socket}`]);
    assert.notEqual(list.code, 0, 'no export list in plaintext');
    const qemu = await runTool('qemu-img', ['info', `nbd+unix:///pcache?socket=${served.socket}`]);
    assert.notEqual(qemu.code, 0);
    assert.match(qemu.stderr, /TLS/i);
    assert.equal(served.server.stats().tlsSessionsTotal, 0);
  });

  it('a wrong pre-shared key and an unknown user are refused, the reasons reported, and the right key still works', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const fixture = tlsFixture();
    const served = await serve(t, psk());
    const wrong = await runTool('nbdinfo', [`nbds+unix://alice@/pcache?socket=${served.socket}&tls-psk-file=${fixture.pskWrongKey}`]);
    assert.notEqual(wrong.code, 0);
    const bob = path.join(served.dir, 'mallory.psk');
    fs.writeFileSync(bob, `mallory:${fixture.aliceKeyHex}\n`, { mode: 0o600 });
    const unknown = await runTool('nbdinfo', [`nbds+unix://mallory@/pcache?socket=${served.socket}&tls-psk-file=${bob}`]);
    assert.notEqual(unknown.code, 0);
    await waitUntil(() => served.failures.length === 2, 'two failures reported');
    assert.match(served.failures[0]?.reason ?? '', /PSK username 'alice' failed \(wrong key\?\)/);
    assert.match(served.failures[1]?.reason ?? '', /unknown PSK username 'mallory'/);
    assert.equal((await nbdinfo(`nbds+unix://alice@/pcache?socket=${served.socket}&tls-psk-file=${fixture.psk}`)).TLS, true);
  });

  it('--tls-verify-peer: qemu without a client certificate, nbdinfo with an expired one or one from another CA, are refused', async (t) => {
    requireTool('qemu-img', 'qemu-utils');
    requireTool('nbdinfo', 'libnbd-bin');
    const fixture = tlsFixture();
    const served = await serve(t, x509('require', fixture.server, true));
    const qemu = await runTool('qemu-img', ['info', '--object', `tls-creds-x509,id=tls0,dir=${fixture.clientNoCert},endpoint=client`, '--image-opts',
      `driver=nbd,server.type=unix,server.path=${served.socket},export=pcache,tls-creds=tls0,tls-hostname=localhost`]);
    assert.notEqual(qemu.code, 0, 'qemu without a client certificate must be refused');
    // qemu checks its own certificate before it connects; libnbd presents whatever it has.
    for (const dir of [fixture.clientExpired, fixture.clientOtherCa]) {
      const info = await runTool('nbdinfo', [`nbds+unix:///pcache?socket=${served.socket}&tls-certificates=${dir}`]);
      assert.notEqual(info.code, 0, `${path.basename(dir)} must be refused`);
    }
    await waitUntil(() => served.failures.length === 3, 'three failures reported');
    // GnuTLS may hold back a certificate the server's CA list does not name ("peer did not
    // return a certificate"), or send it and have it rejected: refused either way, and said.
    for (const failure of served.failures) assert.match(failure.reason, /certificate/);
    assert.equal(served.server.stats().tlsSessionsTotal, 0);
  });
});

/** runTool with extra environment variables (the child takes the environment when it is spawned, synchronously). */
function runToolWith(env: Record<string, string>, command: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const saved = Object.fromEntries(Object.keys(env).map((name) => [name, process.env[name]]));
  Object.assign(process.env, env);
  try {
    return runTool(command, args, 120_000);
  } finally {
    for (const [name, value] of Object.entries(saved)) {
      if (value === undefined) Reflect.deleteProperty(process.env, name);
      else process.env[name] = value;
    }
  }
}
