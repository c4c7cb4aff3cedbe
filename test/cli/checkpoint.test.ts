// `pcache checkpoint` on a file backing device: the command runs while the backing device holds
// every flushed write and nothing newer, even though a client writes and flushes meanwhile;
// name, time and epoch reach it; its failure is the checkpoint's; writeback resumes afterwards.
// (test/cli/ceph_rbd.test.ts takes RBD snapshots under it while a client writes.)

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, it } from 'node:test';
import { MiB } from '../../src/lib/units.js';
import { tempDir } from '../helpers/files.js';
import { assertOneLineError, runCli, startServe } from '../helpers/pcache.js';
import { qemuIo, requireTool, uriFor } from '../helpers/tools.js';

async function served(t: Parameters<typeof tempDir>[0]): Promise<{ dir: string; backing: string; socket: string; control: string }> {
  requireTool('qemu-io', 'qemu-utils');
  const dir = tempDir(t, 'pcache-checkpoint-');
  const backing = path.join(dir, 'backing.img');
  const socket = path.join(dir, 'nbd.sock');
  const control = path.join(dir, 'control.sock');
  await startServe(t, ['--cache', path.join(dir, 'cache.img'), '--cache-size', '32M', '--segment-size', '1M', '--backing', backing, '--backing-size', '16M',
    '--socket', socket, '--control', control, '--tuning', 'writeback_start_percent=100,writeback_stop_percent=0,writeback_idle_ms=3600000,writeback_max_age_ms=3600000'], dir);
  return { dir, backing, socket, control };
}

describe('pcache checkpoint', () => {
  it('runs the command while the backing device holds every flushed write and nothing newer, clients writing meanwhile', async (t) => {
    const { dir, backing, socket, control } = await served(t);
    await qemuIo(uriFor(socket), ['write -P 1 0 1M', 'flush']);
    assert.ok(fs.readFileSync(backing).subarray(0, MiB).every((byte) => byte === 0), 'writeback is lazy here: nothing on the backing device yet');
    // While held: copy the backing file, have a client write and flush through pcache, copy again.
    const command = [
      `cp ${backing} ${dir}/first.img`,
      `qemu-io -f raw '${uriFor(socket)}' -c 'write -P 2 4M 1M' -c flush >/dev/null`,
      `cp ${backing} ${dir}/second.img`,
      `echo "$PCACHE_CHECKPOINT_NAME {name} $PCACHE_CHECKPOINT_EPOCH {epoch} $PCACHE_CHECKPOINT_TIME" > ${dir}/info`,
    ].join(' && ');
    const result = await runCli(['checkpoint', '--control', control, '--name', 'nightly-1', '--exec', command]);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /^checkpoint nightly-1: the backing device held every write flushed before \d{4}-\d\d-\d\dT[\d:.]+Z \(epoch \d+\); the command ran for [\d.]+ s\n$/);
    const first = fs.readFileSync(path.join(dir, 'first.img'));
    assert.ok(first.subarray(0, MiB).every((byte) => byte === 1), 'the flushed write is in the copy');
    assert.ok(fs.readFileSync(path.join(dir, 'second.img')).equals(first), 'the write made during the checkpoint did not reach the backing device');
    const [name, substituted, epoch, epochSubstituted, time] = fs.readFileSync(path.join(dir, 'info'), 'utf8').trim().split(' ');
    assert.deepEqual([name, substituted, epochSubstituted], ['nightly-1', 'nightly-1', epoch]);
    assert.match(epoch ?? '', /^\d+$/);
    assert.ok(!Number.isNaN(Date.parse(time ?? '')), `a time: ${String(time)}`);

    const drained = await runCli(['drain', '--control', control]);
    assert.equal(drained.code, 0, drained.stderr);
    assert.ok(fs.readFileSync(backing).subarray(4 * MiB, 5 * MiB).every((byte) => byte === 2), 'writeback resumed after the checkpoint');
  });

  it('fails with the command, names itself by time by default, and prints JSON', async (t) => {
    const { control } = await served(t);
    const failed = await runCli(['checkpoint', '--control', control, '--exec', 'exit 3']);
    assert.equal(failed.code, 1);
    assert.match(failed.stderr, /^pcache: checkpoint pcache-\d{8}T\d{6}Z: the command exited with status 3\n$/);
    const json = await runCli(['checkpoint', '--control', control, '--json']);
    assert.equal(json.code, 0, json.stderr);
    const outcome = JSON.parse(json.stdout) as Record<string, unknown>;
    assert.match(String(outcome.name), /^pcache-\d{8}T\d{6}Z$/);
    assert.equal(typeof outcome.epoch, 'number');
    assert.equal(outcome.exitCode, null, 'no command ran');
    assertOneLineError(await runCli(['checkpoint', '--control', control, '--name', 'a b']), 2, /--name must be 1 to 64 letters/);
  });
});
