// Prometheus metrics for `pcache serve --metrics HOST:PORT`: a prom-client registry of its own
// (no global state), an HTTP endpoint on loopback, and the NbdRequestObserver that feeds it.
//
// Invariants:
// - Nothing here runs on a request's path except NbdRequestCounters.requestAnswered, which
//   stores numbers into preallocated typed arrays: no allocation, no label hashing, no await.
//   Durations wait in a bounded ring (durationRingCapacity) and reach prom-client's histogram
//   when the ring fills or at the next scrape, whichever comes first.
// - Everything else is read at scrape time from what the server and the cache already count
//   (Cache.status() and NbdServer.stats() are synchronous and read memory only), so a scrape
//   never waits for a device, and metrics cost nothing between scrapes.
// - Totals are counters (monotonic, named *_total); levels are gauges. Rates (writeback bytes
//   per second, GC segments per second) are what Prometheus's rate() makes of the counters.
// - The endpoint answers GET and HEAD of /metrics; anything else gets 404 or 405. It binds
//   loopback unless the operator said otherwise (args_serve.ts), because metrics are unauthenticated.

import http from 'node:http';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { CacheStatus } from '../cache/cache.js';
import { cacheModes } from '../ondisk/cache_info.js';
import { nbdCommandIndex, nbdCommandNames, type NbdRequestObserver } from '../nbd/server/observer.js';
import type { NbdServerStats } from '../nbd/server/server.js';
import { listenOn } from './listen.js';

/** Durations buffered before they are folded into the histogram. */
const durationRingCapacity = 4096;
/** Latency buckets, in seconds: 10 µs to 10 s. */
const latencyBucketsSeconds = [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10];

/** Counts every answered NBD request into typed arrays; see the file comment. */
export class NbdRequestCounters implements NbdRequestObserver {
  readonly requests = new Float64Array(nbdCommandNames.length);
  readonly errors = new Float64Array(nbdCommandNames.length);
  readonly bytes = new Float64Array(nbdCommandNames.length);
  private readonly ringCommands = new Uint8Array(durationRingCapacity);
  private readonly ringSeconds = new Float64Array(durationRingCapacity);
  private ringLength = 0;
  private sink: ((command: number, seconds: number) => void) | undefined;

  requestAnswered(command: number, lengthBytes: number, durationMs: number, failed: boolean): void {
    const index = nbdCommandIndex(command);
    this.requests[index] = (this.requests[index] ?? 0) + 1;
    if (failed) this.errors[index] = (this.errors[index] ?? 0) + 1;
    else this.bytes[index] = (this.bytes[index] ?? 0) + lengthBytes;
    if (this.ringLength === durationRingCapacity) this.drainDurations();
    this.ringCommands[this.ringLength] = index;
    this.ringSeconds[this.ringLength] = durationMs / 1000;
    this.ringLength += 1;
  }

  /** Where buffered durations go (the histogram); without a sink they are dropped when the ring fills. */
  setSink(sink: (command: number, seconds: number) => void): void {
    this.sink = sink;
  }

  /**
   * Adds what another process counted (a volume process's snapshot): `totals` grow by the
   * given amounts, and each (command index, seconds) pair of `durations` goes to the histogram.
   */
  addCounted(requests: readonly number[], errors: readonly number[], bytes: readonly number[], durations: readonly number[]): void {
    for (let index = 0; index < this.requests.length; index += 1) {
      this.requests[index] = (this.requests[index] ?? 0) + (requests[index] ?? 0);
      this.errors[index] = (this.errors[index] ?? 0) + (errors[index] ?? 0);
      this.bytes[index] = (this.bytes[index] ?? 0) + (bytes[index] ?? 0);
    }
    const sink = this.sink;
    if (sink === undefined) return;
    for (let at = 0; at + 1 < durations.length; at += 2) sink(durations[at] ?? 0, durations[at + 1] ?? 0);
  }

  drainDurations(): void {
    const sink = this.sink;
    if (sink !== undefined) {
      for (let at = 0; at < this.ringLength; at += 1) sink(this.ringCommands[at] ?? 0, this.ringSeconds[at] ?? 0);
    }
    this.ringLength = 0;
  }
}

export interface MetricsSources {
  /**
   * Every cache's status, by volume name; empty with --no-cache. A server of one backing device
   * has one, and its metrics carry no volume label; a server of volumes labels every cache
   * metric with `volume` (`perVolume`).
   */
  caches(): readonly VolumeStatus[];
  readonly perVolume: boolean;
  nbdStats(): NbdServerStats;
}

export interface VolumeStatus {
  readonly volume: string;
  readonly status: CacheStatus;
}

const cacheStates: readonly CacheStatus['state'][] = ['running', 'draining', 'degraded', 'backing-offline', 'failed', 'stopping', 'stopped'];

/** The registry with every pcache metric and the process defaults. */
export function createMetricsRegistry(requests: NbdRequestCounters, sources: MetricsSources): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  const registers = [registry];

  // --- per NBD command, from the observer ---
  const perCommand = (name: string, help: string, values: Float64Array): void => {
    const seen = new Float64Array(values.length);
    new Counter({
      name, help, labelNames: ['op'], registers,
      collect() {
        nbdCommandNames.forEach((op, index) => {
          const delta = (values[index] ?? 0) - (seen[index] ?? 0);
          seen[index] = values[index] ?? 0;
          this.inc({ op }, delta);
        });
      },
    });
  };
  perCommand('pcache_nbd_requests_total', 'NBD requests answered, by command', requests.requests);
  perCommand('pcache_nbd_request_errors_total', 'NBD requests answered with an error, by command', requests.errors);
  perCommand('pcache_nbd_request_bytes_total', 'Bytes of NBD requests answered successfully, by command (request length)', requests.bytes);
  const latency = new Histogram({
    name: 'pcache_nbd_request_duration_seconds',
    help: 'Time from an NBD request being dispatched to its reply being queued, by command',
    labelNames: ['op'],
    buckets: latencyBucketsSeconds,
    registers,
    collect() { requests.drainDurations(); },
  });
  const children = nbdCommandNames.map((op) => latency.labels({ op }));
  requests.setSink((command, seconds) => { children[command]?.observe(seconds); });

  const gauge = (name: string, help: string, read: () => number | undefined): void => {
    new Gauge({
      name, help, registers,
      collect() {
        const value = read();
        if (value !== undefined) this.set(value);
      },
    });
  };
  const total = (name: string, help: string, read: () => number | undefined): void => {
    let seen = 0;
    new Counter({
      name, help, registers,
      collect() {
        const value = read();
        if (value === undefined || value < seen) return;
        this.inc(value - seen);
        seen = value;
      },
    });
  };

  // --- the NBD server ---
  gauge('pcache_nbd_connections', 'NBD client connections open now', () => sources.nbdStats().connectionsOpen);
  total('pcache_nbd_connections_total', 'NBD client connections accepted', () => sources.nbdStats().connectionsTotal);
  total('pcache_nbd_protocol_violations_total', 'NBD connections cut off for broken framing', () => sources.nbdStats().protocolViolationsTotal);
  total('pcache_nbd_tls_sessions_total', 'NBD connections upgraded to TLS', () => sources.nbdStats().tlsSessionsTotal);
  total('pcache_nbd_tls_failures_total', 'NBD TLS handshakes that failed (credentials refused, garbage, hang-ups)', () => sources.nbdStats().tlsFailuresTotal);

  // --- the caches, read from one status() each per scrape ---
  let snapshots: readonly VolumeStatus[] = [];
  const volumeLabels = sources.perVolume ? ['volume'] : [];
  const labelsOf = (snapshot: VolumeStatus, extra: Record<string, string> = {}): Record<string, string> => (sources.perVolume ? { volume: snapshot.volume, ...extra } : extra);
  // Registered first, so its collect() takes the snapshots the cache metrics below read.
  new Gauge({
    name: 'pcache_up', help: 'Caches open (1 for a server of one backing device; the volumes serving, for a server of volumes; 0 with --no-cache)', registers,
    collect() {
      snapshots = sources.caches();
      this.set(snapshots.length);
    },
  });
  /** A gauge per cache (and per value of `label`, when given). */
  const cacheGauge = (name: string, help: string, read: (status: CacheStatus) => number, label?: { name: string; values: readonly string[]; read: (status: CacheStatus, value: string) => number }): void => {
    new Gauge({
      name, help, labelNames: [...volumeLabels, ...(label === undefined ? [] : [label.name])], registers,
      collect() {
        this.reset();
        for (const snapshot of snapshots) {
          if (label === undefined) this.set(labelsOf(snapshot), read(snapshot.status));
          else for (const value of label.values) this.set(labelsOf(snapshot, { [label.name]: value }), label.read(snapshot.status, value));
        }
      },
    });
  };
  /**
   * A counter per cache and per kind, each read from the cache's counters. A volume removed and
   * added again starts from zero: its series is dropped and counted afresh.
   */
  const cacheCounter = (name: string, help: string, kinds: readonly [string | undefined, (c: CacheStatus['counters']) => number][], label?: string): void => {
    const seen = new Map<string, number>();
    new Counter({
      name, help, labelNames: [...volumeLabels, ...(label === undefined ? [] : [label])], registers,
      collect() {
        for (const snapshot of snapshots) {
          for (const [kind, read] of kinds) {
            const labels = labelsOf(snapshot, label === undefined || kind === undefined ? {} : { [label]: kind });
            const key = JSON.stringify(labels);
            const value = read(snapshot.status.counters);
            let before = seen.get(key) ?? 0;
            if (value < before) {
              if (Object.keys(labels).length > 0) this.remove(labels);
              before = 0;
            }
            this.inc(labels, value - before);
            seen.set(key, value);
          }
        }
      },
    });
  };
  const counted = (name: string, help: string, read: (c: CacheStatus['counters']) => number): void => { cacheCounter(name, help, [[undefined, read]]); };

  cacheGauge('pcache_state', 'The cache state: 1 for the current one, 0 for the others', () => 0, { name: 'state', values: cacheStates, read: (status, state) => (status.state === state ? 1 : 0) });
  cacheGauge('pcache_backing_online', '0 while the backing device is offline, 1 otherwise', (status) => (status.backingOfflineSince === undefined ? 1 : 0));
  cacheGauge('pcache_dirty_bytes', 'Bytes written to the cache and not yet written back', (status) => status.dirtyBytes);
  cacheGauge('pcache_dirty_high_water_bytes', 'Dirty bytes at which writes are held while the backing device is offline', (status) => status.dirtyHighWaterBytes);
  cacheGauge('pcache_segments', 'Segments of the cache device (of the volume\'s share)', (status) => status.cacheSegs);
  cacheGauge('pcache_segments_used', 'Segments in use (log and data)', (status) => status.segsUsed);
  cacheGauge('pcache_gc_percent', 'GC starts when this percentage of segments is in use', (status) => status.gcPercent);
  cacheGauge('pcache_index_keys', 'Keys in the in-memory index', (status) => status.indexKeys);
  cacheGauge('pcache_index_bytes', 'Bytes of memory held by the index', (status) => status.indexBytes);
  cacheGauge('pcache_writeback_oldest_dirty_age_seconds', 'Age of the oldest dirty data (0 when clean)', (status) => (status.writeback.oldestDirtyAgeMs ?? 0) / 1000);
  counted('pcache_read_hits_total', 'Read requests served entirely from the cache', (c) => c.readHitRequests);
  counted('pcache_read_misses_total', 'Read requests that needed the backing device', (c) => c.readMissRequests);
  counted('pcache_read_hit_bytes_total', 'Bytes of read hits (cached data; fragmented ones gathered from the backing device included)', (c) => c.readHitBytes);
  counted('pcache_read_gathers_total', 'Read hits of fragmented, written-back data served by one backing read with the newer pieces copied over it', (c) => c.readGathers);
  counted('pcache_thread_read_batches_total', 'Reads whose many cached pieces were read in one batch on the cache device\'s own thread', (c) => c.threadReadBatches);
  counted('pcache_fragment_rewrites_total', 'Reads of fragmented data not yet written back that stored what they read again as one piece', (c) => c.fragmentRewrites);
  counted('pcache_fragment_rewrite_bytes_total', 'Bytes those rewrites published (parts written since the read keep the newer data)', (c) => c.fragmentRewriteBytes);
  counted('pcache_read_miss_bytes_total', 'Bytes read from the backing device for clients', (c) => c.readMissBytes);
  counted('pcache_write_bytes_total', 'Bytes written by clients into the cache', (c) => c.writeBytes);
  counted('pcache_writeback_bytes_total', 'Dirty log bytes writeback has retired, written back or superseded (rate() gives the writeback rate)', (c) => c.writebackBytes);
  counted('pcache_writeback_backing_bytes_total', 'Bytes writeback wrote to the backing device', (c) => c.writebackBackingBytes);
  counted('pcache_writeback_backing_writes_total', 'Writes writeback sent to the backing device', (c) => c.writebackBackingWrites);
  counted('pcache_writeback_skipped_bytes_total', 'Dirty bytes writeback left out because newer writes superseded them', (c) => c.writebackSkippedBytes);
  counted('pcache_writeback_rounds_total', 'Writeback rounds completed', (c) => c.writebackRounds);
  counted('pcache_writeback_windows_merged_total', 'Writeback rounds that merged their window in a private index before planning (no skipping allowed, or the live index could not tell)', (c) => c.writebackWindowsMerged);
  counted('pcache_gc_segments_freed_total', 'Segments freed by garbage collection (rate() gives the GC rate)', (c) => c.gcSegmentsFreed);
  counted('pcache_gc_ksets_total', 'Ksets garbage collection walked past', (c) => c.gcKsets);
  counted('pcache_ksets_written_total', 'Key sets appended to the log', (c) => c.ksetsWritten);
  cacheCounter('pcache_errors_total', 'Errors, by kind', [
    ['cache_io', (c) => c.cacheIoErrors], ['backing_read', (c) => c.backingReadErrors], ['backing_write', (c) => c.backingWriteErrors],
    ['data_crc', (c) => c.dataCrcErrors], ['writeback', (c) => c.writebackErrors], ['gc', (c) => c.gcErrors],
  ], 'kind');
  // --- the policy: write mode, sequential cutoff, fills ---
  cacheGauge('pcache_mode', 'The write mode: 1 for the current one, 0 for the others', () => 0, { name: 'mode', values: cacheModes, read: (status, mode) => (status.mode === mode ? 1 : 0) });
  cacheCounter('pcache_bypassed_requests_total', 'Requests that bypassed the cache, by reason (the sequential cutoff, or the write mode)', [
    ['cutoff', (c) => c.bypassCutoffRequests], ['mode', (c) => c.bypassModeRequests],
  ], 'reason');
  cacheCounter('pcache_bypassed_bytes_total', 'Bytes of the requests that bypassed the cache, by reason', [
    ['cutoff', (c) => c.bypassCutoffBytes], ['mode', (c) => c.bypassModeBytes],
  ], 'reason');
  counted('pcache_bypass_fallbacks_total', 'Writes meant for the backing device that were cached: they overlapped dirty data', (c) => c.bypassFallbacks);
  counted('pcache_fills_admitted_total', 'Read misses (and writethrough copies) stored in the cache', (c) => c.fillsStored);
  cacheCounter('pcache_fills_rejected_total', 'Read misses not stored in the cache, by reason (no free space or log room; the mode or cutoff; a full cache\'s first miss of a block)', [
    ['space', (c) => c.fillsSkipped], ['policy', (c) => c.fillsNotAdmitted], ['first-miss', (c) => c.fillsNotRecurring],
  ], 'reason');
  counted('pcache_fills_first_miss_stored_total', 'First misses a full read cache stored because its shadow caches found that storing every miss pays (a moving working set)', (c) => c.fillsFirstMissStored);
  counted('pcache_second_chance_bytes_total', 'Bytes GC re-logged instead of evicting them: read since they were stored', (c) => c.secondChanceBytes);
  return registry;
}

/** The HTTP endpoint; `close` stops it. */
export class MetricsServer {
  private readonly server: http.Server;

  private constructor(server: http.Server) {
    this.server = server;
  }

  /** `refresh`: run before each scrape is collected (a server of volume processes asks them for their figures then). */
  static async listen(registry: Registry, host: string, port: number, refresh?: () => Promise<void>): Promise<{ server: MetricsServer; url: string }> {
    const server = http.createServer((request, response) => {
      const url = (request.url ?? '/').split('?')[0];
      if (url !== '/metrics') {
        response.writeHead(404, { 'content-type': 'text/plain' }).end('pcache: metrics are at /metrics\n');
        return;
      }
      if (request.method !== 'GET' && request.method !== 'HEAD') {
        response.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('use GET\n');
        return;
      }
      (refresh ?? (() => Promise.resolve()))().then(() => registry.metrics()).then(
        (text) => { response.writeHead(200, { 'content-type': registry.contentType }).end(request.method === 'HEAD' ? undefined : text); },
        (error: unknown) => { response.writeHead(500, { 'content-type': 'text/plain' }).end(`${error instanceof Error ? error.message : String(error)}\n`); },
      );
    });
    server.keepAliveTimeout = 5000;
    // A scrape that never finishes sending its request must not hold a socket forever.
    server.requestTimeout = 10_000;
    await listenOn(server, `cannot serve metrics on ${host}:${port}`, (bound) => server.listen(port, host, bound));
    const address = server.address();
    const boundPort = typeof address === 'object' && address !== null ? address.port : port;
    return { server: new MetricsServer(server), url: `http://${host.includes(':') ? `[${host}]` : host}:${boundPort}/metrics` };
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => { resolve(); });
      this.server.closeAllConnections();
    });
  }
}
