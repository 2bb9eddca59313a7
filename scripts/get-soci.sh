#!/usr/bin/env bash
# Fetches the SOCI snapshotter (Debian's soci-snapshotter package, unstable suite only) without
# touching the system's packages: `apt-get download` with a private sources list and state, then
# `dpkg-deb -x` into DIR. Prints the path of soci-snapshotter-grpc (the `soci` CLI is beside it).
#
# Usage: scripts/get-soci.sh [DIR]      (default /var/cache/lazysnap-bench/soci; idempotent)
set -euo pipefail

dir=${1:-/var/cache/lazysnap-bench/soci}
daemon="$dir/root/usr/bin/soci-snapshotter-grpc"
if [[ -x $daemon && -x $dir/root/usr/bin/soci ]]; then
    echo "$daemon"
    exit 0
fi

bash "$(dirname "$0")/debian-download.sh" unstable soci-snapshotter "$dir"
for program in soci soci-snapshotter-grpc; do
    [[ -x $dir/root/usr/bin/$program ]] || {
        echo "get-soci: the soci-snapshotter package has no usr/bin/$program" >&2
        exit 1
    }
done
echo "$daemon"
