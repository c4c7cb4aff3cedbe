// The backing server goes away under a running `pcache serve` (nbdkit's file plugin on a Unix
// socket, reached through --backing nbd+unix://, SIGKILLed and later restarted on the same
// socket), in the middle of a verifying fio workload and under a writer that goes past the
// dirty high-water mark.
//
// What must hold while it is away: no error reaches the client while dirty space lasts; hits
// are still served; writes are absorbed up to the dirty high-water mark and then held (not
// failed, not dropped); pcache reconnects with back-off; status says backing-offline and
// "backing offline since ..."; the log says 'backing device offline' (warn) and then 'backing
// device back online'. After it returns and a drain, every byte is in the backing store.
//
// Tools (Debian packages): nbdkit, fio (with its nbd engine), qemu-utils (qemu-io), libnbd-bin
// (nbdcopy). A missing one fails the test naming the package.

import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, it } from 'node:test';
import { KiB, MiB } from '../../src/lib/units.js';
import { assertFilesEqual, scratchDir } from '../helpers/files.js';
import { Nbdkit } from '../helpers/nbdkit.js';
import { Child, controlStatus, logLines, runCli, type ServerStatus, startServe } from '../helpers/pcache.js';
import { type FioJobReport, nbdcopy, qemuIo, requireFioNbd, requireTool, uriFor } from '../helpers/tools.js';
import { sleep, waitUntil } from '../helpers/wait.js';

const warn = 40;

/** Polls the server's status until `condition` holds; fails naming `what` (and the last status). */
async function statusUntil(control: string, condition: (status: ServerStatus) => boolean, what: string, timeoutMs = 15_000): Promise<ServerStatus> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = await controlStatus(control);
    if (condition(status)) return status;
    if (Date.now() > deadline) assert.fail(`timed out waiting until ${what}; last status: ${JSON.stringify({ backingRemote: status.backingRemote, state: status.cache.state, dirtyBytes: status.cache.dirtyBytes })}`);
    await sleep(50);
  }
}

function hasLogLine(stderr: string, msg: string, level?: number): boolean {
  return logLines(stderr).some((line) => line.msg === msg && (level === undefined || line.level === level));
}

interface FioReport {
  jobs: FioJobReport[];
}

describe('backing server outage', () => {
  it('is invisible to a verifying fio workload: hits served, writes absorbed, back-off reconnect, then every byte in the backing store', async (t) => {
    requireTool('nbdkit', 'nbdkit');
    requireTool('qemu-io', 'qemu-utils');
    requireTool('nbdcopy', 'libnbd-bin');
    await requireFioNbd();
    const dir = scratchDir(t, 1024 * MiB, 'pcache-outage-');
    const backingBytes = 128 * MiB;
    const backing = path.join(dir, 'backing.img');
    const initial = randomFillSync(Buffer.alloc(backingBytes));
    fs.writeFileSync(backing, initial);
    const kit = await Nbdkit.start(t, { plugin: 'file', args: [`file=${backing}`] });
    const socket = path.join(dir, 'nbd.sock');
    const control = path.join(dir, 'control.sock');
    const connections = 4;
    const server = await startServe(t, [
      '--cache', path.join(dir, 'cache.img'), '--cache-size', '512M', '--backing', kit.uri, '--backing-connections', String(connections),
      '--socket', socket, '--control', control,
      // Write back at once, always (so writeback runs throughout), and call the backing device
      // offline soon after writeback starts failing.
      '--tuning', 'writeback_start_percent=0,writeback_stop_percent=0,writeback_idle_ms=100,backing_offline_after_ms=500,sequential_cutoff_bytes=0',
    ], dir);

    // A region written before the outage, read back (cache hits) while the backing is away.
    const hitRegion = { offset: 96 * MiB, length: 8 * MiB, byte: 0x5c };
    await qemuIo(uriFor(socket), [`write -P ${hitRegion.byte} ${hitRegion.offset} ${hitRegion.length}`, 'flush']);
    const before = await statusUntil(control, (s) => s.cache.dirtyBytes === 0, 'the first region is written back');

    // Four verifying jobs on [0, 64 MiB), each writing its 16 MiB at 1 MiB/s (the outage falls
    // in the middle of the write phase), then reading every block back and checking it.
    const jobs = 4;
    const jobBytes = 16 * MiB;
    const fio = new Child(t, 'fio', [
      '--name=outage', '--ioengine=nbd', `--uri=${uriFor(socket)}`, '--rw=randwrite', '--bs=4k',
      `--size=${jobBytes}`, `--offset_increment=${jobBytes}`, `--numjobs=${jobs}`, '--iodepth=8', '--rate=,1m',
      '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json',
    ]);
    const fioStartedMs = Date.now();
    await statusUntil(control, (s) => s.cache.counters.writebackBytes >= before.cache.counters.writebackBytes + 2 * MiB, 'writeback runs during the workload');
    await sleep(Math.max(0, fioStartedMs + 4000 - Date.now()));
    assert.ok(fio.running, `fio is still writing when the backing server is killed: ${fio.stderr}`);

    // --- The backing server dies. ---
    await kit.kill('SIGKILL');
    const killedMs = Date.now();
    const offline = await statusUntil(control, (s) => s.cache.state === 'backing-offline', 'status says backing-offline');
    assert.ok(offline.cache.backingOfflineSince !== undefined && !Number.isNaN(Date.parse(offline.cache.backingOfflineSince)), `backingOfflineSince is a time: ${String(offline.cache.backingOfflineSince)}`);
    assert.ok(Math.abs(Date.parse(offline.cache.backingOfflineSince) - killedMs) < 5000, `offline since about the kill: ${offline.cache.backingOfflineSince}`);
    assert.match(offline.cache.stateReason ?? '', /^backing offline since /);
    assert.ok(offline.backingRemote !== null, 'status shows the remote backing device');
    assert.equal(offline.backingRemote.connectionsConnected, 0);
    assert.ok(offline.backingRemote.offlineSince !== undefined, 'the remote device says since when it is offline');
    const table = await runCli(['status', '--control', control]);
    assert.equal(table.code, 0, table.stderr);
    assert.match(table.stdout, /^state +backing-offline \(backing offline since \d{4}-\d\d-\d\dT[\d:.]+Z/m, table.stdout);
    assert.match(table.stdout, /^backing +nbd\+unix:.*, offline since \d{4}-/m, table.stdout);
    await waitUntil(() => hasLogLine(server.stderr, 'backing device offline', warn), "a warn log line 'backing device offline'");

    // Hits are served while the backing device is away: the region written before, verified.
    const hitsBefore = offline.cache.counters.readHitRequests;
    const read = await qemuIo(uriFor(socket), [`read -P ${hitRegion.byte} ${hitRegion.offset} ${hitRegion.length}`]);
    assert.match(read.stdout + read.stderr, new RegExp(`read ${hitRegion.length}/${hitRegion.length} bytes`));
    const afterRead = await controlStatus(control);
    assert.ok(afterRead.cache.counters.readHitRequests > hitsBefore, 'the reads were cache hits');
    assert.equal(afterRead.cache.counters.readMissRequests, offline.cache.counters.readMissRequests, 'none of them needed the backing device');

    // Stay away for a few seconds: writes go on being absorbed, no error reaches fio.
    await sleep(Math.max(0, killedMs + 4000 - Date.now()));
    const during = await controlStatus(control);
    const outageMs = Date.now() - killedMs;
    assert.equal(during.cache.state, 'backing-offline');
    assert.ok(during.cache.counters.writeRequests > offline.cache.counters.writeRequests, 'writes kept coming in and were absorbed while offline');
    assert.ok(during.cache.dirtyBytes > 0, 'the absorbed writes are dirty, kept in the cache');
    assert.ok(fio.running, `fio got no error while the backing server was away: ${fio.stderr}`);
    // Back-off: reconnection rounds (one attempt per connection each) with doubling delays from
    // 100 ms, not one every 100 ms.
    const attempts = during.backingRemote?.reconnectAttempts ?? 0;
    const roundsMax = Math.ceil(Math.log2(outageMs / 100 + 1)) + 2;
    assert.ok(attempts >= connections, `pcache tries to reconnect (${attempts} attempts)`);
    assert.ok(attempts <= connections * roundsMax, `reconnection backs off: ${attempts} attempts in ${outageMs} ms, at most ${connections * roundsMax} expected`);

    // --- The backing server comes back on the same socket, with fio still writing. ---
    assert.ok(fio.running, `the outage falls inside the workload: ${fio.stderr}`);
    await kit.restart();
    await waitUntil(() => hasLogLine(server.stderr, 'backing device back online'), "the log line 'backing device back online'", 20_000);
    await statusUntil(control, (s) => s.cache.state === 'running' && s.backingRemote?.connectionsConnected === connections, 'the cache runs again on every connection', 30_000);

    const exit = await fio.waitFor(60_000, 'fio');
    assert.equal(exit.code, 0, `fio exit status; stderr: ${fio.stderr}`);
    const report = JSON.parse(fio.stdout.slice(fio.stdout.indexOf('{'))) as FioReport;
    assert.equal(report.jobs.length, jobs);
    for (const job of report.jobs) {
      assert.equal(job.error, 0, `fio job ${job.jobname} saw no error`);
      assert.equal(job.write.io_bytes, jobBytes, 'every block was written');
      assert.equal(job.read.io_bytes, jobBytes, 'every block was read back and verified');
    }

    const drained = await runCli(['drain', '--control', control]);
    assert.equal(drained.code, 0, drained.stderr);
    assert.match(drained.stdout, /^drained in [\d.]+ s/);
    const clean = await controlStatus(control);
    assert.equal(clean.cache.dirtyBytes, 0);

    // Every byte: the export (through pcache) equals the backing file, which holds each fio
    // block (all changed), the region written first, and the rest as it was.
    const exported = path.join(dir, 'export.img');
    await nbdcopy([uriFor(socket), exported]);
    assertFilesEqual(exported, backing, 'the export read through pcache and the backing file');
    const stored = fs.readFileSync(backing);
    const fioEnd = jobs * jobBytes;
    let unchanged = 0;
    for (let offset = 0; offset < fioEnd; offset += 4 * KiB) {
      if (stored.subarray(offset, offset + 4 * KiB).equals(initial.subarray(offset, offset + 4 * KiB))) unchanged++;
    }
    assert.equal(unchanged, 0, 'every 4 KiB block fio wrote reached the backing file');
    assert.ok(stored.subarray(hitRegion.offset, hitRegion.offset + hitRegion.length).equals(Buffer.alloc(hitRegion.length, hitRegion.byte)), 'the region written first is in the backing file');
    assert.ok(stored.subarray(fioEnd, hitRegion.offset).equals(initial.subarray(fioEnd, hitRegion.offset)), 'nothing else changed');
    assert.ok(stored.subarray(hitRegion.offset + hitRegion.length).equals(initial.subarray(hitRegion.offset + hitRegion.length)), 'nothing else changed');

    for (const line of logLines(server.stderr)) assert.ok(line.level <= warn, `no error logged: ${JSON.stringify(line)}`);
    assert.equal(await server.stop(), 0, 'the server stops cleanly');
  });

  it('holds writes at the dirty high-water mark while the backing server is away, then lets them finish', async (t) => {
    requireTool('nbdkit', 'nbdkit');
    requireTool('qemu-io', 'qemu-utils');
    const dir = scratchDir(t, 512 * MiB, 'pcache-highwater-');
    const backingBytes = 64 * MiB;
    const backing = path.join(dir, 'backing.img');
    const model = Buffer.alloc(backingBytes);
    fs.writeFileSync(backing, model);
    const kit = await Nbdkit.start(t, { plugin: 'file', args: [`file=${backing}`] });
    const socket = path.join(dir, 'nbd.sock');
    const control = path.join(dir, 'control.sock');
    const server = await startServe(t, [
      '--cache', path.join(dir, 'cache.img'), '--cache-size', '128M', '--backing', kit.uri, '--socket', socket, '--control', control,
      '--tuning', 'writeback_start_percent=0,writeback_stop_percent=0,writeback_idle_ms=100,backing_offline_after_ms=500,dirty_high_water_percent=10,space_wait_timeout_ms=0,sequential_cutoff_bytes=0',
    ], dir);
    const highWater = (await controlStatus(control)).cache.dirtyHighWaterBytes;
    assert.ok(highWater > 4 * MiB && highWater < 20 * MiB, `10% of a 128 MiB cache: ${highWater} bytes`);

    await kit.kill('SIGKILL');
    // A first write is absorbed; writeback then finds the backing device gone.
    await qemuIo(uriFor(socket), ['write -P 1 0 1M']);
    model.fill(1, 0, MiB);
    await statusUntil(control, (s) => s.cache.state === 'backing-offline', 'status says backing-offline');

    // One writer, 1 MiB at a time, well past the high-water mark.
    const writes = Math.ceil(highWater / MiB) + 12;
    const commands: string[] = [];
    for (let i = 1; i <= writes; i++) {
      commands.push('-c', `write -P ${i + 1} ${i * MiB} 1M`);
      model.fill(i + 1, i * MiB, (i + 1) * MiB);
    }
    const writer = new Child(t, 'qemu-io', ['-f', 'raw', ...commands, '-c', 'flush', uriFor(socket)]);

    // It is held once dirty data reaches the mark: dirty bytes stop growing, at the mark.
    let last = -1;
    let stableSinceMs = Date.now();
    await statusUntil(control, (s) => {
      if (s.cache.dirtyBytes !== last) {
        last = s.cache.dirtyBytes;
        stableSinceMs = Date.now();
      }
      return s.cache.dirtyBytes >= highWater && Date.now() - stableSinceMs >= 1500;
    }, 'dirty data reaches the high-water mark and stays there');
    const held = await controlStatus(control);
    assert.ok(held.cache.dirtyBytes <= highWater + MiB, `writes are held at the mark: ${held.cache.dirtyBytes} dirty bytes, high-water ${highWater} (one 1 MiB write may straddle it)`);
    assert.ok(writer.running, `the writer is held, not finished: ${writer.stdout} ${writer.stderr}`);
    await sleep(2000);
    const stillHeld = await controlStatus(control);
    assert.equal(stillHeld.cache.dirtyBytes, held.cache.dirtyBytes, 'nothing more was absorbed, nothing was dropped');
    assert.equal(stillHeld.cache.state, 'backing-offline');
    assert.ok(writer.running, 'the writer is still held');
    assert.doesNotMatch(writer.stdout + writer.stderr, /fail|error/i, 'no error reached the held writer');

    await kit.restart();
    const exit = await writer.waitFor(60_000, 'the held writer once the backing server is back');
    assert.equal(exit.code, 0, writer.stdout + writer.stderr);
    assert.doesNotMatch(writer.stdout + writer.stderr, /fail|error/i);
    assert.equal(writer.stdout.match(/^wrote 1048576\/1048576 bytes/gm)?.length, writes, writer.stdout);
    await waitUntil(() => hasLogLine(server.stderr, 'backing device back online'), "the log line 'backing device back online'");

    const drained = await runCli(['drain', '--control', control]);
    assert.equal(drained.code, 0, drained.stderr);
    assert.equal((await controlStatus(control)).cache.dirtyBytes, 0);
    assert.ok(fs.readFileSync(backing).equals(model), 'every held write reached the backing file, nothing else changed');
    assert.equal(await server.stop(), 0, 'the server stops cleanly');
  });
});
