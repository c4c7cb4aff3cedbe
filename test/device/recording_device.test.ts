// RecordingDevice tests. Goal: a side log written through a real file rebuilds the same
// power-loss states the simulator would have seen live: the durable prefix up to the last
// completed sync, volatile writes after it (in-flight ones included), failed syncs handled
// as Linux does, and a log cut short by a kill still readable up to its last whole record.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FileDevice } from '../../src/device/file_device.js';
import { PcacheError } from '../../src/lib/errors.js';
import { materialize, prefixState, standardStates } from '../../sim/crash_states.js';
import { Prng } from '../../sim/prng.js';
import { readRecording, RecordingDevice } from '../../src/device/recording_device.js';
import { FilePageSource, recordingCrashPoint, saveImage } from '../../sim/recording_replay.js';
import { IoScheduler, SimDevice } from '../../sim/sim_device.js';
import { PageImage } from '../../sim/page_image.js';

const deviceBytes = 64 * 1024;
let directory = '';

before(() => {
  directory = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-recording-'));
});

after(() => {
  fs.rmSync(directory, { recursive: true, force: true });
});

function freshPaths(name: string): { device: string; base: string; log: string } {
  return { device: path.join(directory, `${name}.img`), base: path.join(directory, `${name}.base`), log: path.join(directory, `${name}.log`) };
}

function filled(length: number, value: number): Uint8Array {
  return new Uint8Array(length).fill(value);
}

function byteAt(image: { read(target: Uint8Array, offsetBytes: number): void }, offset: number): number {
  const byte = new Uint8Array(1);
  image.read(byte, offset);
  return byte[0] ?? -1;
}

describe('RecordingDevice', () => {
  it('round-trips writes and syncs of a real file into the same crash states', async () => {
    const paths = freshPaths('roundtrip');
    FileDevice.create(paths.device, deviceBytes);
    const start = fs.readFileSync(paths.device);
    start[100] = 42;
    fs.writeFileSync(paths.device, start);
    fs.copyFileSync(paths.device, paths.base);
    const file = await FileDevice.open(paths.device, { blocking: true });
    const device = RecordingDevice.create(file, paths.log);
    await device.write(filled(4096, 1), 0);
    device.blocking?.writeSync(filled(512, 2), 8192);
    await device.sync();
    await device.write(filled(4096, 3), 4096);
    await device.discard(8192, 512);
    await device.close();

    const recording = readRecording(paths.log);
    assert.equal(recording.sizeBytes, deviceBytes);
    assert.equal(recording.trailingBytes, 0);
    assert.deepEqual(
      recording.entries.map((entry) => entry.kind),
      ['writeIssue', 'writeComplete', 'writeIssue', 'writeComplete', 'syncIssue', 'syncComplete', 'writeIssue', 'writeComplete', 'discardIssue', 'writeComplete'],
    );
    const source = new FilePageSource(paths.base);
    try {
      const point = recordingCrashPoint(recording, new PageImage(deviceBytes, { source }));
      assert.deepEqual([byteAt(point.durable, 0), byteAt(point.durable, 100), byteAt(point.durable, 4096), byteAt(point.durable, 8192)], [1, 1, 0, 2]);
      assert.deepEqual(point.volatile.map((write) => [write.offsetBytes, write.data === undefined ? 'zeroes' : 'data']), [
        [4096, 'data'],
        [8192, 'zeroes'],
      ]);
      // Everything applied is exactly the file a process kill leaves behind.
      const killed = materialize(prefixState(point, 2));
      const expected = fs.readFileSync(paths.device);
      const rebuilt = new Uint8Array(deviceBytes);
      killed.readDurable(rebuilt, 0);
      assert.deepEqual(Buffer.from(rebuilt), expected);
      assert.ok(standardStates(point, new Prng(1)).length > 3);
      // A crash before the sync completed: the first writes are still volatile.
      const early = recordingCrashPoint(recording, new PageImage(deviceBytes, { source }), { entryCount: 5 });
      assert.equal(byteAt(early.durable, 0), 0);
      assert.equal(byteAt(early.durable, 100), 42, 'unwritten bytes come from the base image');
      assert.equal(early.volatile.length, 2);
    } finally {
      source.close();
    }
  });

  it('keeps in-flight writes in the crash point', async () => {
    const paths = freshPaths('inflight');
    const scheduler = new IoScheduler({ order: 'fifo' });
    const inner = SimDevice.blank(deviceBytes, { scheduler });
    const device = RecordingDevice.create(inner, paths.log);
    const pending = device.write(filled(512, 7), 0);
    // Read the log as a SIGKILL would leave it: the write issued, not completed.
    const point = recordingCrashPoint(readRecording(paths.log), new PageImage(deviceBytes));
    assert.deepEqual(point.volatile.map((write) => write.completed), [false]);
    await pending;
    await device.close();
  });

  it('forgets the writes a failed sync covered (fsyncgate) unless told otherwise', async () => {
    const paths = freshPaths('fsyncgate');
    const inner = SimDevice.blank(deviceBytes);
    const device = RecordingDevice.create(inner, paths.log);
    await device.write(filled(512, 1), 0);
    inner.faults.failNext('sync', 'EIO');
    await assert.rejects(device.sync(), (error: unknown) => error instanceof PcacheError && error.code === 'EIO');
    await device.write(filled(512, 2), 512);
    await device.sync();
    await device.close();
    const recording = readRecording(paths.log);
    const linux = recordingCrashPoint(recording, new PageImage(deviceBytes));
    assert.equal(byteAt(linux.durable, 0), 0);
    assert.equal(byteAt(linux.durable, 512), 2);
    assert.equal(linux.volatile.length, 0, 'the failed sync dropped its write for good');
    const retried = recordingCrashPoint(recording, new PageImage(deviceBytes), { fsyncgate: false });
    assert.equal(byteAt(retried.durable, 0), 1, 'without fsyncgate the later sync persists it');
  });

  it('reads a log cut short by a kill up to its last whole record, and stops at a damaged one', async () => {
    const paths = freshPaths('torn');
    const device = RecordingDevice.create(SimDevice.blank(deviceBytes), paths.log);
    await device.write(filled(1024, 1), 0);
    await device.write(filled(1024, 2), 1024);
    await device.close();
    const whole = fs.readFileSync(paths.log);
    // Cut into the last record (the second write's 32-byte completion).
    fs.writeFileSync(paths.log, whole.subarray(0, whole.length - 20));
    const cut = readRecording(paths.log);
    assert.deepEqual(cut.entries.map((entry) => entry.kind), ['writeIssue', 'writeComplete', 'writeIssue']);
    assert.ok(cut.trailingBytes > 0);
    const damaged = Buffer.from(whole);
    damaged[32 + 32 + 50] = (damaged[32 + 32 + 50] ?? 0) ^ 1; // inside the first write's data
    fs.writeFileSync(paths.log, damaged);
    assert.equal(readRecording(paths.log).entries.length, 0);
    fs.writeFileSync(paths.log, Buffer.from('not a log at all, not at all, no'));
    assert.throws(() => readRecording(paths.log), (error: unknown) => error instanceof PcacheError && error.code === 'CORRUPT');
  });

  it("describes its device by the inner device's fingerprint, so a recorded run does not look like another device", async () => {
    const paths = freshPaths('fingerprint');
    FileDevice.create(paths.device, deviceBytes);
    const file = await FileDevice.open(paths.device);
    const device = RecordingDevice.create(file, paths.log);
    const inner = await file.fingerprint();
    assert.match(inner ?? '', /^file:/);
    assert.equal(await device.fingerprint(), inner);
    await device.close();
  });

  it('refuses to overwrite an existing log', () => {
    const paths = freshPaths('exists');
    fs.writeFileSync(paths.log, 'x');
    assert.throws(() => RecordingDevice.create(SimDevice.blank(deviceBytes), paths.log), PcacheError);
  });

  it('saves a crash state as a sparse file a real server could start on', async () => {
    const paths = freshPaths('save');
    const device = SimDevice.blank(deviceBytes);
    await device.write(filled(512, 9), 60 * 1024);
    saveImage(device.visibleImage(), paths.device);
    const saved = fs.readFileSync(paths.device);
    assert.equal(saved.length, deviceBytes);
    assert.equal(saved[60 * 1024], 9);
    assert.equal(saved[0], 0);
  });
});
