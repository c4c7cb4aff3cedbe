#!/bin/bash
# Fragmented reads of data not yet written back, with the pieces read on the event loop
# (fragmented_thread_pieces 0) and on the cache device's thread (16), back to back in one
# server, at QD1 and QD8, with nbdkit's file plugin on the same backing file in each round.
#
# Usage: scripts/frag_thread_ab.sh [ROUNDS] (after `npm run build`)
# What it does: a 512 MiB backing file of random bytes on /dev/shm; `pcache serve` with a new
# 1 GiB sparse cache, writeback held back and rewrites off; 256 MiB laid down by 4 KiB random
# writes at QD32 (each block once); then per round and queue depth: fio 1 MiB sequential reads
# over the range for 5 s after 1 s of ramp, the two settings in an order that alternates by
# round, then nbdkit. Prints each run's reads per second, and at the end the server's read
# counters (how many reads went to the thread).
set -u
rounds=${1:-3}
tree=$(cd "$(dirname "$0")/.." && pwd)
D=$(mktemp -d /dev/shm/pcache-fragthr.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait; rm -rf "$D"' EXIT
node -e "const fs=require('fs');const c=require('crypto');const fd=fs.openSync('$D/back.img','w');const b=Buffer.alloc(1<<20);for(let i=0;i<512;i++){c.randomFillSync(b);fs.writeSync(fd,b,0,b.length,i*b.length)}"
run() {
  fio --name=r --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw=read --bs=1m --iodepth="$2" --size=256M --thread \
    --time_based --runtime=5s --ramp_time=1s --output-format=json 2>/dev/null |
    node -e "let s='';process.stdin.on('data',d=>s+=d).on('end',()=>console.log(Math.round(JSON.parse(s.slice(s.indexOf('{'))).jobs[0].read.iops)))"
}
nbdkit -U "$D/nbdkit.sock" -f --exit-with-parent file file="$D/back.img" & pids+=($!)
node "$tree/dist/src/cli/main.js" serve --cache "$D/cache.img" --cache-size 1G --backing "$D/back.img" --socket "$D/s.sock" --control "$D/c.ctl" \
  --tuning sequential_cutoff_bytes=0,writeback_idle_ms=3600000,writeback_max_age_ms=3600000,fragmented_rewrite_pieces=0 --log-level warn > "$D/serve.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q '^serving' "$D/serve.out" 2>/dev/null && [ -S "$D/nbdkit.sock" ] && break; sleep 0.1; done
fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$D/s.sock" --rw=randwrite --bs=4k --iodepth=32 --size=256M --thread --output-format=terse > /dev/null
for round in $(seq "$rounds"); do
  for qd in 1 8; do
    for t in 0 16; do
      [ $((round % 2)) = 0 ] && t=$((16 - t))
      node "$tree/dist/src/cli/main.js" set --control "$D/c.ctl" fragmented_thread_pieces $t > /dev/null
      echo "round $round QD$qd fragmented_thread_pieces=$t: $(run "$D/s.sock" $qd)"
    done
    echo "round $round QD$qd nbdkit: $(run "$D/nbdkit.sock" $qd)"
  done
done
node "$tree/dist/src/cli/main.js" status --control "$D/c.ctl" | grep '^reads'
