// pcache's NBD client in tests: a connection or a remote device opened on a URI and closed
// after the test.

import type { TestContext } from 'node:test';
import { NbdClient } from '../../src/nbd/client/client.js';
import { NbdRemoteDevice, type NbdRemoteOptions } from '../../src/nbd/client/remote_device.js';
import { parseNbdUri } from '../../src/nbd/client/uri.js';

/** An NbdRemoteDevice on `uri`, closed after the test. */
export async function openRemoteDevice(t: TestContext, uri: string, options: NbdRemoteOptions = {}): Promise<NbdRemoteDevice> {
  const device = await NbdRemoteDevice.open(uri, options);
  t.after(() => device.close());
  return device;
}

/** One NbdClient connection to the export `uri` names, disconnected after the test. */
export async function connectClient(t: TestContext, uri: string, options: Partial<Parameters<typeof NbdClient.connect>[1]> = {}): Promise<NbdClient> {
  const parsed = parseNbdUri(uri);
  const client = await NbdClient.connect(parsed.address, { exportName: parsed.exportName, ...options });
  t.after(() => client.disconnect());
  return client;
}
