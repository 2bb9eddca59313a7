#!/usr/bin/env bash
# The real-image startup benchmark behind the README's tables: python3 from Debian 12's packages
# (built once with debootstrap into the cache directory), both workloads, against containerd's
# overlayfs, stargz-snapshotter's daemon (built from Debian 12 packages by
# ../shared/peers/stargz/build.sh) and the SOCI snapshotter (scripts/get-soci.sh), unoptimized and optimized (ctr-remote image optimize for
# lazysnap and stargz, lazysnap optimize for lazysnap-opt, also for the other workload), on the
# edge link (10 Mbit/s, 100 ms), a data-center link (100 Mbit/s, 20 ms) and loopback.
#
# Usage: sudo scripts/bench-python3.sh [OUT_DIR]      (default bench-python3; about 70 minutes with SOCI, estimated)
# Environment: RUNS (default 3), CACHE_DIR (default /var/cache/lazysnap-bench),
#              STARGZ_GRPC (a containerd-stargz-grpc binary; built when unset),
#              SOCI_GRPC (a soci-snapshotter-grpc binary; scripts/get-soci.sh when unset),
#              STATE_DIR (default /dev/shm: state on tmpfs, as in the README's figures).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"

if [[ $(id -u) -ne 0 ]]; then
    echo "bench-python3.sh: needs root (it starts containerd and runc and mounts FUSE): sudo $0 $*" >&2
    exit 1
fi
bash scripts/install-deps.sh >/dev/null

out=${1:-bench-python3}
runs=${RUNS:-3}
cache=${CACHE_DIR:-/var/cache/lazysnap-bench}
state=${STATE_DIR:-/dev/shm}/lazysnap-bench-state
mkdir -p "$out" "$cache" "$state"

stargz=${STARGZ_GRPC:-$cache/stargz/bin/containerd-stargz-grpc}
if [[ ! -x $stargz ]]; then
    peers=../shared/peers/stargz/build.sh
    [[ -f $peers ]] || { echo "bench-python3.sh: $peers not found; set STARGZ_GRPC" >&2; exit 1; }
    echo "== building stargz-snapshotter's daemon into $cache/stargz" >&2
    bash "$peers" "$cache/stargz" >&2
fi

soci=${SOCI_GRPC:-$(bash scripts/get-soci.sh "$cache/soci")}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
echo "== building lazysnap (release)" >&2
cargo build --quiet --release --bin lazysnap
lazysnap="$CARGO_TARGET_DIR/release/lazysnap"

bench() {
    local name=$1
    shift
    echo "== $name: lazysnap bench $*" >&2
    "$lazysnap" bench --cache-dir "$cache" --state-dir "$state" --stargz-grpc "$stargz" \
        --soci-grpc "$soci" --runs "$runs" --out "$out/$name" "$@"
}
all=overlayfs,lazysnap,lazysnap-nobg,stargz,soci
bench edge-app --image python3-app --link 10mbit:100ms --modes "$all"
bench edge-print --image python3-print --link 10mbit:100ms --modes "$all"
bench edge-app-opt --image python3-app --link 10mbit:100ms --optimized --modes lazysnap-opt,lazysnap,lazysnap-nobg,stargz
bench edge-print-opt --image python3-print --link 10mbit:100ms --optimized --modes lazysnap-opt,lazysnap,lazysnap-nobg,stargz
bench edge-print-opt-for-app --image python3-print --link 10mbit:100ms --optimized --optimized-for python3-app --modes lazysnap-opt,stargz
bench fast-app-opt --image python3-app --link unlimited --link 100mbit:20ms --optimized --modes lazysnap-opt,stargz
bench fast-print-opt --image python3-print --link unlimited --link 100mbit:20ms --optimized --modes lazysnap-opt,stargz
bench fast-app --image python3-app --link unlimited --link 100mbit:20ms --modes overlayfs,lazysnap,stargz,soci
bench fast-print --image python3-print --link unlimited --link 100mbit:20ms --modes overlayfs,lazysnap,stargz,soci
echo "== tables: $out/*/table.txt" >&2
