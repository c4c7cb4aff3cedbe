// `pcache serve` as a systemd service: socket activation (the listening socket inherited from
// a .socket unit) and readiness notification (Type=notify), the two halves of systemd's
// daemon protocol that nbdkit and qemu-nbd implement too (sd_listen_fds(3), sd_notify(3)).
//
// Socket activation: systemd passes listening sockets from file descriptor 3 on and says so in
// LISTEN_PID (the process they are meant for) and LISTEN_FDS (how many). pcache serves one
// socket, so it takes exactly one. The variables are removed from the environment once read,
// as sd_listen_fds(unset_environment=1) does, so no child process takes them for its own.
//
// Notification: systemd listens on the datagram Unix socket named by NOTIFY_SOCKET. Node has
// no Unix datagram sockets (node:dgram is UDP only), so the message is sent by systemd-notify
// (from the systemd package, which is there wherever systemd runs the service), with
// --pid=<our pid> so that systemd attributes it to the main process. That makes the sender a
// child process: the unit needs NotifyAccess=all (docs/pcache.service). systemd-notify waits
// until systemd has read the message (its BARRIER), so a READY=1 cannot be lost to the race of
// a sender that exits first. A failure to notify is logged; it never stops the server.
//
// Invariants: nothing here runs unless the variables are set; a malformed LISTEN_FDS or more
// than one socket is a PcacheError 'EINVAL' at start, before anything is opened.

import { execFile } from 'node:child_process';
import { PcacheError } from '../lib/errors.js';

/** sd_listen_fds(3): the first inherited socket is always file descriptor 3. */
export const listenFdsStart = 3;
/** How long systemd-notify may take (it waits for systemd to read the message). */
const notifyTimeoutMs = 10_000;

/** An inherited listening socket, from systemd socket activation. */
export interface InheritedSocket {
  readonly fd: number;
  /** LISTEN_FDNAMES' name of it (FileDescriptorName=), for the log. */
  readonly name: string | undefined;
}

/**
 * The listening socket systemd passed to this process, or undefined when it was not socket
 * activated (no LISTEN_PID/LISTEN_FDS, or they name another process). Unsets the variables.
 */
export function takeInheritedSocket(env: NodeJS.ProcessEnv = process.env, pid = process.pid): InheritedSocket | undefined {
  const listenPid = env.LISTEN_PID;
  const listenFds = env.LISTEN_FDS;
  const names = env.LISTEN_FDNAMES;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (listenPid === undefined || listenFds === undefined) return undefined;
  // Meant for another process (a wrapper that did not exec us): not ours to take.
  if (!/^\d+$/.test(listenPid) || Number(listenPid) !== pid) return undefined;
  if (!/^\d+$/.test(listenFds)) throw new PcacheError('EINVAL', `LISTEN_FDS=${listenFds} is not a number of sockets (systemd socket activation)`);
  const count = Number(listenFds);
  if (count === 0) return undefined;
  if (count > 1) {
    throw new PcacheError('EINVAL', `systemd passed ${count} sockets (LISTEN_FDS=${count}); pcache serves one: give the .socket unit a single ListenStream=`);
  }
  return { fd: listenFdsStart, name: names?.split(':')[0] };
}

/** Whether the service manager wants notifications (Type=notify sets NOTIFY_SOCKET). */
export function notificationsWanted(env: NodeJS.ProcessEnv = process.env): boolean {
  return env.NOTIFY_SOCKET !== undefined && env.NOTIFY_SOCKET !== '';
}

/**
 * Sends sd_notify assignments (READY=1, STOPPING=1, STATUS=...) to the service manager
 * through systemd-notify. Resolves with undefined once systemd has the message, or with the
 * reason it could not be sent; never rejects.
 */
export function notifySystemd(assignments: Readonly<Record<string, string>>): Promise<string | undefined> {
  const args = [`--pid=${process.pid}`, ...Object.entries(assignments).map(([name, value]) => `${name}=${value}`)];
  return new Promise((resolve) => {
    execFile('systemd-notify', args, { timeout: notifyTimeoutMs, encoding: 'utf8' }, (error, _stdout, stderr) => {
      if (error === null) resolve(undefined);
      else if ((error as NodeJS.ErrnoException).code === 'ENOENT') resolve('systemd-notify is not installed (Debian package systemd)');
      else resolve(`systemd-notify failed: ${stderr.trim() || error.message}`);
    });
  });
}
