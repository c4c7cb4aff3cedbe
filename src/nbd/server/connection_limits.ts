// What every connection of a server runs under: the limits that bound one connection's
// memory and time, and the counters all connections of one server add to. The server fills
// both (server.ts: defaultNbdLimits, NbdServer.counters); connection.ts obeys and counts.

export interface ConnectionLimits {
  /** A client that has not entered transmission within this time is disconnected. */
  readonly handshakeTimeoutMs: number;
  /** Requests being served by the Export at once, per connection. */
  readonly inFlightRequestsMax: number;
  /** READ buffers and WRITE payloads held for in-flight requests, per connection. */
  readonly inFlightBytesMax: number;
  /** Reply bytes waiting for the client to read them before reading pauses. */
  readonly replyBacklogBytesMax: number;
  /** After our side ends, how long the client gets to close before the socket is destroyed. */
  readonly closeGraceMs: number;
}

/** Counters shared by all connections of one server. */
export interface NbdCounters {
  connectionsTotal: number;
  requestsTotal: number;
  requestErrorsTotal: number;
  replyBatchesTotal: number;
  readPausesTotal: number;
  protocolViolationsTotal: number;
  /** TLS sessions started (STARTTLS and a successful TLS handshake). */
  tlsSessionsTotal: number;
  /** TLS handshakes that failed: bad credentials, garbage, a client that hung up. */
  tlsFailuresTotal: number;
}
