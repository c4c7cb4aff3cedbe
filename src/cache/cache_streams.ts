// Sequential streams, for the sequential cutoff (bcache's sequential_cutoff): which client
// requests continue a run of requests, each starting where the previous one of the run ended.
//
// Streams are kept per client (an opaque number the NBD server gives each connection; 0 for
// callers that give none), at most streamsPerClientMax per client, the least recently used
// replaced; at most streamClientsMax clients are remembered, the oldest forgotten first. So
// the table is bounded whatever the clients do, and a client interleaving a few sequential
// streams (a copy reading one file and writing another) keeps each of them.
// A request continues the first stream (in slot order) whose last request ended where it
// starts; otherwise it starts a new stream in the least recently used slot (unused slots first,
// lowest first).
// Cost per request (every read and write notes itself while the cutoff is on, so this is on the
// hot path): a scan of streamsPerClientMax numbers for the continued stream, and a few small
// array writes to keep the slots in use order (a ring of slot numbers, so the least recently
// used slot is known without a scan); a Map lookup when the client is not the last request's;
// no allocation except for a client seen for the first time.

export const streamsPerClientMax = 8;
export const streamClientsMax = 256;

class ClientStreams {
  /** Where each stream's last request ended (-1: slot unused). */
  readonly ends = new Float64Array(streamsPerClientMax).fill(-1);
  /** Bytes each stream has run so far. */
  readonly runBytes = new Float64Array(streamsPerClientMax);
  /**
   * The slots in use order, as a ring: `newer[slot]` is the slot used next after it, `older`
   * the one before; `oldest` the least recently used (the next to be replaced), and
   * `older[oldest]` the most recently used. Unused slots start the ring in slot order.
   */
  readonly newer = new Uint8Array(streamsPerClientMax);
  readonly older = new Uint8Array(streamsPerClientMax);
  oldest = 0;

  constructor() {
    for (let slot = 0; slot < streamsPerClientMax; slot++) {
      this.newer[slot] = (slot + 1) % streamsPerClientMax;
      this.older[slot] = (slot + streamsPerClientMax - 1) % streamsPerClientMax;
    }
  }

  /** Makes `slot` the most recently used. */
  touch(slot: number): void {
    const oldest = this.oldest;
    // The oldest slot becomes the newest by turning the ring one step.
    if (slot === oldest) {
      this.oldest = this.newer[slot] ?? 0;
      return;
    }
    const newer = this.newer;
    const older = this.older;
    const newest = older[oldest] ?? 0;
    if (slot === newest) return;
    const before = older[slot] ?? 0;
    const after = newer[slot] ?? 0;
    newer[before] = after;
    older[after] = before;
    newer[newest] = slot;
    older[slot] = newest;
    newer[slot] = oldest;
    older[oldest] = slot;
  }
}

export class StreamTable {
  private readonly clients = new Map<number, ClientStreams>();
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
    let streams = this.lastStreams;
    if (client !== this.lastClient || streams === undefined) streams = this.streamsOf(client);
    const ends = streams.ends;
    let slot = 0;
    while (slot < streamsPerClientMax && ends[slot] !== offsetBytes) slot++;
    let run = lengthBytes;
    if (slot < streamsPerClientMax) run += streams.runBytes[slot] ?? 0;
    else slot = streams.oldest;
    ends[slot] = offsetBytes + lengthBytes;
    streams.runBytes[slot] = run;
    streams.touch(slot);
    return run;
  }

  /** The streams of `client`, made the last request's (a new entry for a client not remembered). */
  private streamsOf(client: number): ClientStreams {
    let streams = this.clients.get(client);
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
    return streams;
  }

  /** Clients remembered (tests: the table stays bounded). */
  get clientCount(): number {
    return this.clients.size;
  }
}
