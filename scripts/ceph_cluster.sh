#!/usr/bin/env bash
# A throw-away single-node Ceph cluster, for trying pcache in front of Ceph RBD on one machine
# and for the tests that do (test/helpers/ceph.ts). Everything lives in one directory; every
# process is started with a pid file there and stopped by that PID, never by name.
#
#   scripts/ceph_cluster.sh start DIR [IMAGE:SIZE ...]   cluster + pool "rbd" + images, each served
#                                                       by qemu-nbd on DIR/IMAGE.sock (default img:64M)
#   scripts/ceph_cluster.sh stop DIR                    stop everything started in DIR (DIR stays)
#   scripts/ceph_cluster.sh osd-stop DIR | osd-start DIR   stop (SIGTERM) / start the one OSD
#                                                       (needs CEPH_OSD_STORE=bluestore at start)
#   scripts/ceph_cluster.sh nbd-stop DIR IMAGE | nbd-start DIR IMAGE [--cache=MODE]
#
# After start, DIR/ceph.conf is the cluster's configuration: `ceph -c DIR/ceph.conf -s`,
# `rbd -c DIR/ceph.conf ls rbd`, and the NBD URI of an image is nbd+unix:///?socket=DIR/IMAGE.sock.
#
# The cluster (Ceph 16 from Debian: ceph-mon ceph-osd ceph-common, qemu-nbd with the rbd driver
# of qemu-block-extra): one monitor on 127.0.0.1 at a free port, one OSD (memstore, or bluestore
# over a sparse file with CEPH_OSD_STORE=bluestore: see store_conf), no cephx, pool size 1, no manager (RBD I/O does not need one; commands
# served by a manager would hang, so every `ceph` call here has a timeout). `mon data avail
# crit = 0`: a monitor otherwise stops itself when the disk holding DIR is over 95 % full.
# Memory: about 35 MB per daemon at start, plus, on memstore, every byte written to an image
# (and every snapshot's copy) — keep images small.
# Clients give up on an OSD that does not answer after `rados osd op timeout` (5 s here), so an
# OSD that is down shows as I/O errors (which pcache's writeback retries) instead of a hang.
# qemu-nbd serves the raw image with --cache=none by default (every write reaches Ceph; librbd's
# own RAM cache would acknowledge writes before Ceph has them); nbd-start takes another mode.

set -euo pipefail

die() { echo "ceph_cluster.sh: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is not installed: apt-get install $2"; }

# Seconds any one ceph/rbd command may take (without a manager some would wait forever).
cephTimeout=30

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Stops the process in pid file $1 with SIGTERM, then SIGKILL after a grace period.
stop_pid() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$file"
}

free_port() {
  node -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})" 2>/dev/null ||
    python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}

ceph_cmd() { timeout "$cephTimeout" ceph -c "$dir/ceph.conf" "$@"; }
rbd_cmd() { timeout "$cephTimeout" rbd -c "$dir/ceph.conf" "$@"; }

osd_start() {
  pid_alive "$dir/osd.pid" && return 0
  ceph-osd -c "$dir/ceph.conf" -i 0 2>>"$dir/log/setup.log"
  # The OSD daemonizes; it is usable once the monitor sees it up.
  for _ in $(seq 1 300); do
    if ceph_cmd osd dump 2>/dev/null | grep -q '^osd\.0 up'; then return 0; fi
    sleep 0.1
  done
  die "the OSD did not come up (see $dir/log/osd.0.log)"
}

nbd_start() {
  local image=$1 cache=${2:---cache=none}
  pid_alive "$dir/nbd-$image.pid" && return 0
  rm -f "$dir/$image.sock"
  # --fork returns once the socket listens (and fails when the image cannot be opened).
  qemu-nbd --fork --pid-file="$dir/nbd-$image.pid" --persistent --shared=16 --socket="$dir/$image.sock" \
    --format=raw --export-name= "$cache" --discard=unmap "rbd:rbd/$image:conf=$dir/ceph.conf" \
    2>>"$dir/log/qemu-nbd-$image.log" || die "qemu-nbd could not serve rbd/$image (see $dir/log/qemu-nbd-$image.log)"
}

# The OSD's object store (CEPH_OSD_STORE): memstore keeps every object in the OSD's memory (fast;
# everything is lost when the OSD stops); bluestore keeps them in a sparse 4 GiB file DIR/osd/block
# (survives osd-stop/osd-start; slower: every write is a direct write and a sync on that file).
# bluestore's RAM cache (CEPH_BLUESTORE_CACHE): "small" (the default, for the tests) is a fixed
# 64 MiB, of which Ceph gives only 6 % (about 4 MiB) to object data, so most reads go to
# the file; "ceph" keeps Ceph's own default (the cache autotuned to osd_memory_target, 4 GiB),
# what a deployed OSD runs with — the benchmarks use it, so the peer is not slowed by our sizing.
store_conf() {
  case "$store" in
    memstore) printf '%s\n' 'osd objectstore = memstore' 'memstore device bytes = 4294967296' ;;
    bluestore) printf '%s\n' 'osd objectstore = bluestore' 'bluestore block create = true' 'bluestore block size = 4294967296' \
      'bluestore block db create = false' 'bluestore block wal create = false' 'bluestore fsck on mount = false'
      case "${CEPH_BLUESTORE_CACHE:-small}" in
        small) printf '%s\n' 'bluestore cache autotune = false' 'bluestore cache size = 67108864' ;;
        ceph) ;;
        *) die "CEPH_BLUESTORE_CACHE must be small or ceph, not $CEPH_BLUESTORE_CACHE" ;;
      esac ;;
    *) die "CEPH_OSD_STORE must be memstore or bluestore, not $store" ;;
  esac
}

start() {
  need ceph-mon ceph-mon; need ceph-osd ceph-osd; need ceph ceph-common; need rbd ceph-common
  need monmaptool ceph-mon; need qemu-nbd qemu-utils
  [ -f /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so ] || ls /usr/lib/*/qemu/block-rbd.so >/dev/null 2>&1 ||
    die "qemu-nbd has no rbd driver: apt-get install qemu-block-extra"
  [ -e "$dir/ceph.conf" ] && die "$dir already holds a cluster (stop it and use a fresh directory)"
  mkdir -p "$dir/mon" "$dir/osd" "$dir/log" "$dir/run"
  local fsid port
  fsid=$(cat /proc/sys/kernel/random/uuid)
  port=$(free_port)
  cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = 127.0.0.1:$port
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon data avail crit = 0
mon data avail warn = 0
run dir = $dir/run
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
rados osd op timeout = 5
rados mon op timeout = 5
[mon]
admin socket = $dir/run/\$name.asok
mon data = $dir/mon
mon cluster log file = $dir/log/cluster.log
[osd]
admin socket = $dir/run/\$name.asok
osd data = $dir/osd
$(store_conf)
osd max object name len = 256
osd max object namespace len = 64
[client]
rbd cache = false
EOF
  monmaptool --create --add a "127.0.0.1:$port" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" 2>>"$dir/log/setup.log"
  ceph-mon -c "$dir/ceph.conf" -i a 2>>"$dir/log/setup.log"
  ln -sf "$dir/run/mon.a.pid" "$dir/mon.pid"
  for _ in $(seq 1 300); do ceph_cmd mon stat >/dev/null 2>&1 && break; sleep 0.1; done
  ceph_cmd mon stat >/dev/null 2>&1 || die "the monitor did not answer (see $dir/log/mon.a.log)"
  local uuid
  uuid=$(cat /proc/sys/kernel/random/uuid)
  ceph_cmd osd new "$uuid" 0 >/dev/null
  ceph-osd -c "$dir/ceph.conf" -i 0 --mkfs --osd-uuid "$uuid" 2>>"$dir/log/setup.log"
  ln -sf "$dir/run/osd.0.pid" "$dir/osd.pid"
  osd_start
  ceph_cmd osd pool create rbd 8 8 >/dev/null 2>&1
  rbd_cmd pool init rbd
  [ $# -eq 0 ] && set -- img:64M
  local spec
  for spec in "$@"; do
    local image=${spec%%:*} size=${spec#*:}
    rbd_cmd create --size "$size" --image-feature layering,exclusive-lock "rbd/$image"
    nbd_start "$image"
  done
  echo "$dir"
}

stop() {
  local file
  for file in "$dir"/nbd-*.pid; do [ -e "$file" ] && stop_pid "$file"; done
  stop_pid "$dir/osd.pid"
  stop_pid "$dir/mon.pid"
  return 0
}

[ $# -ge 2 ] || die "usage: ceph_cluster.sh start|stop|osd-stop|osd-start|nbd-stop|nbd-start DIR [...]"
command=$1
store=${CEPH_OSD_STORE:-memstore}
dir=$(realpath -m "$2")
shift 2
case "$command" in
  start) mkdir -p "$dir"; start "$@" ;;
  stop) stop ;;
  osd-stop)
    grep -q '^osd objectstore = memstore' "$dir/ceph.conf" && die "a memstore OSD loses every object when it stops: start the cluster with CEPH_OSD_STORE=bluestore"
    stop_pid "$dir/osd.pid"; ln -sf "$dir/run/osd.0.pid" "$dir/osd.pid" ;;
  osd-start) osd_start ;;
  nbd-stop) [ $# -ge 1 ] || die "nbd-stop DIR IMAGE"; stop_pid "$dir/nbd-$1.pid" ;;
  nbd-start) [ $# -ge 1 ] || die "nbd-start DIR IMAGE [--cache=MODE]"; nbd_start "$@" ;;
  *) die "unknown command $command" ;;
esac
