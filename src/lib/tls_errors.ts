// What a TLS error says, for messages and log lines: node gives an OpenSSL error its `reason`
// ("wrong version number", "binder does not verify"), while its message carries OpenSSL's
// codes, source file and line. Shared by the NBD server and client (src/nbd/*/tls.ts).

/** The human part of a TLS error: OpenSSL's reason when there is one, else the message. */
export function tlsErrorReason(error: unknown): string {
  const reason = (error as { reason?: unknown } | null | undefined)?.reason;
  if (typeof reason === 'string' && reason !== '') return reason;
  return error instanceof Error ? error.message.trim() : String(error);
}
