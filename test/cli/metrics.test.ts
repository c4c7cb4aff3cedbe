// `pcache serve --metrics`: the Prometheus endpoint scraped over HTTP and parsed with a small,
// strict parser of the text exposition format (version 0.0.4) written here, after known I/O
// from real clients (nbdcopy, qemu-io). The numbers must match what the clients sent: bytes
// exactly, request counts plausibly (clients may split requests), histograms consistent with
// the counters, cache gauges equal to `pcache status`, hit and miss bytes moving as the reads
// say, and no counter ever going down between scrapes. Also: the endpoint's other paths and
// methods, and the refusals of --metrics on the command line.
//
// The clients come from Debian packages (libnbd-bin, qemu-utils); a missing one fails the
// test naming the package, it is never skipped.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { KiB, MiB } from '../../src/lib/units.js';
import { patternBytes } from '../helpers/bytes.js';
import { tempDir } from '../helpers/files.js';
import { assertOneLineError, assertQuietLogs, pcacheJson, printedMetricsUrl, runCli, startServe } from '../helpers/pcache.js';
import { nbdcopy, qemuIo, requireTool, uriFor } from '../helpers/tools.js';

// --- a strict parser of the Prometheus text format -------------------------------------------

type MetricType = 'counter' | 'gauge' | 'histogram' | 'summary' | 'untyped';
const metricTypes: readonly MetricType[] = ['counter', 'gauge', 'histogram', 'summary', 'untyped'];

interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

interface Family {
  readonly name: string;
  readonly help: string | undefined;
  readonly type: MetricType;
  readonly samples: Sample[];
}

type Exposition = ReadonlyMap<string, Family>;

const metricNamePattern = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const labelNamePattern = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const valuePattern = /^[+-]?(?:Inf|NaN|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$/;

function parseValue(text: string, where: string): number {
  if (!valuePattern.test(text)) throw new Error(`${where}: not a number: ${JSON.stringify(text)}`);
  if (text.endsWith('Inf')) return text.startsWith('-') ? -Infinity : Infinity;
  return Number(text);
}

/** The sample names a family of `type` may have. */
function sampleNamesOf(family: string, type: MetricType): string[] {
  if (type === 'histogram') return [`${family}_bucket`, `${family}_sum`, `${family}_count`];
  if (type === 'summary') return [family, `${family}_sum`, `${family}_count`];
  return [family];
}

function seriesKey(name: string, labels: Readonly<Record<string, string>>): string {
  return `${name}{${Object.keys(labels).sort().map((label) => `${label}=${JSON.stringify(labels[label])}`).join(',')}}`;
}

/** `name{a="x",b="y"} value [timestamp]` -> its parts; throws on anything malformed. */
function parseSampleLine(line: string, where: string): Sample {
  const nameMatch = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
  if (nameMatch === null) throw new Error(`${where}: no metric name: ${line}`);
  const name = nameMatch[0];
  let at = name.length;
  const labels: Record<string, string> = {};
  if (line[at] === '{') {
    at += 1;
    while (line[at] !== '}') {
      const labelMatch = /^([a-zA-Z_][a-zA-Z0-9_]*)="/.exec(line.slice(at));
      if (labelMatch === null) throw new Error(`${where}: bad label at column ${at}: ${line}`);
      const label = labelMatch[1] ?? '';
      if (!labelNamePattern.test(label) || label in labels) throw new Error(`${where}: bad or repeated label ${label}: ${line}`);
      at += labelMatch[0].length;
      let value = '';
      for (;;) {
        const char = line[at];
        if (char === undefined) throw new Error(`${where}: unterminated label value: ${line}`);
        at += 1;
        if (char === '"') break;
        if (char === '\\') {
          const escaped = line[at];
          at += 1;
          if (escaped === '\\') value += '\\';
          else if (escaped === '"') value += '"';
          else if (escaped === 'n') value += '\n';
          else throw new Error(`${where}: bad escape \\${String(escaped)} in a label value: ${line}`);
        } else {
          value += char;
        }
      }
      labels[label] = value;
      if (line[at] === ',') at += 1;
      else if (line[at] !== '}') throw new Error(`${where}: expected , or } after a label value: ${line}`);
    }
    at += 1;
  }
  if (line[at] !== ' ') throw new Error(`${where}: expected one space before the value: ${line}`);
  const rest = line.slice(at + 1).split(' ');
  if (rest.length > 2 || rest.some((part) => part === '')) throw new Error(`${where}: expected "value [timestamp]": ${line}`);
  const value = parseValue(rest[0] ?? '', where);
  if (rest[1] !== undefined && !/^-?\d+$/.test(rest[1])) throw new Error(`${where}: bad timestamp: ${line}`);
  return { name, labels, value };
}

/**
 * Parses the text exposition format strictly: only HELP and TYPE comments; one HELP and one
 * TYPE per family, HELP (if any) right before TYPE; every sample inside the family declared
 * last and named as its type allows; no series twice; values are numbers; histograms have
 * cumulative buckets ending at +Inf equal to _count, and a _sum.
 */
function parseExposition(text: string): Exposition {
  if (!text.endsWith('\n')) throw new Error('the exposition does not end with a newline');
  const families = new Map<string, Family>();
  const series = new Set<string>();
  let pendingHelp: { name: string; help: string } | undefined;
  let current: Family | undefined;
  text.slice(0, -1).split('\n').forEach((line, index) => {
    const where = `line ${index + 1}`;
    if (line === '') return;
    if (line.startsWith('#')) {
      const help = /^# HELP (\S+)(?: (.*))?$/.exec(line);
      const type = /^# TYPE (\S+) (\S+)$/.exec(line);
      if (help !== null) {
        const name = help[1] ?? '';
        if (!metricNamePattern.test(name)) throw new Error(`${where}: bad metric name in HELP: ${line}`);
        if (families.has(name) || pendingHelp !== undefined) throw new Error(`${where}: HELP for ${name} repeated or not followed by its TYPE`);
        pendingHelp = { name, help: (help[2] ?? '').replace(/\\(\\|n)/g, (_all, escaped: string) => (escaped === 'n' ? '\n' : '\\')) };
        return;
      }
      if (type !== null) {
        const name = type[1] ?? '';
        const kind = metricTypes.find((candidate) => candidate === type[2]);
        if (!metricNamePattern.test(name)) throw new Error(`${where}: bad metric name in TYPE: ${line}`);
        if (kind === undefined) throw new Error(`${where}: unknown metric type: ${line}`);
        if (families.has(name)) throw new Error(`${where}: TYPE for ${name} repeated`);
        if (pendingHelp !== undefined && pendingHelp.name !== name) throw new Error(`${where}: HELP for ${pendingHelp.name} followed by TYPE for ${name}`);
        current = { name, help: pendingHelp?.help, type: kind, samples: [] };
        families.set(name, current);
        pendingHelp = undefined;
        return;
      }
      throw new Error(`${where}: a comment that is neither HELP nor TYPE: ${line}`);
    }
    if (pendingHelp !== undefined) throw new Error(`${where}: HELP for ${pendingHelp.name} without a TYPE`);
    const sample = parseSampleLine(line, where);
    if (current === undefined || !sampleNamesOf(current.name, current.type).includes(sample.name)) {
      throw new Error(`${where}: sample ${sample.name} is not part of the family declared last (${current?.name ?? 'none'})`);
    }
    if (current.type === 'histogram' && sample.name.endsWith('_bucket')) {
      const le = sample.labels.le;
      if (le === undefined) throw new Error(`${where}: a histogram bucket without le: ${line}`);
      parseValue(le, where);
    } else if ('le' in sample.labels && current.type === 'histogram') {
      throw new Error(`${where}: le on a histogram's _sum or _count: ${line}`);
    }
    const key = seriesKey(sample.name, sample.labels);
    if (series.has(key)) throw new Error(`${where}: series ${key} appears twice`);
    series.add(key);
    current.samples.push(sample);
  });
  if (pendingHelp !== undefined) throw new Error(`HELP for ${pendingHelp.name} without a TYPE`);
  for (const family of families.values()) {
    if (family.type === 'histogram') checkHistogram(family);
  }
  return families;
}

/** Per label set (without le): buckets sorted by le are non-decreasing, end at +Inf == _count, and _sum exists. */
function checkHistogram(family: Family): void {
  const groups = new Map<string, { labels: Record<string, string>; buckets: { le: number; value: number }[] }>();
  for (const sample of family.samples) {
    if (!sample.name.endsWith('_bucket')) continue;
    const { le, ...rest } = sample.labels;
    const key = seriesKey('', rest);
    const group = groups.get(key) ?? { labels: rest, buckets: [] };
    group.buckets.push({ le: parseValue(le ?? '', family.name), value: sample.value });
    groups.set(key, group);
  }
  for (const [key, group] of groups) {
    const buckets = group.buckets.sort((a, b) => a.le - b.le);
    for (let index = 1; index < buckets.length; index += 1) {
      const previous = buckets[index - 1];
      const bucket = buckets[index];
      if (previous === undefined || bucket === undefined) continue;
      if (bucket.value < previous.value) throw new Error(`${family.name}${key}: bucket le=${bucket.le} (${bucket.value}) below le=${previous.le} (${previous.value})`);
    }
    const last = buckets[buckets.length - 1];
    if (last?.le !== Infinity) throw new Error(`${family.name}${key}: no +Inf bucket`);
    const count = family.samples.find((sample) => sample.name === `${family.name}_count` && seriesKey('', sample.labels) === key);
    const sum = family.samples.find((sample) => sample.name === `${family.name}_sum` && seriesKey('', sample.labels) === key);
    if (count === undefined || sum === undefined) throw new Error(`${family.name}${key}: _count or _sum missing`);
    if (count.value !== last.value) throw new Error(`${family.name}${key}: +Inf bucket ${last.value} differs from _count ${count.value}`);
  }
}

function familyOf(exposition: Exposition, sampleName: string): Family | undefined {
  for (const name of [sampleName, sampleName.replace(/_(bucket|sum|count)$/, '')]) {
    const family = exposition.get(name);
    if (family !== undefined && sampleNamesOf(family.name, family.type).includes(sampleName)) return family;
  }
  return undefined;
}

/** The one sample `name` with exactly `labels`, or undefined. */
function find(exposition: Exposition, name: string, labels: Readonly<Record<string, string>> = {}): number | undefined {
  const key = seriesKey(name, labels);
  return familyOf(exposition, name)?.samples.find((sample) => seriesKey(sample.name, sample.labels) === key)?.value;
}

/** The one sample `name` with exactly `labels`; fails if it is missing. */
function value(exposition: Exposition, name: string, labels: Readonly<Record<string, string>> = {}): number {
  const found = find(exposition, name, labels);
  assert.ok(found !== undefined, `the scrape has ${seriesKey(name, labels)}`);
  return found;
}

function assertFamily(exposition: Exposition, name: string, type: MetricType): Family {
  const family = exposition.get(name);
  assert.ok(family !== undefined, `the scrape declares ${name}`);
  assert.equal(family.type, type, `${name} is a ${type}`);
  assert.ok(family.help !== undefined && family.help.length > 0, `${name} has HELP text`);
  return family;
}

/** Every counter and histogram series of `before` is still in `after`, and not lower. */
function assertNothingWentDown(before: Exposition, after: Exposition): void {
  for (const family of before.values()) {
    if (family.type !== 'counter' && family.type !== 'histogram') continue;
    for (const sample of family.samples) {
      const later = find(after, sample.name, sample.labels);
      const key = seriesKey(sample.name, sample.labels);
      assert.ok(later !== undefined, `${key} is still exported`);
      assert.ok(later >= sample.value, `${key} went down from ${sample.value} to ${later}`);
    }
  }
}

const expositionContentType = 'text/plain; version=0.0.4; charset=utf-8';

async function scrape(url: string): Promise<Exposition> {
  const response = await fetch(url);
  assert.equal(response.status, 200);
  assert.equal(response.headers.get('content-type'), expositionContentType);
  return parseExposition(await response.text());
}

interface ServerStatus {
  cache: { dirtyBytes: number; segsUsed: number; cacheSegs: number; gcPercent: number; state: string };
  nbd: { connectionsTotal: number };
}

async function serverStatus(control: string): Promise<ServerStatus> {
  return (await pcacheJson(['status', '--control', control, '--json'])) as ServerStatus;
}

const ops = ['read', 'write', 'flush', 'trim', 'write_zeroes', 'cache', 'block_status', 'other'] as const;
/** Writeback held off, so dirty bytes stay put while the test compares them. */
const holdWriteback = 'writeback_start_percent=100,writeback_stop_percent=100,writeback_idle_ms=600000,writeback_max_age_ms=600000,sequential_cutoff_bytes=0';

// --- the tests ------------------------------------------------------------------------------

describe('the exposition parser used here', () => {
  it('accepts well-formed text and refuses each kind of malformed text', () => {
    const good = [
      '# HELP a_total Things, with \\\\ and \\n escapes',
      '# TYPE a_total counter',
      'a_total{x="1",y="q\\"uo\\\\te\\n"} 3',
      'a_total{x="2"} 4.5e3 1700000000000',
      '',
      '# TYPE h histogram',
      'h_bucket{le="0.1"} 1',
      'h_bucket{le="+Inf"} 2',
      'h_sum 0.3',
      'h_count 2',
      '',
    ].join('\n');
    const parsed = parseExposition(good);
    assert.equal(parsed.get('a_total')?.help, 'Things, with \\ and \n escapes');
    assert.equal(value(parsed, 'a_total', { x: '1', y: 'q"uo\\te\n' }), 3);
    assert.equal(value(parsed, 'a_total', { x: '2' }), 4500);
    assert.equal(value(parsed, 'h_count'), 2);
    assert.equal(find(parsed, 'a_total'), undefined, 'labels must match exactly');
    const bad: [string, RegExp][] = [
      ['a 1\n', /not part of the family declared last \(none\)/],
      ['# TYPE a gauge\nb 1\n', /sample b is not part of the family declared last \(a\)/],
      ['# TYPE a gauge\na 1', /does not end with a newline/],
      ['# TYPE a gauge\na one\n', /not a number/],
      ['# TYPE a gauge\na{x="1} 1\n', /unterminated label value/],
      ['# TYPE a gauge\na{x=1} 1\n', /bad label/],
      ['# TYPE a gauge\na{x="1",x="2"} 1\n', /repeated label/],
      ['# TYPE a gauge\na 1\na 2\n', /appears twice/],
      ['# TYPE a gauge\n# TYPE a gauge\n', /repeated/],
      ['# TYPE a meter\n', /unknown metric type/],
      ['# HELP a x\n# TYPE b gauge\n', /HELP for a followed by TYPE for b/],
      ['# a remark\n', /neither HELP nor TYPE/],
      ['# TYPE a gauge\na  1\n', /expected "value \[timestamp\]"/],
      ['# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n', /below le=1/],
      ['# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 3\n', /differs from _count/],
      ['# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n', /no \+Inf bucket/],
      ['# TYPE h histogram\nh_bucket 1\n', /bucket without le/],
      ['# TYPE h histogram\nh 1\n', /not part of the family/],
    ];
    for (const [text, pattern] of bad) assert.throws(() => parseExposition(text), pattern, JSON.stringify(text));
  });
});

describe('pcache serve --metrics', () => {
  it('counts requests, bytes, latencies, hits and misses exactly as known I/O says, and matches status', async (t) => {
    requireTool('nbdcopy', 'libnbd-bin');
    requireTool('qemu-io', 'qemu-utils');
    const dir = tempDir(t, 'pcache-metrics-');
    const socket = path.join(dir, 'nbd.sock');
    const control = path.join(dir, 'control.sock');
    const server = await startServe(t, [
      '--cache', path.join(dir, 'cache.img'), '--cache-size', '128M', '--backing', path.join(dir, 'backing.img'), '--backing-size', '32M',
      '--socket', socket, '--control', control, '--metrics', '127.0.0.1:0', '--tuning', holdWriteback,
    ], dir);
    const url = await printedMetricsUrl(server);
    assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    const uri = uriFor(socket);

    // Before any I/O: every per-op counter is there and zero, the cache is up and running.
    const idle = await scrape(url);
    for (const op of ops) {
      assert.equal(value(idle, 'pcache_nbd_requests_total', { op }), 0);
      assert.equal(value(idle, 'pcache_nbd_request_bytes_total', { op }), 0);
      assert.equal(value(idle, 'pcache_nbd_request_errors_total', { op }), 0);
    }

    // Writes: 4 MiB by nbdcopy (then a flush), 64 KiB, write-zeroes 128 KiB, discard 192 KiB, flush by qemu-io.
    const source = path.join(dir, 'source.bin');
    fs.writeFileSync(source, patternBytes(4 * MiB, 71));
    await nbdcopy(['--flush', source, uri]);
    await qemuIo(uri, ['write -P 0x5a 8M 64k', 'write -z 9M 128k', 'discard 10M 192k', 'flush']);
    const writtenBytes = 4 * MiB + 64 * KiB;
    const first = await scrape(url);
    const status = await serverStatus(control);

    for (const [name, type] of [
      ['pcache_nbd_requests_total', 'counter'], ['pcache_nbd_request_bytes_total', 'counter'], ['pcache_nbd_request_errors_total', 'counter'],
      ['pcache_nbd_request_duration_seconds', 'histogram'], ['pcache_dirty_bytes', 'gauge'], ['pcache_state', 'gauge'], ['pcache_segments_used', 'gauge'],
      ['pcache_read_hit_bytes_total', 'counter'], ['pcache_read_miss_bytes_total', 'counter'], ['pcache_errors_total', 'counter'],
    ] as const) {
      assertFamily(first, name, type);
    }
    const writes = value(first, 'pcache_nbd_requests_total', { op: 'write' });
    assert.equal(value(first, 'pcache_nbd_request_bytes_total', { op: 'write' }), writtenBytes, 'write bytes are exactly what the clients sent');
    assert.ok(writes >= 2 && writes <= 1 + (4 * MiB) / 512, `write requests: ${writes}`);
    assert.equal(value(first, 'pcache_nbd_request_bytes_total', { op: 'write_zeroes' }), 128 * KiB);
    assert.equal(value(first, 'pcache_nbd_request_bytes_total', { op: 'trim' }), 192 * KiB);
    assert.ok(value(first, 'pcache_nbd_requests_total', { op: 'write_zeroes' }) >= 1);
    assert.ok(value(first, 'pcache_nbd_requests_total', { op: 'trim' }) >= 1);
    assert.ok(value(first, 'pcache_nbd_requests_total', { op: 'flush' }) >= 2, 'nbdcopy --flush and qemu-io flush both flushed');
    assert.equal(value(first, 'pcache_nbd_requests_total', { op: 'read' }), 0, 'nothing read yet');
    for (const op of ops) assert.equal(value(first, 'pcache_nbd_request_errors_total', { op }), 0, `no ${op} errors`);
    assert.equal(value(first, 'pcache_write_bytes_total'), writtenBytes, 'the cache took in what NBD received');

    // The latency histogram agrees with the request counters, op by op.
    for (const op of ['write', 'write_zeroes', 'trim', 'flush'] as const) {
      const requests = value(first, 'pcache_nbd_requests_total', { op });
      assert.equal(value(first, 'pcache_nbd_request_duration_seconds_bucket', { op, le: '+Inf' }), requests, `${op}: +Inf bucket == requests`);
      assert.equal(value(first, 'pcache_nbd_request_duration_seconds_count', { op }), requests, `${op}: _count == requests`);
      const sum = value(first, 'pcache_nbd_request_duration_seconds_sum', { op });
      assert.ok(sum > 0 && sum < requests * 10, `${op}: plausible total latency ${sum} s`);
    }

    // The cache gauges equal status (nothing moves: writeback is held off).
    assert.ok(status.cache.dirtyBytes >= writtenBytes, `dirty bytes ${status.cache.dirtyBytes}`);
    assert.equal(value(first, 'pcache_dirty_bytes'), status.cache.dirtyBytes, 'pcache_dirty_bytes == status dirtyBytes');
    assert.equal(value(first, 'pcache_segments_used'), status.cache.segsUsed);
    assert.ok(value(first, 'pcache_segments_used') >= 1);
    assert.equal(value(first, 'pcache_segments'), status.cache.cacheSegs);
    assert.equal(value(first, 'pcache_gc_percent'), 70);
    assert.equal(value(first, 'pcache_up'), 1);
    assert.equal(value(first, 'pcache_backing_online'), 1);
    assert.equal(value(first, 'pcache_state', { state: 'running' }), 1);
    for (const state of ['draining', 'degraded', 'backing-offline', 'failed', 'stopping', 'stopped']) assert.equal(value(first, 'pcache_state', { state }), 0, state);
    assert.equal(value(first, 'pcache_nbd_connections_total'), status.nbd.connectionsTotal);
    assert.ok(status.nbd.connectionsTotal >= 2);
    assert.equal(value(first, 'pcache_read_hit_bytes_total'), 0);
    assert.equal(value(first, 'pcache_read_miss_bytes_total'), 0);
    for (const kind of ['cache_io', 'backing_read', 'backing_write', 'data_crc', 'writeback', 'gc']) assert.equal(value(first, 'pcache_errors_total', { kind }), 0, kind);
    for (const family of first.values()) {
      if (!family.name.startsWith('pcache_')) continue;
      for (const sample of family.samples) assert.ok(Number.isFinite(sample.value) || sample.labels.le === '+Inf', `${seriesKey(sample.name, sample.labels)} is finite`);
    }

    // The process defaults of prom-client.
    assertFamily(first, 'process_cpu_user_seconds_total', 'counter');
    assert.ok(value(first, 'process_cpu_user_seconds_total') > 0);
    assert.ok(value(first, 'process_resident_memory_bytes') > MiB);
    const started = value(first, 'process_start_time_seconds');
    assert.ok(Math.abs(started - Date.now() / 1000) < 600, `process_start_time_seconds ${started} is about now`);
    assertFamily(first, 'nodejs_heap_size_total_bytes', 'gauge');
    assert.ok(value(first, 'nodejs_heap_size_total_bytes') > 0);
    const version = /^v(\d+)\.(\d+)\.(\d+)/.exec(process.version);
    assert.equal(value(first, 'nodejs_version_info', { version: process.version, major: version?.[1] ?? '', minor: version?.[2] ?? '', patch: version?.[3] ?? '' }), 1);
    assertFamily(first, 'nodejs_eventloop_lag_seconds', 'gauge');
    assertFamily(first, 'nodejs_gc_duration_seconds', 'histogram');

    // Reads of written data: hits, byte for byte.
    await qemuIo(uri, ['read 0 4M', 'read -P 0x5a 8M 64k']);
    const second = await scrape(url);
    const readsOf = (exposition: Exposition): number => value(exposition, 'pcache_nbd_requests_total', { op: 'read' });
    assert.equal(value(second, 'pcache_nbd_request_bytes_total', { op: 'read' }), writtenBytes);
    assert.ok(readsOf(second) >= 2, `read requests: ${readsOf(second)}`);
    assert.equal(value(second, 'pcache_read_hit_bytes_total'), writtenBytes, 'written data is read from the cache');
    assert.equal(value(second, 'pcache_read_miss_bytes_total'), 0);
    assert.equal(value(second, 'pcache_read_hits_total'), readsOf(second), 'every read was a hit');
    assert.equal(value(second, 'pcache_read_misses_total'), 0);
    assert.equal(value(second, 'pcache_nbd_request_duration_seconds_count', { op: 'read' }), readsOf(second));
    assertNothingWentDown(first, second);

    // A read of data never written: a miss, byte for byte.
    await qemuIo(uri, ['read -P 0 20M 1M']);
    const third = await scrape(url);
    assert.equal(value(third, 'pcache_nbd_request_bytes_total', { op: 'read' }), writtenBytes + MiB);
    assert.equal(value(third, 'pcache_read_hit_bytes_total'), writtenBytes, 'no new hits');
    assert.equal(value(third, 'pcache_read_miss_bytes_total'), MiB, 'never-written data came from the backing device');
    assert.equal(value(third, 'pcache_read_misses_total'), readsOf(third) - readsOf(second));
    assert.equal(value(third, 'pcache_nbd_request_duration_seconds_bucket', { op: 'read', le: '+Inf' }), readsOf(third));
    assert.equal(value(third, 'pcache_nbd_request_bytes_total', { op: 'write' }), writtenBytes, 'reads wrote nothing');
    assert.equal(value(third, 'pcache_dirty_bytes'), (await serverStatus(control)).cache.dirtyBytes);
    assertNothingWentDown(second, third);
    assertNothingWentDown(first, await scrape(url));

    // The endpoint: HEAD, a query string, other paths and methods.
    const head = await fetch(url, { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get('content-type'), expositionContentType);
    assert.equal(await head.text(), '');
    assert.equal((await fetch(`${url}?name[]=pcache_up`)).status, 200);
    const other = await fetch(new URL('/other', url));
    assert.equal(other.status, 404);
    assert.match(await other.text(), /metrics are at \/metrics/);
    assert.equal((await fetch(new URL('/', url))).status, 404);
    assert.equal((await fetch(`${url}/more`)).status, 404);
    const post = await fetch(url, { method: 'POST', body: 'x' });
    assert.equal(post.status, 405);
    assert.equal(post.headers.get('allow'), 'GET, HEAD');
    await post.text();

    assert.equal(await server.stop(), 0);
    assertQuietLogs(server.stderr);
    await assert.rejects(fetch(url), 'the endpoint closed with the server');
  });

  it('refuses a non-loopback address without --metrics-allow-remote, and malformed addresses, before opening anything', async (t) => {
    const dir = tempDir(t, 'pcache-metrics-');
    const base = ['serve', '--cache', 'cache.img', '--cache-size', '128M', '--backing', 'backing.img', '--backing-size', '32M', '--socket', 'nbd.sock'];
    const cases: [string[], RegExp][] = [
      [['--metrics', '0.0.0.0:9187'], /serve: --metrics 0\.0\.0\.0:9187: 0\.0\.0\.0 is not a loopback address and metrics have no authentication; add --metrics-allow-remote/],
      [['--metrics', '192.0.2.1:9187'], /192\.0\.2\.1 is not a loopback address/],
      [['--metrics', 'example.com:9187'], /example\.com is not a loopback address/],
      [['--metrics', 'nonsense'], /serve: --metrics takes HOST:PORT .*, got 'nonsense'/],
      [['--metrics', '127.0.0.1'], /--metrics takes HOST:PORT/],
      [['--metrics', '127.0.0.1:70000'], /--metrics takes HOST:PORT/],
      [['--metrics', ':9187'], /--metrics takes HOST:PORT/],
      [['--metrics', '::1:9187'], /--metrics takes HOST:PORT/],
      [['--metrics-allow-remote'], /serve: --metrics-allow-remote needs --metrics/],
    ];
    const results = await Promise.all(cases.map(([extra]) => runCli([...base, ...extra], { cwd: dir })));
    results.forEach((result, index) => {
      const [extra, pattern] = cases[index] ?? [[], /./];
      assert.doesNotThrow(() => { assertOneLineError(result, 2, pattern); }, `${extra.join(' ')} -> ${result.code} ${result.stderr}`);
      assert.equal(result.stdout, '');
    });
    assert.deepEqual(fs.readdirSync(dir), [], 'no refused command created a file or a socket');
  });

  it('fails with one line, and leaves nothing listening, when the metrics port is taken', async (t) => {
    const dir = tempDir(t, 'pcache-metrics-');
    const squatter = net.createServer();
    await new Promise<void>((resolve) => { squatter.listen(0, '127.0.0.1', resolve); });
    t.after(() => new Promise<void>((resolve) => { squatter.close(() => { resolve(); }); }));
    const address = squatter.address();
    assert.ok(typeof address === 'object' && address !== null);
    const result = await runCli([
      'serve', '--cache', 'cache.img', '--cache-size', '128M', '--backing', 'backing.img', '--backing-size', '32M',
      '--socket', 'nbd.sock', '--control', 'control.sock', '--metrics', `127.0.0.1:${address.port}`,
    ], { cwd: dir });
    assertOneLineError(result, 1, new RegExp(`cannot serve metrics on 127\\.0\\.0\\.1:${address.port}: .*EADDRINUSE`));
    assert.equal(result.stdout, '', 'it never said it was serving');
    assert.deepEqual(fs.readdirSync(dir).sort(), ['backing.img', 'cache.img'], 'the NBD and control sockets were removed again');
    const status = await runCli(['status', '--cache', path.join(dir, 'cache.img'), '--json']);
    assert.equal(status.code, 0, `the cache was closed cleanly: ${status.stderr}`);
  });
});
