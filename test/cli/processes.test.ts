// One process per server: `pcache serve` runs in the process started, with no supervisor.
// The bin gives it a thread pool of 16 (a UV_THREADPOOL_SIZE the user set wins), `node
// dist/src/cli/main.js` libuv's default of 4; and for each way the README starts a server
// (`node dist/src/cli/main.js`, the bin through node, `npx pcache` stopped by Ctrl-C, that is
// SIGINT to its process group) a stop leaves no process of that group behind.
//
// libuv's worker threads carry no name of their own in Node 20 (every thread is "node"), so
// the pool is measured as the threads of the serving process less those of a bare node whose
// pool has one thread.

import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { tempDir } from '../helpers/files.js';
import { assertQuietLogs, cliEnv, type Launcher, mainPath, pcacheJson, startServe } from '../helpers/pcache.js';
import { waitUntil } from '../helpers/wait.js';

interface Started {
  readonly args: string[];
  readonly control: string;
}

function files(t: TestContext): Started {
  const dir = tempDir(t);
  const control = path.join(dir, 'control.sock');
  const args = ['--cache', path.join(dir, 'cache.img'), '--cache-size', '128M', '--backing', path.join(dir, 'backing.img'), '--backing-size', '16M',
    '--socket', path.join(dir, 'nbd.sock'), '--control', control];
  return { args, control };
}

async function serverStatus(control: string): Promise<{ pid: number; uvThreadPoolSize: number }> {
  return (await pcacheJson(['status', '--control', control, '--json'])) as { pid: number; uvThreadPoolSize: number };
}

function threads(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/task`).length;
}

/** The threads a node process runs besides libuv's pool: a bare node's, with a pool of one thread started. */
function threadsBesidesThePool(): Promise<number> {
  const script = "import fs from 'node:fs'; await fs.promises.readFile('/proc/self/stat'); console.log(fs.readdirSync('/proc/self/task').length);";
  return new Promise((resolve, reject) => {
    execFile(process.execPath, ['--input-type=module', '-e', script], { env: cliEnv({ UV_THREADPOOL_SIZE: '1' }), encoding: 'utf8' }, (error, stdout) => {
      if (error !== null) reject(new Error(`a bare node failed: ${error.message}`));
      else resolve(Number(stdout.trim()) - 1);
    });
  });
}

/** The processes whose process group is `pgid`, as `pid command` strings. */
function processGroup(pgid: number): string[] {
  const members: string[] = [];
  for (const entry of fs.readdirSync('/proc').filter((name) => /^\d+$/.test(name))) {
    let stat: string;
    try {
      stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
    } catch {
      continue; // gone meanwhile
    }
    // pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (Number(fields[2]) === pgid) members.push(`${entry} ${stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'))}`);
  }
  return members;
}

describe('one process per server', () => {
  const cases: { launcher: Launcher; env?: Record<string, string>; pool: number; what: string }[] = [
    { launcher: 'bin', pool: 16, what: 'the bin sizes the pool to 16' },
    { launcher: 'bin', env: { UV_THREADPOOL_SIZE: '6' }, pool: 6, what: 'the bin keeps the UV_THREADPOOL_SIZE the user set' },
    { launcher: 'main', pool: 4, what: 'node dist/src/cli/main.js has libuv\'s default pool' },
  ];
  for (const { launcher, env, pool, what } of cases) {
    it(`${what}, in the process started`, async (t) => {
      const started = files(t);
      const server = await startServe(t, started.args, '.', { launcher, ...(env === undefined ? {} : { env }) });
      const status = await serverStatus(started.control);
      assert.equal(status.pid, server.pid, 'the server is the process started, not a child of it');
      assert.equal(status.uvThreadPoolSize, pool, 'status reports the pool size');
      assert.equal(threads(server.pid) - await threadsBesidesThePool(), pool, 'threads in libuv\'s pool');
      assert.equal(await server.stop(), 0);
    });
  }

  for (const launcher of ['main', 'bin'] as const) {
    it(`SIGTERM stops a server started with ${launcher === 'main' ? 'node dist/src/cli/main.js' : 'node dist/src/cli/pcache.cjs'} and leaves no process behind`, async (t) => {
      const started = files(t);
      const server = await startServe(t, started.args, '.', { launcher });
      assert.equal(await server.stop('SIGTERM'), 0);
      assert.match(server.stdout, /stopped \(SIGTERM\)\n$/);
      assert.deepEqual(assertQuietLogs(server.stderr).map((line) => line.msg), ['serving', 'stopping', 'stopped']);
      assert.deepEqual(processGroup(server.pid), []);
    });
  }

  it('Ctrl-C (SIGINT to the process group) stops a server started with npx pcache, and leaves no process of the group behind', async (t) => {
    const started = files(t);
    // A first npx pcache, as after a fresh clone: an empty npm cache, so npx installs the
    // package into it again and runs its prepare script. That must leave dist/ as it is (a
    // rebuild that starts by emptying dist/, killed by a Ctrl-C, left no pcache to run).
    const npmCache = path.join(tempDir(t), 'npm-cache');
    const built = fs.statSync(mainPath).mtimeMs;
    const server = await startServe(t, started.args, '.', { launcher: 'npx', env: { npm_config_cache: npmCache, npm_config_offline: 'true' } });
    assert.ok(fs.existsSync(path.join(npmCache, '_npx')), 'npx installed the package into the fresh cache');
    assert.equal(fs.statSync(mainPath).mtimeMs, built, 'npx\'s prepare did not rebuild dist/');
    const { pid } = await serverStatus(started.control);
    assert.notEqual(pid, server.pid, 'npx runs the server under npm');
    assert.ok(processGroup(server.pid).some((member) => member.startsWith(`${pid} `)), 'in npx\'s process group');
    await server.stopGroup('SIGINT'); // npm then ends itself by the same signal
    assert.match(server.stdout, /stopped \(SIGINT\)\n$/, server.stderr.slice(-1000));
    const stops = server.stderr.split('\n').filter((line) => line.includes('"msg":"stopping"'));
    assert.equal(stops.length, 1, 'one stop, however many SIGINTs arrive');
    await waitUntil(() => processGroup(server.pid).length === 0, 'no process of the group is left');
  });
});
