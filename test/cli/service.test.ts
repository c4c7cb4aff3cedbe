// `pcache serve` as a well-behaved service: --pid-file; systemd socket activation
// (LISTEN_PID/LISTEN_FDS, driven by systemd-socket-activate as nbdkit's and qemu-nbd's are
// tested) on a Unix socket and on TCP, with the network-address rule applied to an inherited
// socket; readiness and stopping reported to NOTIFY_SOCKET (received here by a small python3
// datagram listener, since node has no Unix datagram sockets); and docs/pcache.service with
// docs/pcache.socket, checked by systemd-analyze verify and run: its ExecStart= line, with
// this machine's paths, under systemd-socket-activate.
//
// systemd-socket-activate, systemd-notify and systemd-analyze come from the Debian package
// systemd, python3 from python3; a missing tool fails its test with the package name.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { tlsFixture } from '../helpers/tls_fixture.js';
import { tempDir } from '../helpers/files.js';
import { cliEnv, cliPath, logLines, runCli, startServe } from '../helpers/pcache.js';
import { requireTool, runTool } from '../helpers/tools.js';
import { waitUntil } from '../helpers/wait.js';

const docs = fileURLToPath(new URL('../../../docs/', import.meta.url));

/** A NOTIFY_SOCKET of our own: a python3 process receiving sd_notify datagrams, one line per message. */
class NotifyListener {
  readonly path: string;
  readonly messages: string[] = [];

  private constructor(socketPath: string, child: ChildProcess) {
    this.path = socketPath;
    let buffered = '';
    child.stdout?.setEncoding('utf8').on('data', (text: string) => {
      buffered += text;
      const lines = buffered.split('\n');
      buffered = lines.pop() ?? '';
      this.messages.push(...lines.filter((line) => line !== 'listening'));
    });
  }

  static async start(t: TestContext, dir: string): Promise<NotifyListener> {
    requireTool('python3', 'python3');
    const socketPath = path.join(dir, 'notify.sock');
    // Received file descriptors (systemd-notify's barrier) are closed, as systemd does: that
    // is what tells systemd-notify its message was read.
    const program = [
      'import socket, sys, os, array',
      's = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)',
      's.bind(sys.argv[1])',
      'print("listening", flush=True)',
      'while True:',
      '    msg, anc, flags, addr = s.recvmsg(65536, socket.CMSG_SPACE(64))',
      '    for level, kind, data in anc:',
      '        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:',
      '            fds = array.array("i")',
      '            fds.frombytes(data[:len(data) - len(data) % 4])',
      '            for fd in fds: os.close(fd)',
      '    print(msg.decode().replace("\\n", " "), flush=True)',
    ].join('\n');
    const child = spawn('python3', ['-c', program, socketPath], { stdio: ['ignore', 'pipe', 'inherit'] });
    t.after(() => { child.kill('SIGKILL'); });
    const listener = new NotifyListener(socketPath, child);
    await waitUntil(() => fs.existsSync(socketPath), 'the notify listener is bound');
    return listener;
  }

  /** The first message holding `text`, once it has arrived. */
  async message(text: string): Promise<string> {
    await waitUntil(() => this.messages.some((message) => message.includes(text)), `a notification with ${text}: ${this.messages.join(' / ')}`);
    return this.messages.find((message) => message.includes(text)) ?? '';
  }
}

/** A process started as systemd-socket-activate starts it: it execs into `command`, so its PID is the server's. */
class Activated {
  readonly child: ChildProcess;
  stdout = '';
  stderr = '';
  readonly exited: Promise<number | null>;

  constructor(t: TestContext, listen: string[], env: Record<string, string>, command: string[], cwd: string) {
    requireTool('systemd-socket-activate', 'systemd');
    const args = [...listen.flatMap((address) => ['-l', address]), ...Object.entries(env).map(([name, value]) => `-E${name}=${value}`), ...command];
    this.child = spawn('systemd-socket-activate', args, { cwd, env: cliEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout?.setEncoding('utf8').on('data', (text: string) => { this.stdout += text; });
    this.child.stderr?.setEncoding('utf8').on('data', (text: string) => { this.stderr += text; });
    this.exited = new Promise((resolve) => { this.child.on('exit', (code) => { resolve(code); }); });
    t.after(() => { this.child.kill('SIGKILL'); });
  }

  /** pcache serve's JSON log lines (systemd-socket-activate's own lines are not JSON). */
  logs(): ReturnType<typeof logLines> {
    return logLines(this.stderr.split('\n').filter((line) => line.startsWith('{')).join('\n'));
  }

  async stop(): Promise<number | null> {
    this.child.kill('SIGTERM');
    return this.exited;
  }
}

/** Waits until `target` accepts a connection (systemd-socket-activate execs its command on the first one). */
async function knock(target: string | number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const socket = typeof target === 'string' ? net.connect(target) : net.connect(target, '127.0.0.1');
    socket.once('connect', () => { socket.destroy(); resolve(); });
    socket.once('error', reject);
  });
}

/** A TCP port that was free a moment ago. */
async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => { server.listen(0, '127.0.0.1', resolve); });
  const address = server.address();
  await new Promise<void>((resolve) => { server.close(() => { resolve(); }); });
  assert.ok(address !== null && typeof address === 'object');
  return address.port;
}

function serveCommand(dir: string, extra: string[] = []): string[] {
  return [process.execPath, cliPath, 'serve', '--cache', path.join(dir, 'cache.img'), '--cache-size', '80M',
    '--backing', path.join(dir, 'disk.img'), '--backing-size', '128M', ...extra];
}

describe('--pid-file', () => {
  it('holds the server\'s PID while it serves, and is gone after it stops', async (t) => {
    const dir = tempDir(t);
    const pidFile = path.join(dir, 'pcache.pid');
    const server = await startServe(t, serveCommand(dir, ['--socket', path.join(dir, 'nbd.sock'), '--pid-file', pidFile]).slice(3), dir);
    assert.equal(fs.readFileSync(pidFile, 'utf8'), `${server.pid}\n`);
    assert.equal(fs.statSync(pidFile).mode & 0o777, 0o644);
    assert.equal(await server.stop(), 0);
    assert.equal(fs.existsSync(pidFile), false);
  });

  it('a PID file that cannot be written fails the start with status 1 and one line', async (t) => {
    const dir = tempDir(t);
    const result = await runCli(serveCommand(dir, ['--socket', path.join(dir, 'nbd.sock'), '--pid-file', path.join(dir, 'missing', 'pcache.pid')]).slice(2));
    assert.equal(result.code, 1, result.stderr);
    assert.match(result.stderr, /^pcache: cannot write the PID file .*missing\/pcache\.pid: ENOENT/m);
    assert.equal(fs.existsSync(path.join(dir, 'nbd.sock')), false, 'nothing left listening');
  });
});

describe('systemd socket activation', () => {
  it('serves the Unix socket systemd passes, reports it, tells NOTIFY_SOCKET it is ready and stopping, and leaves the socket file to systemd', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const dir = tempDir(t);
    const socket = path.join(dir, 'activated.sock');
    const notify = await NotifyListener.start(t, dir);
    const control = path.join(dir, 'control.sock');
    const server = new Activated(t, [socket], { NOTIFY_SOCKET: notify.path }, serveCommand(dir, ['--control', control, '--pid-file', path.join(dir, 'pid')]), dir);
    await waitUntil(() => fs.existsSync(socket), 'systemd-socket-activate listens');
    const size = await runTool('nbdinfo', ['--size', `nbd+unix:///pcache?socket=${socket}`]);
    assert.equal(size.code, 0, size.stderr + server.stderr);
    const ready = await notify.message('READY=1');
    assert.match(ready, new RegExp(`MAINPID=${server.child.pid ?? 0} READY=1 STATUS=serving nbd\\+unix:///pcache\\?socket=${socket}`));
    assert.match(server.stdout, new RegExp(`at nbd\\+unix:///pcache\\?socket=${socket}`), 'the printed URI names the inherited socket');
    const status = await runCli(['status', '--control', control, '--json']);
    assert.equal((JSON.parse(status.stdout) as { pid: number }).pid, server.child.pid, 'the PID systemd started is the server');
    assert.equal(await server.stop(), 0);
    assert.match(await notify.message('STOPPING=1'), /STATUS=stopping \(SIGTERM\)/);
    const serving = server.logs().find((entry) => entry.msg === 'serving');
    assert.equal(serving?.socketActivated, true);
    assert.ok(fs.existsSync(socket), 'the socket file is systemd\'s: pcache does not remove it');
  });

  it('an inherited TCP socket on 127.0.0.1 is served; one on 0.0.0.0 without TLS is refused once activated; with --tls require it is served', async (t) => {
    requireTool('nbdinfo', 'libnbd-bin');
    const fixture = tlsFixture();
    const dir = tempDir(t);
    const loopback = await freePort();
    const local = new Activated(t, [`127.0.0.1:${loopback}`], {}, serveCommand(dir), dir);
    await waitUntil(async () => knock(loopback).then(() => true, () => false), 'the loopback socket listens');
    const size = await runTool('nbdinfo', ['--size', `nbd://127.0.0.1:${loopback}/pcache`]);
    assert.equal(size.code, 0, size.stderr + local.stderr);
    assert.equal(await local.stop(), 0);

    const open = await freePort();
    const insecure = new Activated(t, [`0.0.0.0:${open}`], {}, serveCommand(dir), dir);
    await waitUntil(async () => knock(open).then(() => true, () => false), 'the socket listens');
    assert.equal(await insecure.exited, 1);
    assert.match(insecure.stderr, new RegExp(`pcache: the socket systemd passed: 0\\.0\\.0\\.0:${open} is not a loopback address, and serving it without TLS lets anyone`));

    const secure = new Activated(t, [`0.0.0.0:${open}`], {}, serveCommand(dir, ['--tls', 'require', '--tls-psk', fixture.psk]), dir);
    await waitUntil(async () => knock(open).then(() => true, () => false), 'the socket listens again');
    const tls = await runTool('nbdinfo', ['--size', `nbds://alice@127.0.0.1:${open}/pcache?tls-psk-file=${fixture.psk}`]);
    assert.equal(tls.code, 0, tls.stderr + secure.stderr);
    assert.equal(await secure.stop(), 0);
  });

  it('refuses --socket under socket activation (status 2), and more than one inherited socket (status 1)', async (t) => {
    const dir = tempDir(t);
    const both = new Activated(t, [path.join(dir, 'a.sock')], {}, serveCommand(dir, ['--socket', path.join(dir, 'mine.sock')]), dir);
    await waitUntil(() => fs.existsSync(path.join(dir, 'a.sock')), 'listening');
    await knock(path.join(dir, 'a.sock'));
    assert.equal(await both.exited, 2);
    assert.match(both.stderr, /pcache: serve: --socket and --port cannot be used under systemd socket activation/);

    const two = new Activated(t, [path.join(dir, 'b.sock'), path.join(dir, 'c.sock')], {}, serveCommand(dir), dir);
    await waitUntil(() => fs.existsSync(path.join(dir, 'c.sock')), 'listening');
    await knock(path.join(dir, 'b.sock'));
    assert.equal(await two.exited, 1);
    assert.match(two.stderr, /pcache: systemd passed 2 sockets \(LISTEN_FDS=2\); pcache serves one/);
    assert.deepEqual(fs.readdirSync(dir).filter((file) => file.endsWith('.img')), [], 'nothing created');
  });
});

describe('NOTIFY_SOCKET without socket activation', () => {
  it('READY=1 once it serves (with its URI as STATUS), STOPPING=1 when asked to stop', async (t) => {
    const dir = tempDir(t);
    const notify = await NotifyListener.start(t, dir);
    const socket = path.join(dir, 'nbd.sock');
    const server = await startServe(t, serveCommand(dir, ['--socket', socket]).slice(3), dir, { env: { NOTIFY_SOCKET: notify.path } });
    assert.match(await notify.message('READY=1'), new RegExp(`^MAINPID=${server.pid} READY=1 STATUS=serving nbd\\+unix:///pcache\\?socket=${socket}$`));
    assert.equal(await server.stop(), 0);
    await notify.message('STOPPING=1');
    assert.ok(logLines(server.stderr).every((entry) => entry.level <= 30), 'no notification failure logged');
  });
});

describe('docs/pcache.service and docs/pcache.socket', () => {
  /** The unit files with this machine's node, the built pcache, and `dir` for /run/pcache and the devices. */
  function localUnits(dir: string): { service: string; socket: string } {
    const cache = path.join(dir, 'cache.img');
    const disk = path.join(dir, 'disk.img');
    fs.writeFileSync(cache, Buffer.alloc(0));
    fs.truncateSync(cache, 80 * 1024 * 1024);
    fs.writeFileSync(disk, Buffer.alloc(0));
    fs.truncateSync(disk, 128 * 1024 * 1024);
    const local = (text: string): string => text
      .replaceAll('/usr/bin/node', process.execPath)
      .replaceAll('/opt/pcache/dist/src/cli/pcache.cjs', cliPath)
      .replaceAll('/dev/disk/by-id/nvme-EXAMPLE-part3', cache)
      .replaceAll('/dev/disk/by-id/wwn-EXAMPLE', disk)
      .replaceAll('/run/pcache/', `${dir}/`)
      .replace('--metrics 127.0.0.1:9187', '--metrics 127.0.0.1:0');
    return { service: local(fs.readFileSync(path.join(docs, 'pcache.service'), 'utf8')), socket: local(fs.readFileSync(path.join(docs, 'pcache.socket'), 'utf8')) };
  }

  /** The value of `key=` in a unit file, continuation lines joined. */
  function setting(unit: string, key: string): string {
    const joined = unit.replace(/\\\n\s*/g, ' ');
    const line = joined.split('\n').find((candidate) => candidate.startsWith(`${key}=`));
    assert.ok(line !== undefined, `the unit sets ${key}=`);
    return line.slice(key.length + 1).trim();
  }

  it('systemd-analyze verify accepts them (with this machine\'s paths)', async (t) => {
    requireTool('systemd-analyze', 'systemd');
    const dir = tempDir(t);
    const units = localUnits(dir);
    fs.writeFileSync(path.join(dir, 'pcache.service'), units.service);
    fs.writeFileSync(path.join(dir, 'pcache.socket'), units.socket);
    const verify = await runTool('systemd-analyze', ['verify', path.join(dir, 'pcache.service'), path.join(dir, 'pcache.socket')]);
    assert.equal(verify.code, 0, verify.stdout + verify.stderr);
    assert.equal(verify.stderr.trim(), '', 'no warnings');
    assert.equal(setting(units.service, 'Type'), 'notify');
    assert.equal(setting(units.service, 'NotifyAccess'), 'all', 'pcache notifies through a child process');
  });

  it('ExecStart= serves the socket of ListenStream= under socket activation, is ready, drains and stops on SIGTERM', async (t) => {
    requireTool('qemu-io', 'qemu-utils');
    const dir = tempDir(t);
    const units = localUnits(dir);
    const socket = setting(units.socket, 'ListenStream');
    assert.equal(socket, path.join(dir, 'nbd.sock'));
    const command = setting(units.service, 'ExecStart').split(/\s+/);
    assert.ok(!command.includes('--socket') && !command.includes('--port'), 'the socket comes from pcache.socket');
    const notify = await NotifyListener.start(t, dir);
    const server = new Activated(t, [socket], { NOTIFY_SOCKET: notify.path }, command, dir);
    await waitUntil(() => fs.existsSync(socket), 'the socket unit listens');
    const write = await runTool('qemu-io', ['-f', 'raw', '-c', 'write -P 0x7e 0 1M', `nbd+unix:///pcache?socket=${socket}`]);
    assert.equal(write.code, 0, write.stderr + server.stderr);
    await notify.message('READY=1');
    const pid = Number(fs.readFileSync(path.join(dir, 'pcache.pid'), 'utf8'));
    assert.equal(pid, server.child.pid);
    const status = await runCli(['status', '--control', path.join(dir, 'control.sock'), '--json']);
    assert.equal(status.code, 0, status.stderr);
    assert.equal(await server.stop(), 0);
    assert.ok(server.logs().some((entry) => entry.msg === 'drained before exit'), '--drain-on-exit wrote everything back');
    assert.ok(fs.readFileSync(path.join(dir, 'disk.img')).subarray(0, 1024 * 1024).equals(Buffer.alloc(1024 * 1024, 0x7e)), 'the disk holds the write');
    assert.equal(fs.existsSync(path.join(dir, 'pcache.pid')), false);
  });
});
