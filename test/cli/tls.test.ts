// `pcache serve` over TLS, through the real command line: --tls require with certificates and
// with pre-shared keys on a Unix socket and on TCP (nbdinfo through the printed recipe, a
// plaintext client refused, a wrong key logged), the rule that a network address needs --tls
// require or --allow-insecure, every bad input refused at start with one line and the exit
// status docs/cli.md gives (nothing created, nothing listening), a backing device behind
// TLS (nbdkit --tls=require), and the files and sockets pcache creates being its user's only.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { tlsFixture } from '../helpers/tls_fixture.js';
import { tempDir } from '../helpers/files.js';
import { Nbdkit } from '../helpers/nbdkit.js';
import { assertOneLineError, logLines, runCli, startServe } from '../helpers/pcache.js';
import { requireTool, runTool } from '../helpers/tools.js';
import { waitUntil } from '../helpers/wait.js';
import { MiB } from '../../src/lib/units.js';

/** The serve arguments of a small cache and disk in `dir` (files created by serve). */
function devices(dir: string): string[] {
  return ['--cache', path.join(dir, 'cache.img'), '--cache-size', '80M', '--backing', path.join(dir, 'disk.img'), '--backing-size', '128M'];
}

/** The nbdinfo command line the server printed (`connect with: nbdinfo '...'`). */
function printedUri(line: string): string {
  const uri = /connect with: nbdinfo '([^']+)'/.exec(line)?.[1];
  assert.ok(uri !== undefined, `a connect recipe in: ${line}`);
  return uri;
}

describe('pcache serve --tls require', () => {
  it('certificates on a Unix socket: the printed nbds+unix:// recipe works, a plaintext client gets nothing, the log says TLS', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const fixture = tlsFixture();
    const dir = tempDir(t);
    const socket = path.join(dir, 'nbd.sock');
    const server = await startServe(t, [...devices(dir), '--socket', socket, '--tls', 'require', '--tls-certificates', fixture.server], dir);
    const line = await server.ready();
    assert.match(line, / at nbds\+unix:\/\/\/pcache\?socket=/);
    const uri = printedUri(line);
    assert.equal(uri, `nbds+unix:///pcache?socket=${socket}&tls-certificates=${fixture.server}`);
    const size = await runTool('nbdinfo', ['--size', uri]);
    assert.equal(size.code, 0, size.stderr);
    assert.equal(size.stdout.trim(), String(128 * MiB));
    const plain = await runTool('nbdinfo', ['--size', `nbd+unix:///pcache?socket=${socket}`]);
    assert.notEqual(plain.code, 0, 'a plaintext client is refused');
    assert.equal(await server.stop(), 0);
    const serving = logLines(server.stderr).find((entry) => entry.msg === 'serving');
    assert.equal(serving?.tls, 'require');
    assert.equal(serving.tlsCredentials, 'x509');
  });

  it('pre-shared keys on TCP bound to every address: served with --tls require alone; a wrong key is refused and logged, the server goes on', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const fixture = tlsFixture();
    const dir = tempDir(t);
    const server = await startServe(t, [...devices(dir), '--port', '0', '--bind', '0.0.0.0', '--tls', 'require', '--tls-psk', fixture.psk], dir);
    const line = await server.ready();
    const port = /nbds:\/\/0\.0\.0\.0:(\d+)\/pcache/.exec(line)?.[1];
    assert.ok(port !== undefined, line);
    assert.equal(printedUri(line), `nbds://alice@0.0.0.0:${port}/pcache?tls-psk-file=${fixture.psk}`);
    const good = await runTool('nbdinfo', ['--size', `nbds://alice@127.0.0.1:${port}/pcache?tls-psk-file=${fixture.psk}`]);
    assert.equal(good.code, 0, good.stderr);
    const wrong = await runTool('nbdinfo', ['--size', `nbds://alice@127.0.0.1:${port}/pcache?tls-psk-file=${fixture.pskWrongKey}`]);
    assert.notEqual(wrong.code, 0);
    await waitUntil(() => server.stderr.includes('TLS handshake failed'), 'the failure is logged');
    const again = await runTool('nbdinfo', ['--size', `nbds://bob@127.0.0.1:${port}/pcache?tls-psk-file=${fixture.psk}`]);
    assert.equal(again.code, 0, again.stderr);
    assert.equal(await server.stop(), 0);
    const failure = logLines(server.stderr).find((entry) => entry.msg === 'TLS handshake failed');
    assert.equal(failure?.level, 40, 'a warning');
    assert.match(String(failure.peer), /^127\.0\.0\.1:\d+$/);
    assert.match(String(failure.reason), /PSK username 'alice' failed \(wrong key\?\)/);
  });
});

describe('a network address needs --tls require, or --allow-insecure', () => {
  it('refuses --bind 0.0.0.0 without TLS, and with --tls on, saying why; nothing is created', async (t) => {
    const fixture = tlsFixture();
    const dir = tempDir(t);
    const plain = await runCli(['serve', ...devices(dir), '--port', '0', '--bind', '0.0.0.0']);
    assertOneLineError(plain, 2, /serve: 0\.0\.0\.0:0 is not a loopback address, and serving it without TLS lets anyone who can reach it read and write the disk: add --tls require .* or --allow-insecure/);
    const optional = await runCli(['serve', ...devices(dir), '--port', '0', '--bind', '::', '--tls-certificates', fixture.server]);
    assertOneLineError(optional, 2, /serving it with TLS optional \(--tls on lets a client in without TLS\)/);
    assert.deepEqual(fs.readdirSync(dir), [], 'nothing created');
  });

  it('--allow-insecure serves it anyway, with a warning in the log; loopback needs nothing', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const dir = tempDir(t);
    const server = await startServe(t, [...devices(dir), '--port', '0', '--bind', '0.0.0.0', '--allow-insecure'], dir);
    const port = /nbd:\/\/0\.0\.0\.0:(\d+)\//.exec(await server.ready())?.[1];
    const size = await runTool('nbdinfo', ['--size', `nbd://127.0.0.1:${port ?? ''}/pcache`]);
    assert.equal(size.code, 0, size.stderr);
    assert.equal(await server.stop(), 0);
    const warning = logLines(server.stderr).find((entry) => entry.level === 40);
    assert.match(warning?.msg ?? '', /without required TLS \(--allow-insecure\): anyone who reaches it can read and write the disk/);

    const loopback = await startServe(t, [...devices(dir), '--port', '0', '--bind', '127.0.0.1'], dir);
    assert.equal(await loopback.stop(), 0);
    assert.ok(logLines(loopback.stderr).every((entry) => entry.level <= 30), 'no warning on loopback');
  });
});

describe('bad TLS input is refused at start: one line, nothing created, nothing listening', () => {
  it('command-line mistakes exit with status 2', async (t) => {
    const fixture = tlsFixture();
    const dir = tempDir(t);
    const cases: [string[], RegExp][] = [
      [['--tls', 'require'], /--tls require needs credentials: --tls-certificates DIR .* or --tls-psk FILE/],
      [['--tls', 'on'], /--tls on needs credentials/],
      [['--tls', 'yes'], /--tls must be off, on or require, got 'yes'/],
      [['--tls-certificates', fixture.server, '--tls-psk', fixture.psk], /cannot be used together/],
      [['--tls-psk', fixture.psk, '--tls-verify-peer'], /--tls-verify-peer needs --tls-certificates/],
      [['--tls-verify-peer'], /--tls-verify-peer needs --tls-certificates/],
      [['--tls', 'off', '--tls-psk', fixture.psk], /--tls-psk makes no sense with --tls off/],
    ];
    for (const [flags, message] of cases) {
      const result = await runCli(['serve', ...devices(dir), '--socket', path.join(dir, 'nbd.sock'), ...flags]);
      assertOneLineError(result, 2, message);
    }
    assert.deepEqual(fs.readdirSync(dir), []);
  });

  it('missing, unreadable or malformed credentials exit with status 1, naming the file', async (t) => {
    const fixture = tlsFixture();
    const dir = tempDir(t);
    const broken = (name: string, files: Record<string, string | Buffer>): string => {
      const target = path.join(dir, 'creds', name);
      fs.mkdirSync(target, { recursive: true });
      for (const [file, content] of Object.entries(files)) fs.writeFileSync(path.join(target, file), content);
      return target;
    };
    const server = (file: string): Buffer => fs.readFileSync(path.join(fixture.server, file));
    const client = (file: string): Buffer => fs.readFileSync(path.join(fixture.client, file));
    const psk = (name: string, text: string): string => {
      const file = path.join(dir, 'creds', name);
      fs.mkdirSync(path.dirname(file), { recursive: true });
      fs.writeFileSync(file, text);
      return file;
    };
    const cases: [string[], RegExp][] = [
      [['--tls-certificates', path.join(dir, 'nope')], /--tls-certificates: TLS certificate directory .*nope: no such file or directory \(a server needs ca-cert\.pem, server-cert\.pem and server-key\.pem/],
      [['--tls-certificates', broken('no-key', { 'ca-cert.pem': server('ca-cert.pem'), 'server-cert.pem': server('server-cert.pem') })], /cannot read .*no-key\/server-key\.pem: no such file or directory/],
      [['--tls-certificates', broken('key-a-dir', { 'ca-cert.pem': server('ca-cert.pem'), 'server-cert.pem': server('server-cert.pem') })], /server-key\.pem/],
      [['--tls-certificates', broken('mismatch', { 'ca-cert.pem': server('ca-cert.pem'), 'server-cert.pem': server('server-cert.pem'), 'server-key.pem': client('client-key.pem') })], /mismatch\/server-key\.pem is not the private key of .*server-cert\.pem/],
      [['--tls-certificates', broken('garbage', { 'ca-cert.pem': 'not a certificate\n', 'server-cert.pem': server('server-cert.pem'), 'server-key.pem': server('server-key.pem') })], /garbage\/ca-cert\.pem holds no PEM certificate/],
      [['--tls-psk', path.join(dir, 'none.psk')], /--tls-psk: cannot read .*none\.psk: no such file or directory/],
      [['--tls-psk', psk('bad.psk', 'alice 0123\n')], /--tls-psk: PSK file .*bad\.psk, line 1: expected username:hexkey/],
      [['--tls-psk', psk('odd.psk', 'alice:abc\n')], /line 1: the key of alice is not an even number of hex digits/],
      [['--tls-psk', psk('twice.psk', 'alice:00ff\nbob:11\nalice:22\n')], /line 3: alice is listed twice/],
      [['--tls-psk', psk('empty.psk', '\n\n')], /holds no username:hexkey line/],
      [['--tls-psk', path.join(dir, 'creds')], /--tls-psk: .*creds is not a regular file/],
    ];
    // A directory where the key should be: unreadable as a file, even for root.
    fs.mkdirSync(path.join(dir, 'creds', 'key-a-dir', 'server-key.pem'));
    for (const [flags, message] of cases) {
      const result = await runCli(['serve', ...devices(dir), '--socket', path.join(dir, 'nbd.sock'), '--tls', 'require', ...flags]);
      assertOneLineError(result, 1, message);
    }
    assert.deepEqual(fs.readdirSync(dir), ['creds'], 'no cache or disk file created, no socket');
  });

  it('an expired server certificate is served, with a warning that verifying clients will refuse it', async (t) => {
    const dir = tempDir(t);
    const server = await startServe(t, [...devices(dir), '--socket', path.join(dir, 'nbd.sock'), '--tls', 'require', '--tls-certificates', tlsFixture().serverExpired], dir);
    assert.equal(await server.stop(), 0);
    const warning = logLines(server.stderr).find((entry) => entry.level === 40);
    assert.match(warning?.msg ?? '', /TLS server certificate has expired/);
    assert.equal(warning?.notAfter, '2020-12-31T00:00:00.000Z');
  });
});

describe('a backing device behind TLS', () => {
  it('serves a cache in front of nbdkit --tls=require reached by nbds+unix://; bad backing credentials fail the start with status 1', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const fixture = tlsFixture();
    const nbdkit = await Nbdkit.start(t, { plugin: 'memory', args: ['128M'], flags: ['--tls=require', `--tls-certificates=${fixture.server}`, '--tls-verify-peer'] });
    const dir = tempDir(t);
    const backing = `nbds+unix:///?socket=${nbdkit.socketPath}&tls-certificates=${fixture.client}`;
    const control = path.join(dir, 'control.sock');
    const server = await startServe(t, ['--cache', path.join(dir, 'cache.img'), '--cache-size', '80M', '--backing', backing, '--backing-connections', '2', '--socket', path.join(dir, 'nbd.sock'), '--control', control], dir);
    const status = await runCli(['status', '--control', control, '--json']);
    assert.equal(status.code, 0, status.stderr);
    const remote = (JSON.parse(status.stdout) as { backingRemote: { connectionsConnected: number; location: string } }).backingRemote;
    assert.equal(remote.connectionsConnected, 2);
    assert.equal(remote.location, `nbd:${nbdkit.socketPath}/`);
    const copied = await runTool('nbdinfo', ['--size', `nbd+unix:///pcache?socket=${path.join(dir, 'nbd.sock')}`]);
    assert.equal(copied.stdout.trim(), String(128 * MiB));
    assert.equal(await server.stop(), 0);

    const noCert = await runCli(['serve', '--cache', path.join(dir, 'cache.img'), '--backing', `nbds+unix:///?socket=${nbdkit.socketPath}&tls-certificates=${fixture.clientNoCert}`, '--socket', path.join(dir, 'nbd2.sock')]);
    assertOneLineError(noCert, 1, /closed the connection right after the TLS handshake \(does it accept certificates from .*client-no-cert/);
    const missing = await runCli(['serve', '--cache', path.join(dir, 'cache.img'), '--backing', `nbds+unix:///?socket=${nbdkit.socketPath}&tls-certificates=${path.join(dir, 'nope')}`, '--socket', path.join(dir, 'nbd2.sock')]);
    assertOneLineError(missing, 1, /nope: no such file or directory/);
    const plain = await runCli(['serve', '--cache', path.join(dir, 'cache.img'), '--backing', `nbd+unix:///?socket=${nbdkit.socketPath}`, '--socket', path.join(dir, 'nbd2.sock')]);
    assertOneLineError(plain, 1, /requires TLS: connect with nbds:\/\//);
  });
});

describe('what pcache creates is its user\'s only', () => {
  it('the cache and disk files it creates are 0600, and so is the control socket', async (t) => {
    const dir = tempDir(t);
    const control = path.join(dir, 'control.sock');
    const server = await startServe(t, [...devices(dir), '--socket', path.join(dir, 'nbd.sock'), '--control', control], dir);
    for (const file of ['cache.img', 'disk.img', 'control.sock']) {
      assert.equal(fs.statSync(path.join(dir, file)).mode & 0o777, 0o600, `${file} is the owner's only`);
    }
    assert.equal(await server.stop(), 0);
    const format = await runCli(['format', '--cache', path.join(dir, 'fresh.img'), '--cache-size', '80M', '--backing', path.join(dir, 'disk.img')]);
    assert.equal(format.code, 0, format.stderr);
    assert.equal(fs.statSync(path.join(dir, 'fresh.img')).mode & 0o777, 0o600, 'format --cache-size creates it 0600 too');
  });
});
