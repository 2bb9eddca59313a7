#!/usr/bin/env bash
# The demo: on this machine, on 127.0.0.1 only, start a Distribution registry, lazysnap (the
# containerd proxy snapshotter) and containerd; build a sample image (busybox + a 40 MB app
# layer), convert it to eStargz with `lazysnap convert`, pull it lazily with `lazysnap pull` and
# run it with `ctr run`; then do the same with containerd's default overlayfs pull and print both
# startup latencies side by side, on a fast and on an emulated 20 Mbit/s, 50 ms link.
# Installs what it needs (Debian packages) and cleans up everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"

if [[ $(id -u) -ne 0 ]]; then
    echo "demo.sh: run as root (sudo $0): it installs packages, starts containerd and mounts FUSE" >&2
    exit 1
fi
bash scripts/install-deps.sh

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
echo "== building lazysnap (release; the first build takes several minutes)"
cargo build --quiet --release --bin lazysnap
exec "$CARGO_TARGET_DIR/release/lazysnap" bench --demo "$@"
