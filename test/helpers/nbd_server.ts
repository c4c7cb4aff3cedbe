// pcache's NBD server in tests: servers on temporary Unix sockets, an Export whose calls can be
// held, counted and failed on demand, and a check that a server still serves a fresh client.
//
// ControlledExport serves a MemoryDevice. In 'sync' mode it completes calls synchronously
// (returning undefined, as DeviceExport over memory does); in 'async' mode every call returns
// a promise, and hold() parks calls until release(), which lets a test observe what the server
// does while requests are in flight: concurrency, backpressure, DISC, shutdown, disconnects.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MemoryDevice } from '../../src/device/memory_device.js';
import type { BlockStatusExtent, WriteOptions, ZeroOptions } from '../../src/nbd/protocol/command_types.js';
import type { Export } from '../../src/nbd/server/export.js';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server/server.js';
import { connectAndGo } from './nbd_raw_client.js';
import { CMD } from './nbd_wire.js';

export type Fault = (method: string, offsetBytes: number, lengthBytes: number) => Error | undefined;

export class ControlledExport implements Export {
  readonly sizeBytes: number;
  readonly device: MemoryDevice;
  readonly calls: { method: string; offsetBytes: number; lengthBytes: number }[] = [];
  mode: 'sync' | 'async' = 'async';
  fault: Fault | undefined;
  /** What blockStatus reports; by default one data extent. */
  extents: ((offsetBytes: number, lengthBytes: number) => BlockStatusExtent[]) | undefined;
  /** The last READ target the server handed over (to check the zero-copy layout). */
  lastReadTarget: Uint8Array | undefined;
  /** The last WRITE source the server handed over, and the largest memory one kept alive. */
  lastWriteSource: Uint8Array | undefined;
  largestWriteBacking = 0;
  inFlight = 0;
  maxInFlight = 0;
  inFlightBytes = 0;
  maxInFlightBytes = 0;
  private held = false;
  private readonly parked: (() => void)[] = [];

  constructor(sizeBytes: number) {
    this.sizeBytes = sizeBytes;
    this.device = new MemoryDevice(sizeBytes);
  }

  hold(): void {
    this.held = true;
  }

  release(): void {
    this.held = false;
    for (const resume of this.parked.splice(0)) resume();
  }

  /** Releases the parked call at `index` (0 is the oldest). */
  releaseAt(index: number): void {
    const [resume] = this.parked.splice(index, 1);
    assert.ok(resume !== undefined, `no parked call at ${index}`);
    resume();
  }

  get parkedCount(): number {
    return this.parked.length;
  }

  read(target: Uint8Array, offsetBytes: number): Promise<void> | undefined {
    this.lastReadTarget = target;
    return this.run('read', offsetBytes, target.length, target.length, () => { this.device.readSync(target, offsetBytes); });
  }

  write(source: Uint8Array, offsetBytes: number, options: WriteOptions): Promise<void> | undefined {
    this.lastWriteSource = source;
    this.largestWriteBacking = Math.max(this.largestWriteBacking, source.buffer.byteLength);
    return this.run(options.fua ? 'write(fua)' : 'write', offsetBytes, source.length, source.length, () => { this.device.writeSync(source, offsetBytes); });
  }

  flush(): Promise<void> | undefined {
    return this.run('flush', 0, 0, 0, () => undefined);
  }

  trim(offsetBytes: number, lengthBytes: number, options: WriteOptions): Promise<void> | undefined {
    return this.run(options.fua ? 'trim(fua)' : 'trim', offsetBytes, lengthBytes, 0, () => { this.device.bytes.fill(0, offsetBytes, offsetBytes + lengthBytes); });
  }

  writeZeroes(offsetBytes: number, lengthBytes: number, options: ZeroOptions): Promise<void> | undefined {
    const name = options.fastZero ? 'writeZeroes(fast)' : 'writeZeroes';
    return this.run(name, offsetBytes, lengthBytes, 0, () => { this.device.bytes.fill(0, offsetBytes, offsetBytes + lengthBytes); });
  }

  cache(offsetBytes: number, lengthBytes: number): Promise<void> | undefined {
    return this.run('cache', offsetBytes, lengthBytes, 0, () => undefined);
  }

  blockStatus(offsetBytes: number, lengthBytes: number): BlockStatusExtent[] | Promise<BlockStatusExtent[]> {
    const extents = this.extents?.(offsetBytes, lengthBytes) ?? [{ lengthBytes, zero: false, hole: false }];
    const done = this.run('blockStatus', offsetBytes, lengthBytes, 0, () => undefined);
    return done === undefined ? extents : done.then(() => extents);
  }

  private run(method: string, offsetBytes: number, lengthBytes: number, heldBytes: number, operation: () => void): Promise<void> | undefined {
    this.calls.push({ method, offsetBytes, lengthBytes });
    const failure = this.fault?.(method, offsetBytes, lengthBytes);
    if (this.mode === 'sync' && !this.held) {
      if (failure !== undefined) throw failure;
      operation();
      return undefined;
    }
    this.inFlight += 1;
    this.inFlightBytes += heldBytes;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    this.maxInFlightBytes = Math.max(this.maxInFlightBytes, this.inFlightBytes);
    return (async () => {
      if (this.held) await new Promise<void>((resolve) => { this.parked.push(resolve); });
      else await Promise.resolve();
      this.inFlight -= 1;
      this.inFlightBytes -= heldBytes;
      if (failure !== undefined) throw failure;
      operation();
    })();
  }
}

export interface TestServer {
  readonly server: NbdServer;
  readonly path: string;
  readonly dir: string;
  stop(): Promise<void>;
}

/** Starts a server on a fresh temporary Unix socket. */
export async function startServer(options: Partial<NbdServerOptions> & { export: Export }): Promise<TestServer> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pcache-nbd-'));
  const socketPath = path.join(dir, 'nbd.sock');
  const server = new NbdServer({ exportName: 'pcache', readOnly: false, ...options });
  await server.listen({ path: socketPath });
  return {
    server,
    path: socketPath,
    dir,
    async stop() {
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A brand-new client can still negotiate and read the export's bytes correctly. */
export async function assertServerServes(socketPath: string, device: MemoryDevice): Promise<void> {
  const { client } = await connectAndGo(socketPath);
  client.send({ type: CMD.read, cookie: 0x5e5e5e5en, offset: 0, length: 4096 });
  const reply = await client.simpleReply(4096);
  assert.equal(reply.error, 0, 'a fresh client could not read');
  assert.equal(reply.cookie, 0x5e5e5e5en);
  assert.deepEqual(reply.data, Buffer.from(device.bytes.subarray(0, 4096)), 'a fresh client read wrong bytes');
  client.disconnect();
  await client.readUntilClosed();
}
