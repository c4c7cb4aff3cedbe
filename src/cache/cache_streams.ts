// Sequential streams, for the sequential cutoff (bcache's sequential_cutoff): which client
// requests continue a run of requests, each starting where the previous one of the run ended.
//
// Streams are kept per client (an opaque number the NBD server gives each connection; 0 for
// callers that give none), at most streamsPerClientMax per client, the least recently used
// replaced; at most streamClientsMax clients are remembered, the oldest forgotten first. So
// the table is bounded whatever the clients do, and a client interleaving a few sequential
// streams (a copy reading one file and writing another) keeps each of them.
// Cost per request: a scan of streamsPerClientMax numbers, and a Map lookup when the client is
// not the last request's; no allocation except for a client seen for the first time.

export const streamsPerClientMax = 8;
export const streamClientsMax = 256;

class ClientStreams {
  /** Where each stream's last request ended (-1: slot unused). */
  readonly ends = new Float64Array(streamsPerClientMax).fill(-1);
  /** Bytes each stream has run so far. */
  readonly runBytes = new Float64Array(streamsPerClientMax);
  /** When each stream was last used (the table's request counter). */
  readonly usedAt = new Float64Array(streamsPerClientMax);
}

export class StreamTable {
  private readonly clients = new Map<number, ClientStreams>();
  private requests = 0;
  /** The client of the last request, and its streams (the Map's entry for it, or undefined). */
  private lastClient = -1;
  private lastStreams: ClientStreams | undefined;

  /**
   * Notes a request of `lengthBytes` at `offsetBytes` from `client` and returns the length of
   * the sequential run it belongs to, itself included.
   */
  note(client: number, offsetBytes: number, lengthBytes: number): number {
    // Most requests come from the client of the request before (one busy connection): its
    // streams are kept at hand, which saves the Map lookup on the read-hit path.
    let streams = client === this.lastClient ? this.lastStreams : this.clients.get(client);
    if (streams === undefined) {
      if (this.clients.size >= streamClientsMax) {
        const oldest = this.clients.keys().next();
        // (If that is the last request's client, the new one replaces it as such just below.)
        if (oldest.done !== true) this.clients.delete(oldest.value);
      }
      streams = new ClientStreams();
      this.clients.set(client, streams);
    }
    this.lastClient = client;
    this.lastStreams = streams;
    const now = ++this.requests;
    const { ends, runBytes, usedAt } = streams;
    let victim = 0;
    for (let slot = 0; slot < streamsPerClientMax; slot++) {
      if (ends[slot] === offsetBytes) {
        const run = (runBytes[slot] ?? 0) + lengthBytes;
        ends[slot] = offsetBytes + lengthBytes;
        runBytes[slot] = run;
        usedAt[slot] = now;
        return run;
      }
      if ((usedAt[slot] ?? 0) < (usedAt[victim] ?? 0)) victim = slot;
    }
    ends[victim] = offsetBytes + lengthBytes;
    runBytes[victim] = lengthBytes;
    usedAt[victim] = now;
    return lengthBytes;
  }

  /** Clients remembered (tests: the table stays bounded). */
  get clientCount(): number {
    return this.clients.size;
  }
}
