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

mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs" "$dir/root"
echo "deb http://deb.debian.org/debian $suite main" >"$dir/sources.list"
apt_private=(
    -o "APT::Sandbox::User=root"
    -o "Dir::Etc::sourcelist=$dir/sources.list"
    -o "Dir::Etc::sourceparts=/dev/null"
    -o "Dir::State::lists=$dir/lists"
    -o "Dir::Cache=$dir/cache"
)
echo "get-containerd: reading Debian $suite's package lists into $dir/lists" >&2
apt-get "${apt_private[@]}" update -qq >&2
(cd "$dir/debs" && apt-get "${apt_private[@]}" download containerd >&2)
deb=$(ls -1 "$dir"/debs/containerd_*.deb | tail -n1)
dpkg-deb -x "$deb" "$dir/root"
for program in containerd containerd-shim-runc-v2 ctr; do
    [[ -x $bin/$program ]] || {
        echo "get-containerd: $deb has no usr/bin/$program" >&2
        exit 1
    }
done
echo "$bin"
