// `pcache serve`: the wiring that joins the cache engine, the devices and the NBD server.
//
// Start-up, in order: create the files asked for; refuse a cache device that another process
// has open; open the backing device with asynchronous I/O (many requests in flight through
// libuv's thread pool) and the cache device with synchronous I/O (fast storage); open the
// cache (formatting a blank device, refusing anything that is not this backing device's
// cache, without writing a byte); listen for NBD and, if asked, on the control socket; print
// where it listens. Every step that succeeded is undone, in reverse, if a later one fails.
//
// Stop (SIGINT, SIGTERM, SIGHUP, or the supervising parent asking or vanishing; see main.ts): the NBD
// server stops taking requests and finishes the ones in flight; the control socket closes;
// the cache closes (open ksets made durable, running writeback and GC rounds finish); the
// devices close; exit status 0. Stopping is idempotent: a second signal changes nothing. A
// stop that cannot finish within stopTimeoutMs (a backing device that never answers) gives up
// with status 1 — acknowledged, flushed writes are in the cache log by then or were never
// promised.

import fs from 'node:fs';
import path from 'node:path';
import { Cache, dmStatusLine } from '../cache/cache.js';
import { probeDevice } from '../cache/cache_dev.js';
import type { BlockDevice } from '../device/block_device.js';
import { DeviceExport } from '../device/device_export.js';
import { FileDevice } from '../device/file_device.js';
import { RecordingDevice } from '../sim/recording_device.js';
import { PcacheError, isPcacheError } from '../lib/errors.js';
import { NbdServer, type NbdListenAddress } from '../nbd/server.js';
import { defaultServe, exitFailure, exitOk, type ServeArgs } from './args.js';
import { ControlServer } from './control.js';
import { describeDevice, ensureDeviceFile } from './devices.js';
import { refuseIfInUse } from './in_use.js';
import type { Terminal } from './terminal.js';

/** How long a stop may take before pcache gives up on it. */
const stopTimeoutMs = 60_000;

/** A stop request: a signal, or a message from the supervising parent process. */
export interface StopRequest {
  readonly reason: string;
}

/** Resolves on the first SIGINT, SIGTERM, SIGHUP or parent request; installed before anything opens. */
function stopRequested(): Promise<StopRequest> {
  return new Promise((resolve) => {
    const stop = (reason: string): void => { resolve({ reason }); };
    process.on('SIGINT', () => { stop('SIGINT'); });
    process.on('SIGTERM', () => { stop('SIGTERM'); });
    process.on('SIGHUP', () => { stop('SIGHUP'); }); // the terminal went away
    if (process.send !== undefined) {
      // Run by main.ts's supervisor: it forwards signals as messages, and if it dies (even by
      // SIGKILL) the channel closes, so this process never outlives it unnoticed.
      process.on('message', (message: unknown) => {
        const signal = (message as { stop?: unknown } | null)?.stop;
        if (typeof signal === 'string') stop(signal);
      });
      process.on('disconnect', () => { stop('the supervising process went away'); });
    }
  });
}

type Closer = () => Promise<void>;

/**
 * With --record-dir, a device whose every write and sync is also appended to DIR/<name>.log
 * (src/sim/recording_device.ts). The log needs no fsync: it lives in the page cache, which a
 * SIGKILL does not lose, and the crash tests rebuild power-loss states of the run from it.
 */
function recorded(args: ServeArgs, name: 'cache' | 'backing', device: BlockDevice): BlockDevice {
  if (args.recordDir === undefined) return device;
  return RecordingDevice.create(device, path.join(args.recordDir, `${name}.log`));
}

export async function serveCommand(args: ServeArgs, terminal: Terminal): Promise<number> {
  const stop = stopRequested();
  const closers: Closer[] = [];
  const startedAt = new Date();
  try {
    const created = prepareFiles(args);
    if (!args.noCache) refuseIfInUse(args.cachePath, 'serve');
    const backing = recorded(args, 'backing', await FileDevice.open(args.backingPath, { readOnly: args.readOnly }));
    closers.push(() => backing.close());
    const served = args.noCache ? noCacheExport(backing) : await openCache(args, backing, closers);
    const server = new NbdServer({
      export: served.export,
      exportName: args.exportName,
      description: args.noCache ? `pcache export of ${args.backingPath} (no cache)` : `pcache: ${args.backingPath} cached on ${args.cachePath}`,
      readOnly: args.readOnly,
    });
    const address = await server.listen(args.listen);
    closers.push(() => server.close());
    const uri = uriOf(address, args.exportName);
    if (args.controlPath !== undefined) {
      const control = new ControlServer({
        status: () => ({
          pid: process.pid,
          uvThreadPoolSize: process.env.UV_THREADPOOL_SIZE ?? null,
          startedAt: startedAt.toISOString(),
          uptimeMs: Date.now() - startedAt.getTime(),
          uri,
          exportName: args.exportName,
          readOnly: args.readOnly,
          cachePath: args.noCache ? null : path.resolve(args.cachePath),
          backingPath: path.resolve(args.backingPath),
          ...served.status(),
          nbd: server.stats(),
        }),
        drain: () => served.drain(),
      });
      await control.listen(args.controlPath);
      closers.push(() => control.close());
    }
    const what = args.noCache
      ? `${describeDevice(args.backingPath, backing.sizeBytes)} without a cache`
      : `${describeDevice(args.backingPath, backing.sizeBytes)} through cache ${describeDevice(args.cachePath, served.cacheSizeBytes)}${served.formatted ? ' (formatted now)' : ''}`;
    if (args.defaultMode) {
      terminal.out(defaultModeGuide({ created, what, uri, address }));
    } else {
      terminal.out(`serving ${what} at ${uri} (connect with: nbdinfo '${uri}')`);
    }
  } catch (error) {
    await closeAll(closers);
    throw error;
  }
  const request = await stop;
  return stopAll(closers, request, terminal);
}

interface Served {
  readonly export: Cache | DeviceExport;
  readonly cacheSizeBytes: number;
  readonly formatted: boolean;
  status(): Record<string, unknown>;
  drain(): Promise<void>;
}

function prepareFiles(args: ServeArgs): string[] {
  const created: string[] = [];
  if (args.defaultMode) fs.mkdirSync(defaultServe.directory, { recursive: true });
  if (ensureDeviceFile(args.backingPath, args.backingSizeBytes, '--backing-size')) created.push(args.backingPath);
  if (!args.noCache && ensureDeviceFile(args.cachePath, args.cacheSizeBytes, '--cache-size')) created.push(args.cachePath);
  return created;
}

async function openCache(args: ServeArgs, backing: BlockDevice, closers: Closer[]): Promise<Served> {
  const device = recorded(args, 'cache', await FileDevice.open(args.cachePath, { blocking: true, readOnly: args.readOnly }));
  closers.push(() => device.close());
  const formatted = !args.readOnly && await probeDevice(device) === 'blank';
  let cache: Cache;
  try {
    cache = await Cache.open({
      cacheDevice: device,
      backingDevice: backing,
      formatIfBlank: args.readOnly ? false : args.gcPercent === undefined ? true : { gcPercent: args.gcPercent },
      readOnly: args.readOnly,
    });
  } catch (error) {
    if (!isPcacheError(error)) throw error;
    throw new PcacheError(error.code, `cannot serve ${args.backingPath} through ${args.cachePath}: ${error.message}`, { cause: error });
  }
  closers.push(() => cache.close());
  if (args.gcPercent !== undefined && !formatted) await cache.setGcPercent(args.gcPercent);
  return {
    export: cache,
    cacheSizeBytes: device.sizeBytes,
    formatted,
    status: () => {
      const status = cache.status();
      return { dmStatusLine: dmStatusLine(status), cache: status };
    },
    drain: () => cache.drain(),
  };
}

function noCacheExport(backing: BlockDevice): Served {
  return {
    export: new DeviceExport(backing),
    cacheSizeBytes: 0,
    formatted: false,
    status: () => ({ dmStatusLine: null, cache: null }),
    drain: () => backing.sync(),
  };
}

async function stopAll(closers: Closer[], request: StopRequest, terminal: Terminal): Promise<number> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<'timeout'>((resolve) => { timer = setTimeout(() => { resolve('timeout'); }, stopTimeoutMs); });
  const outcome = await Promise.race([closeAll(closers).then(() => 'done' as const), timedOut]);
  clearTimeout(timer);
  if (outcome === 'timeout') {
    terminal.err(`pcache: stop (${request.reason}) did not finish within ${stopTimeoutMs / 1000} s (a device is not answering); exiting anyway`);
    return exitFailure;
  }
  terminal.out(`stopped (${request.reason})`);
  return exitOk;
}

/** Runs the closers in reverse order; every one runs even if an earlier one fails; the first failure is rethrown. */
async function closeAll(closers: Closer[]): Promise<void> {
  let failure: Error | undefined;
  for (const close of closers.splice(0).reverse()) {
    try {
      await close();
    } catch (error) {
      failure ??= error instanceof Error ? error : new Error(String(error));
    }
  }
  if (failure !== undefined) throw failure;
}

export function uriOf(address: NbdListenAddress, exportName: string): string {
  const name = encodeURIComponent(exportName);
  if ('path' in address) return `nbd+unix:///${name}?socket=${path.resolve(address.path)}`;
  const host = address.host ?? '127.0.0.1';
  return `nbd://${host.includes(':') ? `[${host}]` : host}:${address.port}/${name}`;
}

function defaultModeGuide(facts: { created: string[]; what: string; uri: string; address: NbdListenAddress }): string {
  const socket = 'path' in facts.address ? path.resolve(facts.address.path) : '';
  const uri = `'${facts.uri}'`;
  const lines = [
    ...facts.created.map((file) => `created ${file} (sparse)`),
    `serving ${facts.what} at ${facts.uri}`,
    '',
    'Connect with any NBD client (libnbd-bin, qemu-utils, nbd-client):',
    `  nbdinfo ${uri}`,
    `  nbdcopy disk.img ${uri}        # copy an image in; swap the two to copy it out`,
    `  mkdir -p /tmp/pcache-fuse && nbdfuse /tmp/pcache-fuse ${uri} &`,
    '                                 # /tmp/pcache-fuse/nbd is then the disk as a file',
    `  qemu-img info ${uri}`,
    `  qemu-system-x86_64 -drive file=${facts.uri},format=raw,if=virtio ...`,
    `  sudo modprobe nbd && sudo nbd-client -unix ${socket} /dev/nbd0 -N pcache -b 4096 -C 4`,
    '',
    `Status: pcache status --control ${defaultServe.control}`,
    `Write everything back: pcache drain --control ${defaultServe.control}`,
    'Stop: Ctrl-C or kill -TERM (data stays in ./pcache-data for the next start).',
  ];
  return lines.join('\n');
}
