// Real process kills, and power-loss states of the same runs rebuilt offline.
//
// A real `pcache serve` on real files (1 MiB segments and a cache smaller than the workload,
// so the log wraps, writeback and GC run) is driven by pcache's own NBD client with
// self-describing payloads: writes, FUA writes, flushes, trims and write-zeroes, several in
// flight, live reads checked as they complete. At a random moment the server's process group
// gets SIGKILL. It is started again and everything is read back and checked with
// the oracle: every sector holds its last durable value or a newer one, never garbage, never
// older; a second read gives the same. Each run also records both devices' writes and syncs
// (`serve --record-dir`); afterwards the power-loss states of the run at the kill instant —
// the durable contents plus subsets of the unsynced writes, torn at sector granularity — are
// rebuilt, recovered in-process and checked the same way, with the structural checker.
//
// PCACHE_KILL_SEED replays a seed; the seed is printed on failure.
import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Cache } from '../../../src/cache/cache.js';
import { ManualTimers } from '../../../src/lib/timers.js';
import { PcacheError, isPcacheError } from '../../../src/lib/errors.js';
import { NbdClient } from '../../../src/nbd/client/client.js';
import { readRecording } from '../../../src/device/recording_device.js';
import { MiB } from '../../../src/lib/units.js';
import { cacheDeviceBytesFor } from '../../../src/ondisk/layout.js';
import { combineStates, materialize, randomStates } from '../../../sim/crash_states.js';
import { fillPayload, formatViolation, RequestHistory, sectorValues, type HistoryRequest, type SectorViolation } from '../../../sim/oracle.js';
import { FilePageSource, recordingCrashPoint } from '../../../sim/recording_replay.js';
import { PageImage } from '../../../sim/page_image.js';
import { Prng } from '../../../sim/prng.js';
import { tempDir } from '../../helpers/files.js';
import { runCli, type ServeProcess, startServe } from '../../helpers/pcache.js';
import { sleep } from '../../helpers/wait.js';

const S = 512;
const cacheBytes = cacheDeviceBytesFor(20, MiB); // 20 segments of 1 MiB
const backingBytes = 16 * MiB;
const regionBytes = 12 * MiB; // what the workload touches; the rest must stay zero
const runs = 5;
const inFlightMax = 8;
const powerLossStatesPerRun = 40;

interface Extent {
  readonly offset: number;
  readonly length: number;
}

interface RunResult {
  readonly history: RequestHistory;
  readonly recordDir: string;
  readonly baseCache: string;
  readonly baseBacking: string;
  readonly liveViolations: SectorViolation[];
}

/** The client side of one run: random requests until the server dies. */
async function drive(socket: string, history: RequestHistory, prng: Prng, payloadIds: { next: number }, killAfterMs: number, server: ServeProcess): Promise<SectorViolation[]> {
  const client = await NbdClient.connect({ kind: 'unix', socketPath: socket }, { exportName: '' });
  const inFlight = new Map<HistoryRequest, Extent>();
  const liveViolations: SectorViolation[] = [];
  const overlapsInFlight = (extent: Extent): boolean =>
    [...inFlight.values()].some((other) => extent.offset < other.offset + other.length && other.offset < extent.offset + extent.length);
  const killAt = Date.now() + killAfterMs;
  let killed = false;
  const pending = new Set<Promise<void>>();
  while (!killed) {
    if (Date.now() >= killAt) {
      await server.crash();
      killed = true;
      break;
    }
    if (inFlight.size >= inFlightMax) {
      await Promise.race(pending);
      continue;
    }
    const sectors = prng.chance(0.7) ? 1 + prng.nextInt(16) : 1 + prng.nextInt(256);
    const extent = { offset: prng.nextInt(regionBytes / S - sectors) * S, length: sectors * S };
    const roll = prng.nextInt(100);
    if (roll >= 60 && roll < 70) {
      const flush = history.issueFlush();
      track(client.flush(), flush, undefined);
      continue;
    }
    if (overlapsInFlight(extent)) {
      await Promise.race([...pending, sleep(1)]);
      continue;
    }
    const fua = prng.chance(0.1);
    if (roll < 60) {
      const id = payloadIds.next++;
      const data = Buffer.alloc(extent.length);
      fillPayload(data, extent.offset, id);
      track(client.write(data, extent.offset, { fua }), history.issueWrite(extent.offset, extent.length, id, { fua }), extent);
    } else if (roll < 75) {
      track(client.trim(extent.offset, extent.length, { fua }), history.issueTrim(extent.offset, extent.length, { fua }), extent);
    } else if (roll < 80) {
      track(client.writeZeroes(extent.offset, extent.length, { fua }), history.issueWriteZeroes(extent.offset, extent.length, { fua }), extent);
    } else {
      const target = Buffer.alloc(extent.length);
      const read = history.issueRead(extent.offset, extent.length);
      track(client.read(target, extent.offset).then(() => {
        history.reply(read, true);
        liveViolations.push(...history.checkRead(read, target));
      }), undefined, extent, read);
    }
  }
  client.destroy(new PcacheError('ENODEV', 'the server was killed'));
  await Promise.allSettled(pending);
  return liveViolations;

  function track(io: Promise<void>, request: HistoryRequest | undefined, extent: Extent | undefined, read?: HistoryRequest): void {
    const key = request ?? read;
    if (key !== undefined && extent !== undefined) inFlight.set(key, extent);
    const settled: Promise<void> = io.then(
      () => { if (request !== undefined && !killed) history.reply(request, true); },
      (error: unknown) => {
        // Requests cut off by the kill get no reply: the oracle treats them as in flight.
        if (!isPcacheError(error)) throw error;
        if (!killed && request !== undefined) history.reply(request, false);
      },
    ).finally(() => {
      if (key !== undefined) inFlight.delete(key);
      pending.delete(settled);
    });
    pending.add(settled);
  }
}

/** Reads the whole backing-sized device through a fresh connection. */
async function readAll(socket: string): Promise<Buffer> {
  const client = await NbdClient.connect({ kind: 'unix', socketPath: socket }, { exportName: '' });
  const bytes = Buffer.alloc(backingBytes);
  for (let offset = 0; offset < backingBytes; offset += 4 * MiB) await client.read(bytes.subarray(offset, offset + 4 * MiB), offset);
  await client.disconnect();
  return bytes;
}

function historyFrom(bytes: Uint8Array): RequestHistory {
  const initial = sectorValues(bytes, 0);
  return new RequestHistory({ sizeBytes: backingBytes, initial: (sector) => initial[sector] ?? 0 });
}

function summarize(violations: readonly SectorViolation[], max = 6): string {
  return violations.slice(0, max).map(formatViolation).join('\n') + (violations.length > max ? `\n... and ${violations.length - max} more` : '');
}

/** Rebuilds power-loss states of a killed run and checks each one recovered in-process. */
async function checkPowerLoss(run: RunResult, backingIdentity: string, prng: Prng): Promise<{ states: number; violations: string[] }> {
  const cachePoint = recordingCrashPoint(readRecording(path.join(run.recordDir, 'cache.log')), new PageImage(cacheBytes, { source: new FilePageSource(run.baseCache) }), { device: 'cache' });
  const backingPoint = recordingCrashPoint(readRecording(path.join(run.recordDir, 'backing.log')), new PageImage(backingBytes, { source: new FilePageSource(run.baseBacking) }), { device: 'backing', identity: backingIdentity });
  const pairs = combineStates(randomStates(cachePoint, prng, powerLossStatesPerRun), randomStates(backingPoint, prng, 8), prng, powerLossStatesPerRun);
  const oracle = run.history.now();
  const violations: string[] = [];
  for (const pair of pairs) {
    const cacheDevice = materialize(pair.cache);
    const backingDevice = materialize(pair.backing);
    let cache: Cache;
    try {
      cache = await Cache.open({ cacheDevice, backingDevice, background: false, timers: new ManualTimers() });
    } catch (error) {
      violations.push(`state ${pair.key}: recovery failed: ${String(error)}`);
      continue;
    }
    const bytes = Buffer.alloc(backingBytes);
    for (let offset = 0; offset < backingBytes; offset += 4 * MiB) await cache.read(bytes.subarray(offset, offset + 4 * MiB), offset);
    const wrong = oracle.checkSectors(bytes, 0);
    if (wrong.length > 0) violations.push(`state ${pair.key}:\n${summarize(wrong)}`);
    const problems = await cache.check();
    if (problems.length > 0) violations.push(`state ${pair.key}: structural check: ${problems.join('; ')}`);
    cache.abandon();
  }
  return { states: pairs.length, violations };
}

describe('real process kills', () => {
  it('pcache serve killed with SIGKILL mid-workload: flushed data survives, reads are never garbage or older, and so do the power-loss states of each run', async (t: TestContext) => {
    const seed = Number(process.env.PCACHE_KILL_SEED ?? 7);
    const prng = new Prng(seed);
    const dir = tempDir(t, 'pcache-kill-');
    const cachePath = path.join(dir, 'cache.img');
    const backingPath = path.join(dir, 'backing.img');
    const socket = path.join(dir, 'nbd.sock');
    fs.writeFileSync(cachePath, Buffer.alloc(0));
    fs.truncateSync(cachePath, cacheBytes);
    fs.writeFileSync(backingPath, Buffer.alloc(0));
    fs.truncateSync(backingPath, backingBytes);
    const formatted = await runCli(['format', '--cache', cachePath, '--backing', backingPath, '--segment-size', '1M']);
    assert.equal(formatted.code, 0, formatted.stderr);
    const backingIdentity = `file:ino=${fs.statSync(backingPath).ino}`;
    const payloadIds = { next: 1 };
    let history = new RequestHistory({ sizeBytes: backingBytes });
    let powerLossStates = 0;
    try {
      for (let run = 0; run < runs; run++) {
        const recordDir = path.join(dir, `record-${run}`);
        fs.mkdirSync(recordDir);
        const result: RunResult = { history, recordDir, baseCache: path.join(dir, `base-cache-${run}.img`), baseBacking: path.join(dir, `base-backing-${run}.img`), liveViolations: [] };
        fs.copyFileSync(cachePath, result.baseCache);
        fs.copyFileSync(backingPath, result.baseBacking);
        const server = await startServe(t, ['--cache', cachePath, '--backing', backingPath, '--socket', socket, '--record-dir', recordDir], dir);
        const live = await drive(socket, history, prng, payloadIds, 300 + prng.nextInt(1200), server);
        assert.deepEqual(live.map(formatViolation), [], `seed ${seed} run ${run}: live reads`);
        assert.ok(history.length > 20, `seed ${seed} run ${run}: the workload ran (${history.length} requests)`);

        // Process kill: restart on the same files and read everything back twice.
        const restarted = await startServe(t, ['--cache', cachePath, '--backing', backingPath, '--socket', socket], dir);
        const first = await readAll(socket);
        const second = await readAll(socket);
        await restarted.stop();
        const wrong = history.now().checkSectors(first, 0);
        assert.equal(wrong.length, 0, `seed ${seed} run ${run}: after SIGKILL and restart:\n${summarize(wrong)}`);
        assert.ok(first.equals(second), `seed ${seed} run ${run}: two reads after the restart differ`);

        // Power loss at the kill instant: rebuilt from the run's recordings.
        const lost = await checkPowerLoss(result, backingIdentity, prng);
        assert.deepEqual(lost.violations, [], `seed ${seed} run ${run}: power-loss states`);
        powerLossStates += lost.states;
        history = historyFrom(first);
      }
      const check = await runCli(['check', '--cache', cachePath]);
      assert.equal(check.code, 0, `the structural checker after ${runs} kills: ${check.stdout} ${check.stderr}`);
      console.error(`real kills (seed ${seed}): ${runs} SIGKILLs and restarts, ${powerLossStates} power-loss states rebuilt from recordings, 0 violations`);
    } catch (error) {
      console.error(`real kill test failed: replay with PCACHE_KILL_SEED=${seed} node --test dist/test/cache/crash/kill.test.js`);
      throw error;
    }
  });
});
