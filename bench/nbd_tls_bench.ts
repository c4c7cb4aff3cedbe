// NBD over TLS: fio's nbd engine against `pcache serve --tls on` and against nbdkit's file
// plugin with `--tls=on`, each reached over TLS (nbds+unix://) and in plaintext (nbd+unix://)
// in the same run. --tls on lets one server answer both, so the plaintext runs measure the same
// process, cache and file, and the TLS/plain ratio is the cost of TLS alone.
//
// Workloads: 4 KiB random read QD32 and 1 MiB sequential read QD4, cache hits (the range is
// read through pcache once first), one fio job and one connection, as bench/nbd_fio_bench.ts
// explains. Reported per workload: pcache-TLS against nbdkit-TLS (the goal: at least parity,
// ratio >= 1.0), pcache-TLS against pcache-plain (what TLS costs pcache), and nbdkit-TLS against
// nbdkit-plain (what it costs nbdkit, for scale).
//
// Credentials: X.509 (an ECDSA P-256 server certificate) made by certtool at start (the test
// fixture, test/helpers/tls_fixture.ts); fio gets the CA through libnbd's per-user directory
// ($HOME/.pki/libnbd), since libnbd takes no file names from a URI unless the program allows it.
// Both servers negotiate TLS 1.3 with libnbd's GnuTLS; the cipher each chose is printed.
//
// Method: every round runs each workload once against each of the four (server, transport)
// pairs, rotating which goes first; medians over the rounds are compared. Files on tmpfs.
// PCACHE_BENCH_SMOKE=1: tiny sizes, one short round (the test suite runs that).

import { execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { tlsFixture } from '../test/helpers/tls_fixture.js';
import { median, param, report, smoke } from './harness.js';
import { fioJob, makeBenchFiles, removeScratch, requireTool, startNbdkitServer, startPcacheServe, stopChild, track, version } from './processes.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const backingBytes = param(64 * MiB, 1024 * MiB);
const cacheBytes = param(256 * MiB, 2048 * MiB);
/** The range every workload reads; it fits the cache, so pcache's reads are hits. */
const rangeBytes = param(32 * MiB, 512 * MiB);
const rounds = param(1, 5);
const runtime = param('300ms', '5s');
const rampTime = param('0', '1s');

interface Workload {
  readonly name: string;
  readonly rw: 'randread' | 'read';
  readonly blockSize: string;
  readonly depth: number;
  readonly unit: 'IOPS' | 'MiB/s';
}

const workloads: readonly Workload[] = [
  { name: '4K random read QD32', rw: 'randread', blockSize: '4k', depth: 32, unit: 'IOPS' },
  { name: '1M sequential read QD4', rw: 'read', blockSize: '1m', depth: 4, unit: 'MiB/s' },
];

type Server = 'pcache' | 'nbdkit';
type Transport = 'tls' | 'plain';
const pairs: readonly (readonly [Server, Transport])[] = [['pcache', 'tls'], ['nbdkit', 'tls'], ['pcache', 'plain'], ['nbdkit', 'plain']];

/** fio against `socket`, over TLS or not; `home` holds .pki/libnbd for libnbd. Returns IOPS or MiB/s. */
async function fio(socket: string, transport: Transport, home: string, workload: Workload): Promise<number> {
  const scheme = transport === 'tls' ? 'nbds+unix' : 'nbd+unix';
  const output = await new Promise<string>((resolve, reject) => {
    track(execFile('fio', [
      `--name=${workload.rw}`, '--ioengine=nbd', `--uri=${scheme}:///?socket=${socket}`, `--rw=${workload.rw}`,
      `--bs=${workload.blockSize}`, `--iodepth=${workload.depth}`, '--numjobs=1', '--thread', `--size=${rangeBytes}`,
      '--time_based', `--runtime=${runtime}`, `--ramp_time=${rampTime}`, '--norandommap', '--randrepeat=0', '--output-format=json',
    ], { env: { ...process.env, HOME: home }, maxBuffer: 64 * MiB, encoding: 'utf8', timeout: 600_000 }, (error, stdout, stderr) => {
      if (error !== null) reject(new Error(`fio failed (${scheme} to ${socket}): ${stderr || error.message}`));
      else resolve(stdout);
    }));
  });
  const job = fioJob(output, `${transport} against ${socket}`);
  return workload.unit === 'IOPS' ? job.read.iops : job.read.bw / KiB;
}

/** The cipher and key exchange a server negotiates with libnbd, as libnbd's debug output names them. */
async function negotiated(socket: string, home: string): Promise<string> {
  return new Promise((resolve) => {
    execFile('nbdinfo', [`nbds+unix:///?socket=${socket}`], { env: { ...process.env, HOME: home, LIBNBD_DEBUG: '1' }, encoding: 'utf8' }, (_error, _stdout, stderr) => {
      resolve(/connection is using TLS: (.*)$/m.exec(stderr)?.[1]?.trim() ?? 'unknown');
    });
  });
}

async function main(): Promise<void> {
  requireTool('fio', 'fio');
  requireTool('nbdkit', 'nbdkit');
  requireTool('nbdinfo', 'libnbd-bin');
  const fixture = tlsFixture();
  const { base, dir, backing, cache, control } = makeBenchFiles('pcache-tls-bench-', backingBytes, cacheBytes);
  // libnbd looks for ca-cert.pem (and client-cert.pem, client-key.pem) in $HOME/.pki/libnbd.
  const home = path.join(dir, 'home');
  fs.mkdirSync(path.join(home, '.pki'), { recursive: true });
  fs.cpSync(fixture.client, path.join(home, '.pki', 'libnbd'), { recursive: true });
  const children: ChildProcess[] = [];
  try {
    const sockets: Record<Server, string> = { pcache: path.join(dir, 'pcache.sock'), nbdkit: path.join(dir, 'nbdkit.sock') };
    // The sequential cutoff is off (sequential_cutoff_bytes=0): the warm-up reads the range in order, and with the cutoff on those reads would not be admitted; the benchmark measures the cache's own path.
    children.push(await startPcacheServe('pcache serve --tls on', dir, sockets.pcache, ['--cache', cache, '--backing', backing, '--control', control, '--tuning', 'sequential_cutoff_bytes=0', '--tls', 'on', '--tls-certificates', fixture.server]));
    children.push(await startNbdkitServer(dir, sockets.nbdkit, ['-f', '--exit-with-parent', '--tls=on', `--tls-certificates=${fixture.server}`, 'file', `file=${backing}`]));

    // Warm the range: one sequential pass through pcache fills it into the cache.
    await fio(sockets.pcache, 'plain', home, { name: 'warm', rw: 'read', blockSize: '1m', depth: 4, unit: 'MiB/s' });
    console.log(`machine: ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), Node ${process.version}, ${version('fio', ['--version'])}, ${version('nbdkit', ['--version'])}, ${version('nbdinfo', ['--version'])}; load average at start ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    console.log(`TLS with libnbd: pcache ${await negotiated(sockets.pcache, home)}, nbdkit ${await negotiated(sockets.nbdkit, home)}`);
    console.log(`files on ${base}: backing ${backingBytes / MiB} MiB, cache ${cacheBytes / MiB} MiB, range ${rangeBytes / MiB} MiB; ${rounds} round(s) of ${runtime} per run${smoke ? ' (smoke)' : ''}`);

    for (const workload of workloads) {
      const results = new Map<string, number[]>(pairs.map(([server, transport]) => [`${server}-${transport}`, []]));
      for (let round = 0; round < rounds; round++) {
        for (let turn = 0; turn < pairs.length; turn++) {
          const [server, transport] = pairs[(round + turn) % pairs.length] ?? ['pcache', 'tls'];
          results.get(`${server}-${transport}`)?.push(await fio(sockets[server], transport, home, workload));
        }
      }
      const m = (key: string): number => median(results.get(key) ?? []);
      report({ bench: 'nbd_tls', metric: `${workload.name} TLS vs nbdkit TLS`, value: m('pcache-tls'), unit: workload.unit, peer: 'nbdkit TLS', peerValue: m('nbdkit-tls') });
      report({ bench: 'nbd_tls', metric: `${workload.name} TLS vs plain`, value: m('pcache-tls'), unit: workload.unit, peer: 'pcache plain', peerValue: m('pcache-plain') });
      report({ bench: 'nbd_tls', metric: `${workload.name} nbdkit TLS vs plain`, value: m('nbdkit-tls'), unit: workload.unit, peer: 'nbdkit plain', peerValue: m('nbdkit-plain') });
      const ratio = m('pcache-tls') / m('nbdkit-tls');
      const runs = pairs.map(([server, transport]) => `${server} ${transport} ${(results.get(`${server}-${transport}`) ?? []).map(Math.round).join(' ')}`).join(' | ');
      console.log(`  ${workload.name}: pcache TLS / nbdkit TLS ${ratio.toFixed(2)}, goal >= 1.0: ${ratio >= 1 ? 'met' : 'MISSED'}; pcache TLS / plain ${(m('pcache-tls') / m('pcache-plain')).toFixed(2)}; runs ${runs}`);
    }
    console.log(`load average at end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  } finally {
    for (const child of children) await stopChild(child);
    removeScratch(dir);
  }
}

await main();
