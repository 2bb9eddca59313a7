#!/usr/bin/env bash
# Fetches containerd of another Debian suite (trixie: 1.7, unstable: 2.x) without touching the
# system's packages: `apt-get download` with a private sources list and state, then `dpkg-deb -x`
# into DIR. Prints the directory holding its `containerd`, `containerd-shim-runc-v2` and `ctr`
# (the system's runc, Debian 12's, runs the containers: theirs needs a newer glibc).
#
# Usage: scripts/get-containerd.sh SUITE [DIR]
#        (default DIR /var/cache/lazysnap-bench/containerd-SUITE; idempotent)
set -euo pipefail

suite=${1:?usage: scripts/get-containerd.sh trixie|unstable [DIR]}
dir=${2:-/var/cache/lazysnap-bench/containerd-$suite}
bin="$dir/root/usr/bin"
if [[ -x $bin/containerd && -x $bin/containerd-shim-runc-v2 && -x $bin/ctr ]]; then
    echo "$bin"
    exit 0
fi

bash "$(dirname "$0")/debian-download.sh" "$suite" containerd "$dir"
for program in containerd containerd-shim-runc-v2 ctr; do
    [[ -x $bin/$program ]] || {
        echo "get-containerd: the $suite containerd package has no usr/bin/$program" >&2
        exit 1
    }
done
echo "$bin"
