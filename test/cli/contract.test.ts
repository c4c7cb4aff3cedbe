// The command line's contract: --help for every command, --version, and usage errors — exit
// status 2 and exactly one line on stderr naming the offending flag — before anything is
// opened or written.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { MiB } from '../../src/lib/units.js';
import { tempDir } from '../helpers/files.js';
import { assertOneLineError, runCli } from '../helpers/pcache.js';

const packageVersion = (JSON.parse(fs.readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string }).version;

describe('help and version', () => {
  it('prints the version from package.json', async () => {
    const result = await runCli(['--version']);
    assert.equal(result.code, 0);
    assert.equal(result.stdout, `pcache ${packageVersion}\n`);
  });

  it('gives an overview naming every command and the exit codes', async () => {
    for (const args of [['--help'], ['-h'], ['help']]) {
      const result = await runCli(args);
      assert.equal(result.code, 0);
      for (const command of ['format', 'serve', 'status', 'check', 'drain']) assert.match(result.stdout, new RegExp(`^  ${command} `, 'm'));
      assert.match(result.stdout, /Exit status: 0 success, 1 .*\n2 a mistake in the command line/);
    }
  });

  it('has --help for every command, listing its flags', async () => {
    const flags: Record<string, string[]> = {
      format: ['--cache PATH', '--backing PATH', '--segment-size SIZE', '--data-crc', '--gc-percent N', '--force', '--discard-dirty'],
      serve: ['--cache PATH', '--backing PATH', '--cache-size SIZE', '--socket PATH', '--port N', '--bind ADDR', '--control PATH', '--export-name NAME', '--read-only', '--gc-percent N'],
      status: ['--cache PATH', '--control PATH', '--json'],
      check: ['--cache PATH', '--json'],
      drain: ['--control PATH'],
    };
    await Promise.all(Object.entries(flags).map(async ([command, expected]) => {
      for (const args of [[command, '--help'], [command, '-h'], ['help', command]]) {
        const result = await runCli(args);
        assert.equal(result.code, 0, `${args.join(' ')}: ${result.stderr}`);
        assert.match(result.stdout, new RegExp(`^pcache ${command}: `));
        for (const flag of expected) assert.ok(result.stdout.includes(`  ${flag}`), `${command} --help lists ${flag}`);
        assert.equal(result.stderr, '');
      }
    }));
  });
});

describe('usage errors', () => {
  it('exit with status 2 and one line naming the flag, and touch nothing', async (t) => {
    const dir = tempDir(t);
    const cache = path.join(dir, 'cache.img');
    const backing = path.join(dir, 'backing.img');
    fs.writeFileSync(backing, Buffer.alloc(MiB));
    const cases: [string[], RegExp][] = [
      [[], /no command given/],
      [['frobnicate'], /unknown command 'frobnicate'/],
      [['--frobnicate'], /unknown option --frobnicate/],
      [['format', '--cache', cache, '--backing', backing, '--frobnicate'], /format: unknown option --frobnicate/],
      [['format', '--backing', backing], /format: --cache is required/],
      [['format', '--cache', cache], /format: --backing is required/],
      [['format', '--cache'], /format: --cache needs a value/],
      [['format', '--cache', '--backing', backing], /format: --cache needs a value/],
      [['format', '--cache', cache, '--backing', backing, 'extra'], /format: unexpected argument 'extra'/],
      [['format', '--cache', cache, '--cache', cache, '--backing', backing], /--cache given more than once/],
      [['format', '--cache', cache, '--backing', backing, '--force=yes'], /--force takes no value/],
      [['format', '--cache', cache, '--backing', backing, '--gc-percent', '91'], /--gc-percent must be an integer from 0 to 90, got '91'/],
      [['format', '--cache', cache, '--backing', backing, '--gc-percent', '-1'], /--gc-percent needs a value/],
      [['format', '--cache', cache, '--backing', backing, '--gc-percent', '7.5'], /--gc-percent must be an integer/],
      [['format', '--cache', cache, '--backing', backing, '--segment-size', '1536K'], /--segment-size must be a multiple of 1M/],
      [['format', '--cache', cache, '--backing', backing, '--segment-size', '512K'], /--segment-size must be a multiple of 1M/],
      [['format', '--cache', cache, '--backing', backing, '--segment-size', '2G'], /--segment-size must be a multiple of 1M from 1M to 1G/],
      [['format', '--cache', cache, '--backing', backing, '--segment-size', 'lots'], /--segment-size: not a size: "lots"/],
      [['format', '--cache', cache, '--backing', backing, '--cache-size', '0'], /--cache-size must be larger than zero/],
      [['format', '--cache', cache, '--backing', backing, '--discard-dirty'], /--discard-dirty only goes with --force/],
      [['serve', '--cache', cache], /serve: --backing is required/],
      [['serve', '--backing', backing], /serve: --cache is required/],
      [['serve', '--cache', cache, '--backing', backing, '--socket', 's', '--port', '1'], /--socket and --port cannot be used together/],
      [['serve', '--cache', cache, '--backing', backing, '--bind', '0.0.0.0'], /--bind needs --port/],
      [['serve', '--cache', cache, '--backing', backing, '--port', '70000'], /--port must be an integer from 0 to 65535/],
      [['serve', '--cache', cache, '--backing', backing, '--busy-poll-us', '20000'], /--busy-poll-us must be an integer from 0 to 10000, got '20000'/],
      [['serve', '--cache', cache, '--backing', backing, '--read-only', '--gc-percent', '50'], /--gc-percent cannot be stored in a cache served --read-only/],
      [['serve', '--cache', cache, '--backing', backing, '--cache-size', '12Q'], /--cache-size: not a size/],
      [['status'], /status: --control or --cache is required/],
      [['status', '--cache', cache, '--control', 'x'], /either --control or --cache, not both/],
      [['check'], /check: --cache is required/],
      [['check', '--cache', cache, '--force'], /check: unknown option --force/],
      [['drain'], /drain: --control is required/],
      [['drain', '--control', 'x', '--timeout', 'soon'], /--timeout must be an integer/],
    ];
    const results = await Promise.all(cases.map(([args]) => runCli(args, { cwd: dir })));
    results.forEach((result, index) => {
      const [args, pattern] = cases[index] ?? [[], /./];
      assert.doesNotThrow(() => { assertOneLineError(result, 2, pattern); }, `pcache ${args.join(' ')} -> ${result.code} ${result.stderr}`);
      assert.equal(result.stdout, '', `pcache ${args.join(' ')} printed nothing on stdout`);
    });
    assert.deepEqual(fs.readdirSync(dir), ['backing.img'], 'no usage error created a file');
  });
});
