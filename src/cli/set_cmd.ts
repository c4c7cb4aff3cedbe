// `pcache set`: changes a running cache's knobs through its control socket (all the pairs of one
// command together, or none), or lists them. The server validates again (settings.ts): the
// command line's check is for a clear message before anything is sent, not for safety.

import { PcacheError } from '../lib/errors.js';
import { exitOk, type SetArgs } from './args.js';
import { controlRequest } from './control_client.js';
import { knobNamed, modeSettingName } from './settings.js';
import type { Terminal } from './terminal.js';

export async function setCommand(args: SetArgs, terminal: Terminal): Promise<number> {
  const listing = Object.keys(args.changes).length === 0;
  const result = await controlRequest(args.controlPath, listing ? 'settings' : 'set', listing ? { volume: args.volume } : { body: args.changes, volume: args.volume });
  if (typeof result !== 'object' || result === null) throw new PcacheError('EIO', `${args.controlPath} answered set with something that is not an object`);
  const settings = result as Record<string, unknown>;
  if (args.json) {
    terminal.out(JSON.stringify(settings, null, 2));
    return exitOk;
  }
  const changed = new Set(Object.keys(args.changes));
  const width = Math.max(...Object.keys(settings).map((name) => name.length));
  const lines = Object.entries(settings).map(([name, value]) => {
    const knob = knobNamed(name);
    const unit = knob === undefined || knob.unit === 'choice' || knob.unit === 'count' ? '' : knob.unit === 'percent' ? ' %' : knob.unit === 'bytes' ? ' bytes' : ' ms';
    const persisted = name === modeSettingName || knob?.persisted === true;
    const note = changed.has(name) ? (persisted ? '   (changed, stored in the cache)' : '   (changed until the server stops)') : '';
    return `${name.padEnd(width)}  ${String(value)}${unit}${note}`;
  });
  terminal.out(lines.join('\n'));
  return exitOk;
}
