#!/usr/bin/env bash
# Builds stargz-snapshotter's daemon, a peer the bench measures, from Debian 12's packages with
# ../shared/peers/stargz/build.sh (Debian ships the library and ctr-remote, not the daemon).
# Prints the path of containerd-stargz-grpc.
#
# Usage: scripts/get-stargz.sh [DIR]      (default /var/cache/lazysnap-bench/stargz; idempotent)
set -euo pipefail

dir=${1:-/var/cache/lazysnap-bench/stargz}
daemon="$dir/bin/containerd-stargz-grpc"
if [[ -x $daemon ]]; then
    echo "$daemon"
    exit 0
fi
build="$(cd "$(dirname "$0")/.." && pwd)/../shared/peers/stargz/build.sh"
if [[ ! -f $build ]]; then
    echo "get-stargz: $build not found: it comes with the project's shared directory beside the" \
        "clone; or build containerd-stargz-grpc elsewhere and pass it as --stargz-grpc" >&2
    exit 1
fi
echo "get-stargz: building containerd-stargz-grpc into $dir (golang-go from Debian 12)" >&2
bash "$build" "$dir" >&2
[[ -x $daemon ]] || {
    echo "get-stargz: $build did not produce $daemon" >&2
    exit 1
}
echo "$daemon"
