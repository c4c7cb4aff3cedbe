// The grammar of `pcache volume add|list|remove`: the volumes of a running server that serves
// a cache device without --backing (serve_pool.ts, volume_set.ts).

import { gcPercentFlag } from './args_commands.js';
import { switchFlag, valueFlag, type CommandGrammar } from './args_parse.js';

export type VolumeArgs =
  | { readonly action: 'list'; readonly controlPath: string; readonly json: boolean }
  | {
    readonly action: 'add';
    readonly controlPath: string;
    readonly json: boolean;
    readonly name: string;
    readonly backing: string;
    readonly cacheSizeBytes: number;
    readonly gcPercent: number | undefined;
    readonly dataCrc: boolean;
  }
  | { readonly action: 'remove'; readonly controlPath: string; readonly json: boolean; readonly name: string; readonly drain: boolean; readonly disconnect: boolean }
  | { readonly action: 'resize'; readonly controlPath: string; readonly json: boolean; readonly name: string; readonly cacheSizeBytes: number };

const actions = ['add', 'list', 'remove', 'resize'] as const;

export const volumeGrammar: CommandGrammar<VolumeArgs> = {
  spec: {
    summary: 'add, list and remove the volumes of a server that serves a cache device\'s volumes',
    usage: [
      'pcache volume add --control PATH --name NAME --backing PATH|URI --cache-size SIZE [--gc-percent N] [--data-crc] [--json]',
      'pcache volume list --control PATH [--json]',
      'pcache volume remove --control PATH NAME [--drain] [--disconnect] [--json]',
      'pcache volume resize --control PATH NAME --cache-size SIZE [--json]',
    ],
    flags: {
      control: valueFlag('PATH', "the server's control socket (required)"),
      name: valueFlag('NAME', 'add: the volume\'s name, which is its NBD export name (letters, digits, . _ -)'),
      backing: valueFlag('PATH|URI', 'add: its backing device, a file or block device or an nbd:// URI (no other volume may use it)'),
      'cache-size': valueFlag('SIZE', 'add, resize: its share of the cache device, taken from the free segments (at least 4 segments)'),
      'gc-percent': valueFlag('N', 'add: its GC threshold (default 70)'),
      'data-crc': switchFlag('add: store a CRC32C of every cached extent and check it on every read hit'),
      drain: switchFlag('remove: write its dirty data back first (without it, a volume holding dirty data is refused)'),
      disconnect: switchFlag('remove: disconnect its clients first (without it, a volume with clients is refused)'),
      json: switchFlag('print JSON'),
    },
    positionals: true,
    notes: [
      'The server is `pcache serve --cache PATH --control PATH` without --backing: it serves every volume',
      'recorded on the cache device, each as the NBD export of its name (nbdinfo --list shows them).',
      'A volume\'s share is its own: another volume\'s writes never evict its data. add records the',
      'volume durably before it answers; remove frees its share for later volumes. Each survives a crash.',
      'resize writes the volume back, then formats its share at the new size while its clients stay',
      'connected (their requests wait for a moment): it keeps every byte and starts with nothing cached.',
    ],
  },
  options(flags) {
    const [action, ...rest] = flags.positionals;
    const chosen = actions.find((known) => known === action);
    if (chosen === undefined) throw flags.usage(`say what to do: ${actions.join(', ')} (pcache volume --help)`);
    const controlPath = flags.required('control');
    const json = flags.has('json');
    const only = (allowed: readonly string[]): void => {
      for (const flag of ['name', 'backing', 'cache-size', 'gc-percent', 'data-crc', 'drain', 'disconnect']) {
        if (flags.has(flag) && !allowed.includes(flag)) throw flags.usage(`--${flag} makes no sense with volume ${chosen}`);
      }
    };
    if (chosen === 'list') {
      only([]);
      if (rest.length > 0) throw flags.usage(`volume list takes no arguments, got '${rest.join(' ')}'`);
      return { action: 'list', controlPath, json };
    }
    if (chosen === 'add') {
      only(['name', 'backing', 'cache-size', 'gc-percent', 'data-crc']);
      if (rest.length > 0) throw flags.usage(`volume add takes flags only (--name NAME ...), got '${rest.join(' ')}'`);
      const cacheSizeBytes = flags.size('cache-size');
      if (cacheSizeBytes === undefined) throw flags.usage('volume add needs --cache-size SIZE: the volume\'s share of the cache device');
      return { action: 'add', controlPath, json, name: flags.required('name'), backing: flags.required('backing'), cacheSizeBytes, gcPercent: gcPercentFlag(flags), dataCrc: flags.has('data-crc') };
    }
    if (chosen === 'resize') {
      only(['cache-size']);
      const [name, ...extra] = rest;
      if (name === undefined || extra.length > 0) throw flags.usage('volume resize takes one volume name: pcache volume resize --control PATH NAME --cache-size SIZE');
      const cacheSizeBytes = flags.size('cache-size');
      if (cacheSizeBytes === undefined) throw flags.usage('volume resize needs --cache-size SIZE: the volume\'s new share');
      return { action: 'resize', controlPath, json, name, cacheSizeBytes };
    }
    only(['drain', 'disconnect']);
    const [name, ...extra] = rest;
    if (name === undefined || extra.length > 0) throw flags.usage('volume remove takes one volume name: pcache volume remove --control PATH NAME');
    return { action: 'remove', controlPath, json, name, drain: flags.has('drain'), disconnect: flags.has('disconnect') };
  },
};
