#!/usr/bin/env bash
# The real-image startup benchmark behind the README's tables: python3 from Debian 12's packages
# (built once with debootstrap into the cache directory), both workloads, against containerd's
# overlayfs, stargz-snapshotter's daemon (built from Debian 12 packages by
# scripts/get-stargz.sh) and the SOCI snapshotter (scripts/get-soci.sh), unoptimized and
# optimized (`lazysnap optimize` for lazysnap-opt, `ctr-remote image optimize` for stargz-opt, also
# for the other workload), on the edge link (10 Mbit/s, 100 ms), a data-center link
# (100 Mbit/s, 20 ms) and loopback.
#
# Usage: sudo scripts/bench-python3.sh [OUT_DIR]      (default bench-python3; about 70 minutes with SOCI, estimated)
# Environment: RUNS (default 3), CACHE_DIR (default /var/cache/lazysnap-bench),
#              STARGZ_GRPC (a containerd-stargz-grpc binary; scripts/get-stargz.sh when unset),
#              SOCI_GRPC (a soci-snapshotter-grpc binary; scripts/get-soci.sh when unset),
#              STATE_DIR (default /dev/shm: state on tmpfs, as in the README's figures).
set -euo pipefail
script=bench-python3.sh
out=${1:-bench-python3}
source "$(dirname "$0")/bench-peers.sh"

all=overlayfs,lazysnap,lazysnap-nobg,stargz,soci
bench edge-app --image python3-app --link 10mbit:100ms --modes "$all"
bench edge-print --image python3-print --link 10mbit:100ms --modes "$all"
opt=lazysnap,lazysnap-opt,stargz,stargz-opt
bench edge-app-opt --image python3-app --link 10mbit:100ms --optimized --modes "$opt"
bench edge-print-opt --image python3-print --link 10mbit:100ms --optimized --modes "$opt"
bench edge-print-opt-for-app --image python3-print --link 10mbit:100ms --optimized --optimized-for python3-app --modes lazysnap-opt,stargz-opt
bench fast-app-opt --image python3-app --link unlimited --link 100mbit:20ms --optimized --modes lazysnap-opt,stargz-opt
bench fast-print-opt --image python3-print --link unlimited --link 100mbit:20ms --optimized --modes lazysnap-opt,stargz-opt
bench fast-app --image python3-app --link unlimited --link 100mbit:20ms --modes overlayfs,lazysnap,stargz,soci
bench fast-print --image python3-print --link unlimited --link 100mbit:20ms --modes overlayfs,lazysnap,stargz,soci
echo "== tables: $out/*/table.txt" >&2
