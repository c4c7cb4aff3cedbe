// Who else has a device open: the guard that keeps offline commands away from live caches.
//
// A cache device must have one owner. `format` over a device a server is using would destroy
// a live cache; a second `serve` on it would interleave two logs; `status --cache` and
// `check` on it would read a log that changes under them and report nonsense. Before any of
// these, the CLI looks through /proc/<pid>/fd for another process holding the same file (same
// device and inode) or the same block device (same device number) and refuses, naming it.
//
// Limits: only processes whose /proc entries this user may read are seen (all of them for
// root; the user's own otherwise, which is where a server started by the same user lives).
// Where /proc does not exist (not Linux) nothing is found: the check is a guard, not a lock.
// This process's own children are not "another process": a serve's volume processes
// (volume_process.ts) hold the cache device open on its behalf.

import fs from 'node:fs';
import { PcacheError } from '../lib/errors.js';

export interface DeviceUser {
  readonly pid: number;
  readonly command: string;
}

/** Files opened per process are bounded by the kernel; this bounds how many users are listed. */
const usersListedMax = 8;

/** The other processes that have `path` open (this process and its children excluded). */
export function deviceUsers(path: string): DeviceUser[] {
  let target: fs.Stats;
  try {
    target = fs.statSync(path);
  } catch {
    return [];
  }
  let pids: string[];
  try {
    pids = fs.readdirSync('/proc').filter((entry) => /^\d+$/.test(entry));
  } catch {
    return [];
  }
  const users: DeviceUser[] = [];
  for (const entry of pids) {
    const pid = Number(entry);
    if (pid === process.pid || parentOf(pid) === process.pid) continue;
    if (holds(pid, target)) users.push({ pid, command: commandOf(pid) });
    if (users.length >= usersListedMax) break;
  }
  return users;
}

/** Throws a PcacheError naming the processes that have `path` open, if any. */
export function refuseIfInUse(path: string, action: string): void {
  const users = deviceUsers(path);
  if (users.length === 0) return;
  const who = users.map((user) => `${user.command} (pid ${user.pid})`).join(', ');
  throw new PcacheError('EPERM', `refusing to ${action} ${path}: it is open in ${who}; stop that first (ask a running server with --control instead)`);
}

function holds(pid: number, target: fs.Stats): boolean {
  let fds: string[];
  try {
    fds = fs.readdirSync(`/proc/${pid}/fd`);
  } catch {
    return false; // gone, or not ours to look at
  }
  for (const fd of fds) {
    let open: fs.Stats;
    try {
      open = fs.statSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue;
    }
    if (target.isBlockDevice()) {
      if (open.isBlockDevice() && open.rdev === target.rdev) return true;
    } else if (open.dev === target.dev && open.ino === target.ino) {
      return true;
    }
  }
  return false;
}

/** The parent's pid, from /proc/PID/stat (after the command in parentheses: state, then ppid). */
function parentOf(pid: number): number | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[1]);
  } catch {
    return undefined;
  }
}

function commandOf(pid: number): string {
  try {
    return fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return 'a process';
  }
}
