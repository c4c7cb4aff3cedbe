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

  drainDurations(): void {
    const sink = this.sink;
    if (sink !== undefined) {
      for (let at = 0; at < this.ringLength; at += 1) sink(this.ringCommands[at] ?? 0, this.ringSeconds[at] ?? 0);
    }
    this.ringLength = 0;
  }
}

export interface MetricsSources {
  /** The cache's status; undefined with --no-cache. */
  cacheStatus(): CacheStatus | undefined;
  nbdStats(): NbdServerStats;
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

  // --- the cache, read from one status() per scrape ---
  let snapshot: CacheStatus | undefined;
  // Registered first, so its collect() takes the snapshot the cache metrics below read.
  new Gauge({
    name: 'pcache_up', help: '1 while a cache is open (0 with --no-cache)', registers,
    collect() {
      snapshot = sources.cacheStatus();
      this.set(snapshot === undefined ? 0 : 1);
    },
  });
  const cache = <T>(read: (status: CacheStatus) => T): (() => T | undefined) => () => (snapshot === undefined ? undefined : read(snapshot));
  const stats = (read: (counters: CacheStatus['counters']) => number): (() => number | undefined) => cache((status) => read(status.counters));

  new Gauge({
    name: 'pcache_state', help: 'The cache state: 1 for the current one, 0 for the others', labelNames: ['state'], registers,
    collect() {
      const now = snapshot?.state;
      for (const name of cacheStates) this.set({ state: name }, name === now ? 1 : 0);
    },
  });
  gauge('pcache_backing_online', '0 while the backing device is offline, 1 otherwise', cache((status) => (status.backingOfflineSince === undefined ? 1 : 0)));
  gauge('pcache_dirty_bytes', 'Bytes written to the cache and not yet written back', cache((status) => status.dirtyBytes));
  gauge('pcache_dirty_high_water_bytes', 'Dirty bytes at which writes are held while the backing device is offline', cache((status) => status.dirtyHighWaterBytes));
  gauge('pcache_segments', 'Segments of the cache device', cache((status) => status.cacheSegs));
  gauge('pcache_segments_used', 'Segments in use (log and data)', cache((status) => status.segsUsed));
  gauge('pcache_gc_percent', 'GC starts when this percentage of segments is in use', cache((status) => status.gcPercent));
  gauge('pcache_index_keys', 'Keys in the in-memory index', cache((status) => status.indexKeys));
  gauge('pcache_index_bytes', 'Bytes of memory held by the index', cache((status) => status.indexBytes));
  gauge('pcache_writeback_oldest_dirty_age_seconds', 'Age of the oldest dirty data (0 when clean)', cache((status) => (status.writeback.oldestDirtyAgeMs ?? 0) / 1000));
  total('pcache_read_hits_total', 'Read requests served entirely from the cache', stats((c) => c.readHitRequests));
  total('pcache_read_misses_total', 'Read requests that needed the backing device', stats((c) => c.readMissRequests));
  total('pcache_read_hit_bytes_total', 'Bytes read from the cache', stats((c) => c.readHitBytes));
  total('pcache_read_miss_bytes_total', 'Bytes read from the backing device for clients', stats((c) => c.readMissBytes));
  total('pcache_write_bytes_total', 'Bytes written by clients into the cache', stats((c) => c.writeBytes));
  total('pcache_writeback_bytes_total', 'Dirty log bytes writeback has retired, written back or superseded (rate() gives the writeback rate)', stats((c) => c.writebackBytes));
  total('pcache_writeback_backing_bytes_total', 'Bytes writeback wrote to the backing device', stats((c) => c.writebackBackingBytes));
  total('pcache_writeback_backing_writes_total', 'Writes writeback sent to the backing device', stats((c) => c.writebackBackingWrites));
  total('pcache_writeback_skipped_bytes_total', 'Dirty bytes writeback left out because newer writes superseded them', stats((c) => c.writebackSkippedBytes));
  total('pcache_writeback_rounds_total', 'Writeback rounds completed', stats((c) => c.writebackRounds));
  total('pcache_gc_segments_freed_total', 'Segments freed by garbage collection (rate() gives the GC rate)', stats((c) => c.gcSegmentsFreed));
  total('pcache_gc_ksets_total', 'Ksets garbage collection walked past', stats((c) => c.gcKsets));
  total('pcache_ksets_written_total', 'Key sets appended to the log', stats((c) => c.ksetsWritten));
  /** A counter with one label, each value of it read from the snapshot's counters. */
  const labelled = (name: string, help: string, label: string, kinds: readonly [string, (c: CacheStatus['counters']) => number][]): void => {
    const seenByKind = new Map<string, number>();
    new Counter({
      name, help, labelNames: [label], registers,
      collect() {
        if (snapshot === undefined) return;
        for (const [kind, read] of kinds) {
          const value = read(snapshot.counters);
          const seen = seenByKind.get(kind) ?? 0;
          this.inc({ [label]: kind }, Math.max(0, value - seen));
          seenByKind.set(kind, Math.max(seen, value));
        }
      },
    });
  };
  labelled('pcache_errors_total', 'Errors, by kind', 'kind', [
    ['cache_io', (c) => c.cacheIoErrors], ['backing_read', (c) => c.backingReadErrors], ['backing_write', (c) => c.backingWriteErrors],
    ['data_crc', (c) => c.dataCrcErrors], ['writeback', (c) => c.writebackErrors], ['gc', (c) => c.gcErrors],
  ]);
  // --- the policy: write mode, sequential cutoff, fills ---
  new Gauge({
    name: 'pcache_mode', help: 'The write mode: 1 for the current one, 0 for the others', labelNames: ['mode'], registers,
    collect() {
      if (snapshot === undefined) return;
      for (const mode of cacheModes) this.set({ mode }, mode === snapshot.mode ? 1 : 0);
    },
  });
  labelled('pcache_bypassed_requests_total', 'Requests that bypassed the cache, by reason (the sequential cutoff, or the write mode)', 'reason', [
    ['cutoff', (c) => c.bypassCutoffRequests], ['mode', (c) => c.bypassModeRequests],
  ]);
  labelled('pcache_bypassed_bytes_total', 'Bytes of the requests that bypassed the cache, by reason', 'reason', [
    ['cutoff', (c) => c.bypassCutoffBytes], ['mode', (c) => c.bypassModeBytes],
  ]);
  total('pcache_bypass_fallbacks_total', 'Writes meant for the backing device that were cached: they overlapped dirty data', stats((c) => c.bypassFallbacks));
  total('pcache_fills_admitted_total', 'Read misses (and writethrough copies) stored in the cache', stats((c) => c.fillsStored));
  labelled('pcache_fills_rejected_total', 'Read misses not stored in the cache, by reason (no free space or log room; the mode or cutoff; a full cache\'s first miss of a block)', 'reason', [
    ['space', (c) => c.fillsSkipped], ['policy', (c) => c.fillsNotAdmitted], ['first-miss', (c) => c.fillsNotRecurring],
  ]);
  total('pcache_second_chance_bytes_total', 'Bytes GC re-logged instead of evicting them: read since they were stored', stats((c) => c.secondChanceBytes));
  return registry;
}

/** The HTTP endpoint; `close` stops it. */
export class MetricsServer {
  private readonly server: http.Server;

  private constructor(server: http.Server) {
    this.server = server;
  }

  static async listen(registry: Registry, host: string, port: number): Promise<{ server: MetricsServer; url: string }> {
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
      registry.metrics().then(
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
