#!/usr/bin/env bash
# The HelloBench-style set beside python3: node, gcc and a Java runtime from Debian 12's packages
# (built once with debootstrap into the cache directory), each against containerd's overlayfs,
# stargz-snapshotter's daemon and the SOCI snapshotter, unoptimized and optimized, on the edge
# link (10 Mbit/s, 100 ms) and loopback. scripts/bench-python3.sh has the python3 tables.
#
# Usage: sudo scripts/bench-images.sh [OUT_DIR]      (default bench-images)
# Environment: RUNS (default 3), CACHE_DIR, STARGZ_GRPC, SOCI_GRPC, STATE_DIR as for
#              scripts/bench-python3.sh.
set -euo pipefail
script=bench-images.sh
out=${1:-bench-images}
source "$(dirname "$0")/bench-peers.sh"

for image in node-app gcc-hello java-hello; do
    bench "$image" --image "$image" --link edge --link lan --optimized \
        --modes overlayfs,lazysnap,lazysnap-opt,stargz,stargz-opt,soci
done
echo "== tables: $out/*/table.txt" >&2
