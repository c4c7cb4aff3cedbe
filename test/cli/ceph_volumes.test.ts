// Several Ceph RBD images as volumes of one cache device (issue 17, with issue 14's volumes):
// a cluster from scripts/ceph_cluster.sh (memstore: the images are small), two images each
// served by qemu-nbd --cache=none, and one `pcache serve` of a pool with both added as volumes
// by their NBD URIs. Real clients throughout:
//
// - fio verifies crc32c on both volumes at once, through shares smaller than what it writes, so
//   both volumes write back to Ceph while it runs;
// - each volume then gets its own contents, flushed, part of it still dirty in the cache
//   (writeback starts only at the watermark), and pcache is SIGKILLed;
// - after a restart both volumes read back exactly what clients saw before the kill;
// - `volume remove --drain` of one writes it back: its image read straight through qemu-nbd
//   equals what its client wrote; the other volume serves on, unchanged.
//
// Debian packages: ceph-mon ceph-osd ceph-common qemu-utils qemu-block-extra fio libnbd-bin.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { controlRequest } from '../../src/cli/control_client.js';
import { MiB } from '../../src/lib/units.js';
import { CephCluster } from '../helpers/ceph.js';
import { assertFilesEqual, tempDir, writeRandomFile } from '../helpers/files.js';
import { runCli, startServe, type ServeProcess } from '../helpers/pcache.js';
import { fioVerifyJobs, nbdcopy, requireFioNbd, requireTool, uriFor } from '../helpers/tools.js';

const images = ['rbd1', 'rbd2'];
const imageBytes = 32 * MiB;
/** What each volume's client writes after fio: more than writeback leaves dirty at its watermark. */
const contentBytes = 8 * MiB;
/** Writeback only at the watermark (no idle or age trigger), so data is dirty at the kill. */
const tuning = 'writeback_idle_ms=600000,writeback_max_age_ms=600000,sequential_cutoff_bytes=0';

interface VolumeSummary {
  readonly name: string;
  readonly state: string;
  readonly backing: string;
  readonly dirtyBytes: number;
}

describe('Ceph RBD images as volumes of one cache device', () => {
  let ceph: CephCluster | undefined;
  const cluster = (): CephCluster => {
    assert.ok(ceph !== undefined, 'the cluster started');
    return ceph;
  };

  before(async () => {
    requireTool('nbdcopy', 'libnbd-bin');
    ceph = await CephCluster.start(Object.fromEntries(images.map((image) => [image, `${imageBytes / MiB}M`])));
  });
  after(async () => { await ceph?.stop(); });

  it('verifies both at once, keeps both across a SIGKILL, and remove --drain leaves the image holding what the client wrote', async (t) => {
    await requireFioNbd();
    const dir = tempDir(t, 'pcache-ceph-volumes-');
    const socket = path.join(dir, 'nbd.sock');
    const control = path.join(dir, 'control.sock');
    // 1 MiB segments: 30 in the pool, 12 (12 MiB) per volume, less than fio's 16 MiB per volume.
    const args = ['--cache', path.join(dir, 'cache.img'), '--cache-size', '32M', '--segment-size', '1M', '--socket', socket, '--control', control, '--tuning', tuning];
    const list = async (): Promise<VolumeSummary[]> => {
      const result = await runCli(['volume', 'list', '--control', control, '--json']);
      assert.equal(result.code, 0, result.stderr);
      return JSON.parse(result.stdout) as VolumeSummary[];
    };
    let server: ServeProcess = await startServe(t, args, dir);
    for (const image of images) {
      const added = await runCli(['volume', 'add', '--control', control, '--name', image, '--backing', cluster().uri(image), '--cache-size', '12M']);
      assert.equal(added.code, 0, added.stderr);
    }
    assert.deepEqual((await list()).map((volume) => [volume.name, volume.backing, volume.state]), images.map((image) => [image, cluster().uri(image), 'running']));

    // fio on both volumes at the same time: 2 jobs x 8 MiB each, every block read back and verified.
    await Promise.all(images.map((image) => fioVerifyJobs(uriFor(socket, image), 2, `verify-${image}`)));
    const status = await controlRequest(control, 'status') as { volumes: { name: string; cache: { counters: { writebackBackingBytes: number } } }[] };
    for (const volume of status.volumes) assert.ok(volume.cache.counters.writebackBackingBytes > 0, `volume ${volume.name} wrote back to its image while fio ran`);
    // Each volume's own contents, flushed; then what a client sees of the whole volume.
    for (const image of images) {
      const data = path.join(dir, `${image}.data`);
      writeRandomFile(data, contentBytes);
      await nbdcopy(['--flush', data, uriFor(socket, image)]);
      await nbdcopy([uriFor(socket, image), path.join(dir, `${image}.seen`)]);
      const seen = path.join(dir, `${image}.head`);
      fs.writeFileSync(seen, fs.readFileSync(path.join(dir, `${image}.seen`)).subarray(0, contentBytes));
      assertFilesEqual(seen, data, `volume ${image} reads back what its client wrote`);
    }
    for (const volume of await list()) assert.ok(volume.dirtyBytes > 0, `volume ${volume.name} holds dirty data at the kill: ${volume.dirtyBytes}`);

    await server.crash();
    server = await startServe(t, args, dir);
    assert.match(server.stdout, /serving 2 volumes/);
    for (const image of images) {
      const after = path.join(dir, `${image}.after`);
      await nbdcopy([uriFor(socket, image), after]);
      assertFilesEqual(after, path.join(dir, `${image}.seen`), `volume ${image} after SIGKILL and restart`);
    }

    // The first volume written back and removed: its image alone holds what its client saw.
    const [removed, kept] = images as [string, string];
    const result = await runCli(['volume', 'remove', '--control', control, removed, '--drain'], { timeoutMs: 60_000 });
    assert.equal(result.code, 0, result.stderr);
    assert.deepEqual((await list()).map((volume) => volume.name), [kept]);
    const direct = path.join(dir, `${removed}.direct`);
    await nbdcopy([cluster().uri(removed), direct]);
    assertFilesEqual(direct, path.join(dir, `${removed}.seen`), `image ${removed} read through qemu-nbd after remove --drain`);
    const keptNow = path.join(dir, `${kept}.now`);
    await nbdcopy([uriFor(socket, kept), keptNow]);
    assertFilesEqual(keptNow, path.join(dir, `${kept}.seen`), `volume ${kept} after the other was removed`);

    assert.equal(await server.stop(), 0);
    const check = await runCli(['check', '--cache', path.join(dir, 'cache.img'), '--json']);
    assert.equal(check.code, 0, check.stdout + check.stderr);
    assert.deepEqual((JSON.parse(check.stdout) as { volumes: { name: string }[] }).volumes.map((volume) => volume.name), [kept]);
  });
});
