#!/bin/bash
# Two builds side by side on read hits, for paired A/B.
#
# Usage: scripts/ab_read_hits.sh TREE_A TREE_B [PAIRS]
#   TREE_x: a built checkout (its dist/src/cli/main.js is run). WORKLOADS (optional, spaces
#   between): rw:bs:depth each, default "read:1m:4 read:1m:8 randread:4k:1 randread:4k:32
#   randread:64k:32".
# What it does: starts both servers at once, each with a new 1 GiB cache file (sparse,
# formatted by `serve --cache-size`) in front of its own sparse 512 MiB file, on /dev/shm; lays
# 256 MiB down through each with 1 MiB sequential writes and drains it, so every read below is a
# hit; then per workload PAIRS (default 4) pairs of fio runs (nbd engine, 5 s after 1 s of
# ramp), A and B back to back in an order that alternates. Prints each run's IOPS and per pair
# B/A. Compare medians of the pair ratios, and calibrate with an A/A run (the same tree twice):
# on a shared 2-CPU VM one of two identical servers can be faster by 5-10% for a workload.
set -u
treeA=$1; treeB=$2; pairs=${3:-4}
D=$(mktemp -d /dev/shm/pcache-abread.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait; rm -rf "$D"' EXIT
for x in a b; do
  tree=$treeA; [ $x = b ] && tree=$treeB
  truncate -s 512M "$D/back-$x.img"
  node "$tree/dist/src/cli/main.js" serve --cache "$D/cache-$x.img" --cache-size 1G --backing "$D/back-$x.img" --socket "$D/$x.sock" \
    --control "$D/$x.ctl" --tuning sequential_cutoff_bytes=0 --log-level warn > "$D/serve-$x.out" 2>&1 &
  pids+=($!)
done
for x in a b; do
  for _ in $(seq 100); do grep -q '^serving' "$D/serve-$x.out" 2>/dev/null && break; sleep 0.1; done
  fio --name=lay --ioengine=nbd --uri="nbd+unix:///?socket=$D/$x.sock" --rw=write --bs=1m --iodepth=8 --size=256M --thread --output-format=terse > /dev/null
  node "$treeA/dist/src/cli/main.js" drain --control "$D/$x.ctl" > /dev/null
done
run() { # socket rw bs depth -> IOPS
  fio --name=r --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw="$2" --bs="$3" --iodepth="$4" --size=256M --thread \
    --time_based --runtime=5s --ramp_time=1s --output-format=json 2>/dev/null |
    node -e "let s='';process.stdin.on('data',d=>s+=d).on('end',()=>console.log(Math.round(JSON.parse(s.slice(s.indexOf('{'))).jobs[0].read.iops)))"
}
for workload in ${WORKLOADS:-read:1m:4 read:1m:8 randread:4k:1 randread:4k:32 randread:64k:32}; do
  IFS=: read -r rw bs depth <<< "$workload"
  line="$workload:"
  for pair in $(seq "$pairs"); do
    if [ $((pair % 2)) = 1 ]; then a=$(run "$D/a.sock" "$rw" "$bs" "$depth"); b=$(run "$D/b.sock" "$rw" "$bs" "$depth")
    else b=$(run "$D/b.sock" "$rw" "$bs" "$depth"); a=$(run "$D/a.sock" "$rw" "$bs" "$depth"); fi
    line="$line a $a b $b ($(node -e "console.log(($b / $a).toFixed(2))"))"
  done
  echo "$line"
done
