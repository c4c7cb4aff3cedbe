// HTTP on a control socket (a Unix socket speaking HTTP/1.1 + JSON): one request on its own
// connection, the error body's documented shape, and raw bytes on one connection (pipelined or
// broken requests) with the answers parsed as they come back.

import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';

export interface HttpAnswer {
  readonly status: number;
  readonly headers: Readonly<Record<string, string>>;
  /** The body parsed as JSON (undefined when empty). */
  readonly json: unknown;
}

/** One HTTP request to a control socket, on its own connection. */
export function httpRequest(socketPath: string, method: string, urlPath: string, body?: string): Promise<HttpAnswer> {
  return new Promise((resolve, reject) => {
    const request = http.request({ socketPath, method, path: urlPath, agent: false }, (response) => {
      let text = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => { text += chunk; });
      response.on('end', () => {
        const headers = Object.fromEntries(Object.entries(response.headers).map(([name, value]) => [name, String(value)]));
        resolve({ status: response.statusCode ?? 0, headers, json: text === '' ? undefined : JSON.parse(text) as unknown });
      });
    });
    request.on('error', reject);
    request.end(body);
  });
}

/** The `error` of a failure answer, checked to have the documented shape. */
export function errorOf(answer: HttpAnswer): { code: string; message: string } {
  const error = (answer.json as { error?: { code?: unknown; message?: unknown } } | undefined)?.error;
  assert.equal(typeof error?.code, 'string', `an error body: ${JSON.stringify(answer.json)}`);
  assert.equal(typeof error?.message, 'string');
  return error as { code: string; message: string };
}

/**
 * Sends raw bytes on one connection (pipelined requests, broken ones) and parses the HTTP
 * answers that come back until `count` have arrived or the server closes the connection.
 */
export function httpExchange(socketPath: string, payload: string | Buffer, count: number, timeoutMs = 30_000): Promise<{ answers: HttpAnswer[]; closed: boolean }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    let buffered = Buffer.alloc(0);
    const answers: HttpAnswer[] = [];
    const timer = setTimeout(() => { socket.destroy(); reject(new Error(`no ${count} answers from ${socketPath}: ${buffered.toString()}`)); }, timeoutMs);
    const done = (closed: boolean): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve({ answers, closed });
    };
    socket.on('connect', () => { socket.write(payload); });
    socket.on('error', () => undefined);
    socket.on('close', () => { done(true); });
    socket.on('data', (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      for (;;) {
        const end = buffered.indexOf('\r\n\r\n');
        if (end < 0) break;
        const [statusLine = '', ...lines] = buffered.subarray(0, end).toString('latin1').split('\r\n');
        const headers = Object.fromEntries(lines.map((line) => [line.slice(0, line.indexOf(':')).toLowerCase(), line.slice(line.indexOf(':') + 1).trim()]));
        const length = Number(headers['content-length'] ?? 0);
        if (buffered.length < end + 4 + length) break;
        const text = buffered.subarray(end + 4, end + 4 + length).toString('utf8');
        buffered = buffered.subarray(end + 4 + length);
        answers.push({ status: Number(statusLine.split(' ')[1]), headers, json: text === '' ? undefined : JSON.parse(text) as unknown });
      }
      if (answers.length >= count) done(false);
    });
  });
}
