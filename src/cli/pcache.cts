#!/usr/bin/env node
// The `pcache` program's entry point (package.json "bin"): sizes libuv's thread pool, then
// loads the command line (main.ts), in this one process.
//
// The backing device's asynchronous I/O runs on libuv's thread pool, whose size libuv reads
// from UV_THREADPOOL_SIZE once, when the pool first starts. Loading an ES module reads files
// asynchronously and so starts the pool: an ES module is too late to set the variable. This
// file is CommonJS (compiled to pcache.cjs), which node runs before any asynchronous
// file-system work, so setting the variable here gives the pool threadPoolSize threads. A
// value the user set is kept.

/** libuv thread-pool size: asynchronous backing-device requests in flight at once. */
const threadPoolSize = 16;

process.env.UV_THREADPOOL_SIZE ??= String(threadPoolSize);

import('./main.js').catch((error: unknown) => {
  const detail = error instanceof Error ? error.stack ?? error.message : String(error);
  process.stderr.write(`pcache: internal error (a bug; please report it): cannot load the command line: ${detail}\n`);
  process.exitCode = 70;
});
