#!/usr/bin/env bash
# Downloads PACKAGE from Debian's SUITE and extracts it into DIR/root, without touching the
# system's packages: `apt-get download` with a private sources list, package lists and cache
# under DIR, then `dpkg-deb -x` (never `dpkg -i` a package of another suite).
#
# Usage: scripts/debian-download.sh SUITE PACKAGE DIR
set -euo pipefail

suite=${1:?usage: scripts/debian-download.sh SUITE PACKAGE DIR}
package=${2:?usage: scripts/debian-download.sh SUITE PACKAGE DIR}
dir=${3:?usage: scripts/debian-download.sh SUITE PACKAGE DIR}

mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs" "$dir/root"
echo "deb http://deb.debian.org/debian $suite main" >"$dir/sources.list"
apt_private=(
    -o "APT::Sandbox::User=root"
    -o "Dir::Etc::sourcelist=$dir/sources.list"
    -o "Dir::Etc::sourceparts=/dev/null"
    -o "Dir::State::lists=$dir/lists"
    -o "Dir::Cache=$dir/cache"
)
echo "debian-download: reading Debian $suite's package lists into $dir/lists" >&2
apt-get "${apt_private[@]}" update -qq >&2
(cd "$dir/debs" && apt-get "${apt_private[@]}" download "$package" >&2)
deb=$(ls -1 "$dir"/debs/"${package}"_*.deb | tail -n1)
dpkg-deb -x "$deb" "$dir/root"
