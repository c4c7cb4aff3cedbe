// pcache in front of a real Ceph RBD image: one monitor and one OSD (bluestore over a sparse
// file, so the OSD can be stopped and started without losing its objects) started by
// scripts/ceph_cluster.sh, each image served by qemu-nbd --cache=none on a Unix socket, and
// `pcache serve --backing nbd+unix:///?socket=...` in front of it. Real clients throughout.
//
// - fio verifying crc32c through a cache a quarter the size of the data; after `drain`, the
//   image read straight through qemu-nbd equals what the clients read through pcache;
// - pcache SIGKILLed while a client writes generations separated by flushes: after a restart
//   every sector holds what the oracle allows (every flushed write, or something newer), and
//   after a drain so does the image itself;
// - the OSD stopped while a verifying fio writes: writes keep being acknowledged into the cache,
//   cached reads keep working, status says backing-offline; the OSD started again, writeback
//   resumes, fio verifies everything and the image holds every byte;
// - qemu-nbd restarted under dirty data, and the image resized underneath (the export's size
//   changes: a running pcache refuses the export and keeps the dirty data; a restart adopts the
//   new size) — nothing acknowledged is lost.
//
// Debian packages: ceph-mon ceph-osd ceph-common qemu-utils qemu-block-extra fio libnbd-bin.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { MiB } from '../../src/lib/units.js';
import { CephCluster } from '../helpers/ceph.js';
import { assertFilesEqual, tempDir } from '../helpers/files.js';
import { formatViolation, sectorValues } from '../../sim/oracle.js';
import { boundedProblems, GenerationWriter, oracleProblems, readRegion } from '../helpers/generations.js';
import { assertOneLineError, Child, controlStatus, runCli, startServe, type ServerStatus } from '../helpers/pcache.js';
import { fioVerifyJobs, nbdcopy, qemuIo, requireFioNbd, requireTool, uriFor } from '../helpers/tools.js';
import { sleep } from '../helpers/wait.js';

const imageBytes = 64 * MiB;

/** `pcache serve` arguments for a cache (16 MiB unless given; 1 MiB segments) in `dir` in front of `backingUri`. */
function serveArgs(dir: string, backingUri: string, tuning?: string, cacheSize = '16M'): string[] {
  return [
    '--cache', path.join(dir, 'cache.img'), '--cache-size', cacheSize, '--segment-size', '1M', '--backing', backingUri,
    '--socket', path.join(dir, 'nbd.sock'), '--control', path.join(dir, 'control.sock'),
    ...(tuning === undefined ? [] : ['--tuning', tuning]),
  ];
}

async function statusUntil(control: string, condition: (status: ServerStatus) => boolean, what: string, timeoutMs = 60_000): Promise<ServerStatus> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = await controlStatus(control);
    if (condition(status)) return status;
    if (Date.now() > deadline) assert.fail(`timed out waiting until ${what}; last status: ${JSON.stringify(status.cache)}`);
    await sleep(100);
  }
}

async function drain(control: string): Promise<void> {
  const drained = await runCli(['drain', '--control', control], { timeoutMs: 120_000 });
  assert.equal(drained.code, 0, drained.stderr);
}

describe('pcache in front of Ceph RBD', () => {
  let ceph: CephCluster | undefined;
  const cluster = (): CephCluster => {
    assert.ok(ceph !== undefined, 'the cluster started');
    return ceph;
  };

  before(async () => {
    requireTool('qemu-io', 'qemu-utils');
    requireTool('nbdcopy', 'libnbd-bin');
    ceph = await CephCluster.start({ fio: '64M', kill: '64M', outage: '64M', snap: '64M', swap: '64M' }, 'bluestore');
  });
  after(async () => { await ceph?.stop(); });

  it('fio verifies through a cache a quarter the size of its data; after drain the image equals what clients read', async (t) => {
    await requireFioNbd();
    const dir = tempDir(t, 'pcache-ceph-fio-');
    const server = await startServe(t, serveArgs(dir, cluster().uri('fio')), dir);
    const socket = path.join(dir, 'nbd.sock');
    const control = path.join(dir, 'control.sock');
    // 8 jobs x 8 MiB of random 4 KiB writes: 64 MiB through a 16 MiB cache, every block verified.
    await fioVerifyJobs(uriFor(socket), 8, 'ceph');
    const status = await controlStatus(control);
    assert.ok(status.cache.counters.writebackBytes >= 48 * MiB, `most of the data went to Ceph while fio ran: ${status.cache.counters.writebackBytes} bytes`);
    await drain(control);
    assert.equal((await controlStatus(control)).cache.dirtyBytes, 0);
    const throughCache = path.join(dir, 'through-cache.img');
    const direct = path.join(dir, 'direct.img');
    await nbdcopy([uriFor(socket), throughCache]);
    assert.equal(await server.stop(), 0);
    await nbdcopy([cluster().uri('fio'), direct]);
    assert.equal(fs.statSync(direct).size, imageBytes);
    assertFilesEqual(direct, throughCache, 'the image read through qemu-nbd and the export read through pcache');
  });

  it('keeps every flushed byte across a SIGKILL of pcache, and the image holds them after a drain', async (t) => {
    const dir = tempDir(t, 'pcache-ceph-kill-');
    const args = serveArgs(dir, cluster().uri('kill'), 'writeback_start_percent=0,writeback_stop_percent=0,writeback_idle_ms=50');
    const server = await startServe(t, args, dir);
    const socket = path.join(dir, 'nbd.sock');
    const regionBytes = 24 * MiB;
    const writer = await GenerationWriter.start(socket, { regionBytes, blockBytes: 64 * 1024, inFlight: 8, sizeBytes: imageBytes, seed: 17 });
    await writer.untilGenerations(3);
    await sleep(150); // into the fourth generation: writes acknowledged but not yet flushed
    await server.crash();
    await writer.stop();
    assert.ok(writer.failure !== undefined, 'the writer saw the server go');
    assert.ok(writer.flushedGenerations >= 3);

    const restarted = await startServe(t, args, dir);
    const view = writer.history.now();
    const first = await readRegion(socket, regionBytes);
    assert.deepEqual(oracleProblems(view, first), [], 'after the restart every sector holds its last flushed write or a newer one');
    const second = await readRegion(socket, regionBytes);
    assert.ok(Buffer.from(second).equals(first), 'a second read returns the same');
    await drain(path.join(dir, 'control.sock'));
    assert.equal(await restarted.stop(), 0);
    const direct = await readRegion(cluster().socket('kill'), regionBytes);
    assert.ok(Buffer.from(direct).equals(first), 'after the drain the image holds exactly what pcache served');
  });

  it('absorbs writes and serves cached reads while the OSD is down, then writes everything back when it returns', async (t) => {
    await requireFioNbd();
    const dir = tempDir(t, 'pcache-ceph-outage-');
    const socket = path.join(dir, 'nbd.sock');
    const control = path.join(dir, 'control.sock');
    await startServe(t, [
      ...serveArgs(dir, cluster().uri('outage'), 'writeback_start_percent=0,writeback_stop_percent=0,writeback_idle_ms=50,backing_offline_after_ms=500', '64M'),
    ], dir);
    // A region written and written back before the outage; read back (hits) while the OSD is
    // down. The cache (64 MiB) holds it and everything fio writes.
    const hit = { offset: 56 * MiB, length: 4 * MiB, byte: 0x5c };
    await qemuIo(uriFor(socket), [`write -P ${hit.byte} ${hit.offset} ${hit.length}`, 'flush']);
    await drain(control);

    // Two verifying jobs on [0, 8 MiB), each writing its 4 MiB at 192 KiB/s (about 21 s: the
    // outage falls inside), then reading it back.
    const fio = new Child(t, 'fio', [
      '--name=outage', '--ioengine=nbd', `--uri=${uriFor(socket)}`, '--rw=randwrite', '--bs=4k', '--size=4m', '--offset_increment=4m',
      '--numjobs=2', '--iodepth=4', '--rate=,192k', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0',
    ]);
    await sleep(1000);
    await cluster().osdStop();
    const offline = await statusUntil(control, (s) => s.cache.state === 'backing-offline', 'status says backing-offline');
    assert.match(offline.cache.stateReason ?? '', /^backing offline since /);
    const absorbedBefore = offline.cache.counters.writeRequests;
    await qemuIo(uriFor(socket), [`read -P ${hit.byte} ${hit.offset} ${hit.length}`]);
    await sleep(1000);
    const during = await controlStatus(control);
    assert.equal(during.cache.state, 'backing-offline');
    assert.ok(during.cache.counters.writeRequests > absorbedBefore, 'writes kept being acknowledged while the OSD was down');
    assert.ok(during.cache.counters.readHitRequests > offline.cache.counters.readHitRequests, 'the reads were cache hits');
    assert.ok(during.cache.dirtyBytes > 0, 'the absorbed writes wait in the cache');
    assert.ok(fio.running, `fio got no error while the OSD was down: ${fio.stderr}`);

    await cluster().osdStart();
    const exit = await fio.waitFor(120_000, 'fio once the OSD is back');
    assert.equal(exit.code, 0, `fio: ${fio.stderr}`);
    await statusUntil(control, (s) => s.cache.state === 'running', 'writeback resumes');
    await drain(control);
    const throughCache = path.join(dir, 'through-cache.img');
    const direct = path.join(dir, 'direct.img');
    await nbdcopy([uriFor(socket), throughCache]);
    await nbdcopy([cluster().uri('outage'), direct]);
    assertFilesEqual(direct, throughCache, 'the image and the export after the outage');
  });

  it('checkpoints: every RBD snapshot taken under `pcache checkpoint` holds every write flushed before it began and is a crash state of the client', async (t) => {
    const dir = tempDir(t, 'pcache-ceph-snap-');
    const control = path.join(dir, 'control.sock');
    // Writeback runs all the time, so every checkpoint has some to wait for and a round to stop.
    await startServe(t, serveArgs(dir, cluster().uri('snap'), 'writeback_start_percent=0,writeback_stop_percent=0,writeback_idle_ms=50', '64M'), dir);
    const regionBytes = 8 * MiB;
    const writer = await GenerationWriter.start(path.join(dir, 'nbd.sock'), { regionBytes, blockBytes: 64 * 1024, inFlight: 4, sizeBytes: imageBytes, seed: 5 });
    // The checkpoint begins (the server takes the log's durable head) somewhere between the
    // phase `before` ends and the phase `after` ends: the snapshot must hold everything flushed
    // before `before`, and nothing issued after `after`.
    const checkpoints: { name: string; before: number; after: number; flushedBefore: number; writebackMs: number; heldMs: number }[] = [];
    for (let index = 1; index <= 3; index++) {
      await writer.untilGenerations(checkpoints.length * 2 + 1);
      await sleep(30 * index); // somewhere inside a generation
      const flushedBefore = writer.flushedGenerations;
      const before = writer.nextPhase();
      const result = await runCli(['checkpoint', '--control', control, '--name', `ck${index}`, '--json',
        '--exec', `rbd -c ${cluster().conf} snap create rbd/snap@{name} && test "$PCACHE_CHECKPOINT_NAME" = {name}`], { timeoutMs: 120_000 });
      const after = writer.nextPhase();
      assert.equal(result.code, 0, result.stderr);
      const outcome = JSON.parse(result.stdout) as { name: string; writebackMs: number; heldMs: number; exitCode: number };
      assert.equal(outcome.name, `ck${index}`);
      assert.equal(outcome.exitCode, 0);
      checkpoints.push({ name: outcome.name, before, after, flushedBefore, writebackMs: outcome.writebackMs, heldMs: outcome.heldMs });
    }
    await writer.untilGenerations(checkpoints.length * 2 + 1);
    await writer.stop();
    assert.equal(writer.failure, undefined, 'the client saw no error while checkpoints ran');

    for (const checkpoint of checkpoints) {
      const file = path.join(dir, `${checkpoint.name}.img`);
      await cluster().rbd(['export', '--no-progress', `rbd/snap@${checkpoint.name}`, file]);
      const bytes = new Uint8Array(fs.readFileSync(file).subarray(0, regionBytes));
      assert.deepEqual(boundedProblems(writer.history, checkpoint.before, checkpoint.after, bytes), [], `snapshot ${checkpoint.name} holds every write flushed before its checkpoint and nothing that could not be there`);
      const prefix = writer.history.cut(checkpoint.after).checkEpochPrefix(sectorValues(bytes, 0), 0);
      assert.deepEqual(prefix.violations.slice(0, 3).map(formatViolation), [], `snapshot ${checkpoint.name} is a prefix of the flush epochs`);
      assert.ok((prefix.epoch ?? 0) >= checkpoint.flushedBefore, `snapshot ${checkpoint.name} holds epoch ${String(prefix.epoch)}, at least the ${checkpoint.flushedBefore} flushed before it`);
    }
    const during = writer.latencies.filter((sample) => checkpoints.some((checkpoint) => sample.phase === checkpoint.after)).map((sample) => sample.ms).sort((a, b) => a - b);
    const quantile = (sorted: number[], q: number): string => (sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? Number.NaN).toFixed(2);
    t.diagnostic(`checkpoints: ${checkpoints.map((checkpoint) => `${checkpoint.name} writeback ${checkpoint.writebackMs} ms, held ${checkpoint.heldMs} ms`).join('; ')}`);
    const outside = writer.latencies.filter((sample) => !checkpoints.some((checkpoint) => sample.phase === checkpoint.after)).map((sample) => sample.ms).sort((a, b) => a - b);
    const line = (sorted: number[]): string => `${sorted.length} requests: median ${quantile(sorted, 0.5)} ms, p99 ${quantile(sorted, 0.99)} ms, max ${quantile(sorted, 1)} ms`;
    t.diagnostic(`client write and flush latency while a checkpoint ran (${line(during)}); outside checkpoints (${line(outside)})`);
  });

  it('survives qemu-nbd restarting, refuses to start without it, and keeps dirty data when the image grows underneath', async (t) => {
    const dir = tempDir(t, 'pcache-ceph-swap-');
    const socket = path.join(dir, 'nbd.sock');
    const control = path.join(dir, 'control.sock');
    // Lazy writeback: what is written stays dirty until a drain.
    const args = serveArgs(dir, cluster().uri('swap'), 'writeback_start_percent=100,writeback_stop_percent=0,writeback_idle_ms=3600000,writeback_max_age_ms=3600000,backing_offline_after_ms=500');
    let server = await startServe(t, args, dir);
    await qemuIo(uriFor(socket), ['write -P 1 0 1M', 'flush']);

    // qemu-nbd goes away and comes back: writes and hits meanwhile, then everything written back.
    await cluster().nbdStop('swap');
    await qemuIo(uriFor(socket), ['write -P 2 1M 1M', 'flush', 'read -P 1 0 1M']);
    await statusUntil(control, (s) => s.backingRemote?.connectionsConnected === 0, 'pcache sees qemu-nbd gone');
    await cluster().nbdStart('swap');
    await drain(control);
    await qemuIo(cluster().uri('swap'), ['read -P 1 0 1M', 'read -P 2 1M 1M']);

    // Unreachable at start: one clear error, nothing lost.
    await qemuIo(uriFor(socket), ['write -P 3 2M 1M', 'flush']);
    assert.equal(await server.stop(), 0);
    await cluster().nbdStop('swap');
    assert.equal(fs.existsSync(cluster().socket('swap')), false, 'qemu-nbd is gone');
    const refused = await runCli(['serve', ...args], { timeoutMs: 20_000 });
    assertOneLineError(refused, 1, new RegExp(cluster().socket('swap').replaceAll('.', '\\.')));
    await cluster().nbdStart('swap');
    server = await startServe(t, args, dir);
    await qemuIo(uriFor(socket), ['read -P 3 2M 1M']);

    // The image grows underneath and qemu-nbd restarts with the new size: refused, data kept.
    await qemuIo(uriFor(socket), ['write -P 4 3M 1M', 'flush']);
    await cluster().rbd(['resize', '--size', '128M', 'rbd/swap']);
    await cluster().nbdStop('swap');
    await cluster().nbdStart('swap');
    await statusUntil(control, (s) => s.backingRemote !== null && s.backingRemote.connectionsConnected === 0 && /size changed/.test(s.backingRemote.lastError ?? ''), 'the resized export is refused');
    await qemuIo(uriFor(socket), ['read -P 4 3M 1M', 'write -P 5 4M 1M', 'flush']);
    assert.ok((await controlStatus(control)).cache.dirtyBytes >= 2 * MiB, 'the dirty data stays in the cache');
    // A restart adopts the new size (every cached range lies inside it) and writes everything back.
    assert.equal(await server.stop(), 0);
    server = await startServe(t, args, dir);
    await drain(control);
    assert.equal(await server.stop(), 0);
    await qemuIo(cluster().uri('swap'), ['read -P 1 0 1M', 'read -P 2 1M 1M', 'read -P 3 2M 1M', 'read -P 4 3M 1M', 'read -P 5 4M 1M', 'read -P 0 64M 1M']);
  });
});
