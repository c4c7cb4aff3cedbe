// `pcache set` and `serve --tuning`: listing every knob, changing several at once, gc_percent
// stored in the cache (and the runtime knobs not), and refusals that change nothing: unknown
// names, values out of range and odd words on the client side (exit 2), the cross-field rule
// on the server side (exit 1, all or nothing), a --read-only server and a --no-cache server.
// After every refusal the settings are listed again and compared with those before it.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { knobNames, knobs } from '../../src/cli/settings.js';
import { tempDir } from '../helpers/files.js';
import { assertOneLineError, assertQuietLogs, type CliResult, pcacheJson, runCli, startServe } from '../helpers/pcache.js';

type Settings = Record<string, number | string>;

/** The defaults every server starts with (docs/operations.md; src/cache/cache_core.ts defaultTuning). */
const defaults: Settings = {
  mode: 'writeback',
  gc_percent: 70,
  writeback_start_percent: 80,
  writeback_stop_percent: 70,
  writeback_idle_ms: 1000,
  writeback_max_age_ms: 30_000,
  dirty_high_water_percent: 75,
  backing_offline_after_ms: 10_000,
  writeback_ordering: 'strict',
  sequential_cutoff_bytes: 4 * 1024 * 1024,
  fragmented_read_pieces: 16,
  fragmented_rewrite_pieces: 16,
  fragmented_thread_pieces: 16,
  space_wait_timeout_ms: 0,
};

async function settingsJson(control: string): Promise<Settings> {
  const settings = (await pcacheJson(['set', '--control', control, '--json'])) as Settings;
  assert.deepEqual(Object.keys(settings), knobNames, 'set --json lists every knob, in the table\'s order');
  return settings;
}

/** `pcache set --control C` (no pairs) parsed: every line "name  value unit" ("name  word" for a choice, "name  value" for a count). */
async function settingsTable(control: string): Promise<Settings> {
  const result = await runCli(['set', '--control', control]);
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.stderr, '');
  const settings: Settings = {};
  for (const line of result.stdout.trimEnd().split('\n')) {
    const match = /^([a-z_]+) +(\d+|[a-z]+)(?: (%|ms|bytes))?$/.exec(line);
    assert.ok(match !== null, `a line "name value unit": ${JSON.stringify(line)}`);
    const [, name = '', value = '', unit = ''] = match;
    if (name === 'mode' || name === 'writeback_ordering') {
      assert.equal(unit, '', `${name} is a word, shown without a unit`);
      settings[name] = value;
      continue;
    }
    assert.equal(unit, name.endsWith('_ms') ? 'ms' : name.endsWith('_bytes') ? 'bytes' : name.endsWith('_percent') ? '%' : '', `${name} is shown with its unit (a count has none)`);
    settings[name] = Number(value);
  }
  assert.deepEqual(Object.keys(settings), knobNames, 'set lists every knob, in the table\'s order');
  return settings;
}

async function gcPercentOf(control: string): Promise<number> {
  return ((await pcacheJson(['status', '--control', control, '--json'])) as { cache: { gcPercent: number } }).cache.gcPercent;
}

async function storedGcPercent(cache: string): Promise<number> {
  return ((await pcacheJson(['status', '--cache', cache, '--json'])) as { cache: { gcPercent: number } }).cache.gcPercent;
}

function assertRefused(result: CliResult, code: number, pattern: RegExp, what: string): void {
  assert.doesNotThrow(() => { assertOneLineError(result, code, pattern); }, `${what}: ${result.code} ${result.stderr}`);
  assert.equal(result.stdout, '', `${what}: nothing on stdout`);
}

describe('pcache set', () => {
  it('lists every knob, changes several at once, refuses bad changes without changing anything, and stores gc_percent only', async (t) => {
    const dir = tempDir(t, 'pcache-settings-');
    const cache = path.join(dir, 'cache.img');
    const control = path.join(dir, 'control.sock');
    const serveArgs = ['--cache', cache, '--cache-size', '128M', '--backing', path.join(dir, 'backing.img'), '--backing-size', '16M', '--socket', path.join(dir, 'nbd.sock'), '--control', control];
    const server = await startServe(t, serveArgs, dir);

    assert.deepEqual(await settingsTable(control), defaults);
    assert.deepEqual(await settingsJson(control), defaults);
    assert.deepEqual({ mode: 'writeback', ...Object.fromEntries(knobs.map((knob) => [knob.name, knob.defaultValue])) }, defaults, 'the knob table knows the defaults a server starts with');

    const changed = await runCli(['set', '--control', control, 'gc_percent', '50', 'writeback_idle_ms', '5000']);
    assert.equal(changed.code, 0, changed.stderr);
    assert.match(changed.stdout, /^gc_percent +50 % {3}\(changed, stored in the cache\)$/m);
    assert.match(changed.stdout, /^writeback_idle_ms +5000 ms {3}\(changed until the server stops\)$/m);
    assert.match(changed.stdout, /^writeback_max_age_ms +30000 ms$/m, 'unchanged knobs carry no note');
    const expected = { ...defaults, gc_percent: 50, writeback_idle_ms: 5000 };
    assert.deepEqual(await settingsJson(control), expected);
    assert.deepEqual(await settingsTable(control), expected);
    assert.equal(await gcPercentOf(control), 50, 'status shows the new gc_percent');

    // Refusals: one clear line each, and nothing changes.
    const refusals: [string[], number, RegExp][] = [
      [['bogus', '1'], 2, /^pcache: set: unknown setting 'bogus' \(settings: mode, gc_percent, writeback_start_percent, .*space_wait_timeout_ms\)$/],
      [['mode', 'writeforward'], 2, /^pcache: set: mode must be one of writeback, writethrough, writearound, passthrough, got "writeforward"$/],
      [['mode', 'writethrough', 'bogus', '1'], 2, /unknown setting 'bogus'/],
      [['gc_percent', '40', 'bogus', '1'], 2, /unknown setting 'bogus'/],
      [['constructor', '1'], 2, /unknown setting 'constructor'/],
      [['gc_percent', '91'], 2, /^pcache: set: gc_percent must be an integer from 0 to 90 \(percent\), got 91$/],
      [['writeback_start_percent', '101'], 2, /writeback_start_percent must be an integer from 0 to 100 \(percent\), got 101/],
      [['writeback_ordering', 'loose'], 2, /^pcache: set: writeback_ordering must be strict or relaxed, got "loose"$/],
      [['writeback_idle_ms', '2147483648'], 2, /writeback_idle_ms must be an integer from 0 to 2147483647 \(milliseconds\)/],
      [['writeback_idle_ms', '1.5'], 2, /writeback_idle_ms must be an integer .*got "1\.5"/],
      [['writeback_idle_ms', 'soon'], 2, /writeback_idle_ms must be an integer .*got "soon"/],
      [['gc_percent', '40', 'writeback_idle_ms', '1e3'], 2, /writeback_idle_ms must be an integer/],
      [['gc_percent'], 2, /^pcache: set: 'gc_percent' needs a value: give NAME VALUE pairs/],
      [['gc_percent', '40', 'writeback_idle_ms'], 2, /'writeback_idle_ms' needs a value/],
      [['gc_percent', '40', 'gc_percent', '30'], 2, /gc_percent given more than once/],
      [['writeback_stop_percent', '90'], 1, /^pcache: the server refused set: writeback_stop_percent \(90\) must not exceed writeback_start_percent \(80\)/],
      // All or nothing: the valid gc_percent and writeback_idle_ms of the same command are not applied either.
      [['gc_percent', '40', 'writeback_idle_ms', '7000', 'writeback_start_percent', '30', 'writeback_stop_percent', '35'], 1,
        /the server refused set: writeback_stop_percent \(35\) must not exceed writeback_start_percent \(30\)/],
    ];
    const results = await Promise.all(refusals.map(([words]) => runCli(['set', '--control', control, ...words])));
    results.forEach((result, index) => {
      const [words, code, pattern] = refusals[index] ?? [[], 0, /./];
      assertRefused(result, code, pattern, `set ${words.join(' ')}`);
    });
    assert.deepEqual(await settingsJson(control), expected, 'no refused set changed anything');
    assert.equal(await gcPercentOf(control), 50);
    const noServer = await runCli(['set', '--control', path.join(dir, 'nobody.sock'), 'gc_percent', '40']);
    assertRefused(noServer, 1, /no control socket at .*nobody\.sock/, 'set without a server');

    // Moving the watermarks past each other works in one command.
    const moved = await runCli(['set', '--control', control, 'writeback_start_percent', '30', 'writeback_stop_percent', '20']);
    assert.equal(moved.code, 0, moved.stderr);
    assert.deepEqual(await settingsJson(control), { ...expected, writeback_start_percent: 30, writeback_stop_percent: 20 });
    // A choice knob takes its words.
    const relaxed = await runCli(['set', '--control', control, 'writeback_ordering', 'relaxed']);
    assert.equal(relaxed.code, 0, relaxed.stderr);
    assert.match(relaxed.stdout, /^writeback_ordering +relaxed {3}\(changed until the server stops\)$/m);
    assert.deepEqual(await settingsJson(control), { ...expected, writeback_start_percent: 30, writeback_stop_percent: 20, writeback_ordering: 'relaxed' });

    assert.equal(await server.stop(), 0);
    const logs = assertQuietLogs(server.stderr);
    assert.equal(logs.filter((line) => line.msg === 'settings changed').length, 3, 'exactly the three accepted changes were logged');

    // gc_percent is in the cache; the runtime knobs are gone after a restart.
    assert.equal(await storedGcPercent(cache), 50);
    const again = await startServe(t, serveArgs, dir);
    assert.deepEqual(await settingsJson(control), { ...defaults, gc_percent: 50 });
    assert.equal(await again.stop(), 0);
  });

  it('serve --tuning starts with the given knobs, which last until the server stops', async (t) => {
    const dir = tempDir(t, 'pcache-settings-');
    const cache = path.join(dir, 'cache.img');
    const control = path.join(dir, 'control.sock');
    const serveArgs = ['--cache', cache, '--cache-size', '128M', '--backing', path.join(dir, 'backing.img'), '--backing-size', '16M', '--socket', path.join(dir, 'nbd.sock'), '--control', control];
    const tuned = await startServe(t, [...serveArgs, '--tuning', 'writeback_idle_ms=1234,writeback_start_percent=20,writeback_stop_percent=10,writeback_ordering=relaxed'], dir);
    assert.deepEqual(await settingsTable(control), { ...defaults, writeback_idle_ms: 1234, writeback_start_percent: 20, writeback_stop_percent: 10, writeback_ordering: 'relaxed' });
    assert.equal(await tuned.stop(), 0);
    assert.equal(await storedGcPercent(cache), 70, '--tuning stored nothing in the cache');

    const refusals: [string, RegExp][] = [
      ['bogus=1', /serve: --tuning: unknown setting 'bogus'/],
      ['toString=1', /serve: --tuning: unknown setting 'toString'/],
      ['gc_percent=50', /serve: --tuning: use --gc-percent for gc_percent/],
      ['writeback_idle_ms', /serve: --tuning takes NAME=VALUE pairs/],
      ['writeback_idle_ms=-1', /writeback_idle_ms must be an integer from 0 to 2147483647/],
      ['writeback_idle_ms=1,writeback_idle_ms=2', /writeback_idle_ms given more than once/],
      ['writeback_start_percent=20,writeback_stop_percent=30', /writeback_stop_percent \(30\) must not exceed writeback_start_percent \(20\)/],
      ['writeback_ordering=loose', /serve: --tuning: writeback_ordering must be strict or relaxed, got "loose"/],
      // Only one watermark given: checked against the other's default (start 80).
      ['writeback_stop_percent=90', /writeback_stop_percent \(90\) must not exceed writeback_start_percent \(80\) \(writeback_start_percent at its default/],
      ['writeback_start_percent=30', /writeback_stop_percent \(70\) must not exceed writeback_start_percent \(30\) \(writeback_stop_percent at its default/],
    ];
    const before = fs.readFileSync(cache);
    const results = await Promise.all(refusals.map(([tuning]) => runCli(['serve', ...serveArgs, '--tuning', tuning])));
    results.forEach((result, index) => {
      const [tuning, pattern] = refusals[index] ?? ['', /./];
      assertRefused(result, 2, pattern, `--tuning ${tuning}`);
    });
    assert.ok(fs.readFileSync(cache).equals(before), 'no refused --tuning touched the cache');
    const fresh = path.join(dir, 'fresh.img');
    const onBlank = await runCli(['serve', '--cache', fresh, '--cache-size', '128M', '--backing', path.join(dir, 'backing.img'), '--socket', path.join(dir, 'x.sock'), '--tuning', 'writeback_stop_percent=90']);
    assertRefused(onBlank, 2, /writeback_stop_percent \(90\) must not exceed writeback_start_percent \(80\)/, '--tuning on a blank cache');
    assert.equal(fs.existsSync(fresh), false, 'a usage error creates no cache file (and formats none)');
  });

  it('is refused by a --read-only server and by a --no-cache server', async (t) => {
    const dir = tempDir(t, 'pcache-settings-');
    const cache = path.join(dir, 'cache.img');
    const backing = path.join(dir, 'backing.img');
    const control = path.join(dir, 'control.sock');
    fs.writeFileSync(backing, Buffer.alloc(0));
    fs.truncateSync(backing, 16 * 1024 * 1024);
    const formatted = await runCli(['format', '--cache', cache, '--cache-size', '128M', '--backing', backing, '--gc-percent', '60']);
    assert.equal(formatted.code, 0, formatted.stderr);
    const cacheBytes = fs.readFileSync(cache);

    const readOnly = await startServe(t, ['--cache', cache, '--backing', backing, '--socket', path.join(dir, 'ro.sock'), '--control', control, '--read-only'], dir);
    const listed = await settingsJson(control);
    assert.equal(listed.gc_percent, 60, 'a read-only server still lists its settings');
    for (const words of [['gc_percent', '50'], ['writeback_idle_ms', '5000']]) {
      const refused = await runCli(['set', '--control', control, ...words]);
      assertRefused(refused, 1, /^pcache: the server refused set: the cache is served --read-only: its settings cannot change$/, `read-only set ${words.join(' ')}`);
      assert.deepEqual(await settingsJson(control), listed, 'nothing changed');
    }
    assert.equal(await readOnly.stop(), 0);
    assert.ok(fs.readFileSync(cache).equals(cacheBytes), 'nothing was written to the cache');
    assert.equal(await storedGcPercent(cache), 60);

    const noCache = await startServe(t, ['--no-cache', '--backing', backing, '--socket', path.join(dir, 'nc.sock'), '--control', control], dir);
    for (const words of [['gc_percent', '50'], []]) {
      const refused = await runCli(['set', '--control', control, ...words]);
      assertRefused(refused, 1, /^pcache: the server refused set: served with --no-cache: there are no cache settings$/, `no-cache set ${words.join(' ')}`);
    }
    assert.equal(await noCache.stop(), 0);
    assert.ok(fs.readFileSync(cache).equals(cacheBytes));
  });
});
