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

mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs" "$dir/root"
echo "deb http://deb.debian.org/debian unstable main" >"$dir/sources.list"
apt_private=(
    -o "APT::Sandbox::User=root"
    -o "Dir::Etc::sourcelist=$dir/sources.list"
    -o "Dir::Etc::sourceparts=/dev/null"
    -o "Dir::State::lists=$dir/lists"
    -o "Dir::Cache=$dir/cache"
)
echo "get-soci: reading Debian unstable's package lists into $dir/lists" >&2
apt-get "${apt_private[@]}" update -qq >&2
(cd "$dir/debs" && apt-get "${apt_private[@]}" download soci-snapshotter >&2)
deb=$(ls -1 "$dir"/debs/soci-snapshotter_*.deb | tail -n1)
dpkg-deb -x "$deb" "$dir/root"
for program in soci soci-snapshotter-grpc; do
    [[ -x $dir/root/usr/bin/$program ]] || {
        echo "get-soci: $deb has no usr/bin/$program" >&2
        exit 1
    }
done
echo "$daemon"
