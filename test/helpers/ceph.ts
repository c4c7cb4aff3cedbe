// A real Ceph cluster for the tests: scripts/ceph_cluster.sh (the same script users run) starts
// one monitor and one OSD in a temporary directory, a pool `rbd` and RBD images, each served by
// qemu-nbd on a Unix socket; everything is stopped by PID and the directory removed after the
// tests that share it.
//
// Debian packages: ceph-mon, ceph-osd, ceph-common (rbd), qemu-utils (qemu-nbd) and
// qemu-block-extra (qemu's rbd driver). A missing one fails the test naming it.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { requireTool, runTool, uriFor, type ToolResult } from './tools.js';

const scriptPath = fileURLToPath(new URL('../../../scripts/ceph_cluster.sh', import.meta.url));
/** The longest any cluster operation may take (start is about 10 s on an idle machine). */
const clusterTimeoutMs = 120_000;

export type OsdStore = 'memstore' | 'bluestore';

export class CephCluster {
  readonly dir: string;
  readonly conf: string;

  private constructor(dir: string) {
    this.dir = dir;
    this.conf = path.join(dir, 'ceph.conf');
  }

  /**
   * Starts a cluster with `images` (name: size such as '64M'), each served by qemu-nbd. The
   * caller stops it (stop()) in an after() hook. bluestore keeps the objects across osdStop().
   */
  static async start(images: Readonly<Record<string, string>>, store: OsdStore = 'memstore'): Promise<CephCluster> {
    requireTool('ceph-mon', 'ceph-mon');
    requireTool('ceph-osd', 'ceph-osd');
    requireTool('rbd', 'ceph-common');
    requireTool('qemu-nbd', 'qemu-utils');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-ceph-'));
    const cluster = new CephCluster(dir);
    const result = await cluster.script(['start', dir, ...Object.entries(images).map(([name, size]) => `${name}:${size}`)], { CEPH_OSD_STORE: store });
    if (result.code !== 0) {
      await cluster.stop();
      assert.fail(`scripts/ceph_cluster.sh start failed: ${result.stderr}`);
    }
    return cluster;
  }

  /** The NBD URI of `image` as qemu-nbd serves it. */
  uri(image: string): string {
    return uriFor(this.socket(image));
  }

  socket(image: string): string {
    return path.join(this.dir, `${image}.sock`);
  }

  /** `rbd -c CONF args...`, which must succeed; returns its standard output. */
  async rbd(args: readonly string[]): Promise<string> {
    const result = await runTool('timeout', ['30', 'rbd', '-c', this.conf, ...args], 40_000);
    assert.equal(result.code, 0, `rbd ${args.join(' ')}: ${result.stderr}`);
    return result.stdout;
  }

  /** Stops the OSD (SIGTERM, by PID): I/O to the cluster then fails after rados_osd_op_timeout. */
  async osdStop(): Promise<void> {
    await this.must(['osd-stop', this.dir]);
  }

  /** Starts the OSD again and waits until the monitor sees it up. */
  async osdStart(): Promise<void> {
    await this.must(['osd-start', this.dir]);
  }

  async nbdStop(image: string): Promise<void> {
    await this.must(['nbd-stop', this.dir, image]);
  }

  async nbdStart(image: string, cacheMode = '--cache=none'): Promise<void> {
    await this.must(['nbd-start', this.dir, image, cacheMode]);
  }

  /** Stops every process the cluster started (by PID) and removes its directory. */
  async stop(): Promise<void> {
    const result = await this.script(['stop', this.dir]);
    fs.rmSync(this.dir, { recursive: true, force: true });
    assert.equal(result.code, 0, `scripts/ceph_cluster.sh stop: ${result.stderr}`);
  }

  private async must(args: readonly string[]): Promise<void> {
    const result = await this.script(args);
    assert.equal(result.code, 0, `scripts/ceph_cluster.sh ${args.join(' ')}: ${result.stderr}`);
  }

  private script(args: readonly string[], env: Record<string, string> = {}): Promise<ToolResult> {
    return runTool('env', [...Object.entries(env).map(([name, value]) => `${name}=${value}`), 'bash', scriptPath, ...args], clusterTimeoutMs);
  }
}
