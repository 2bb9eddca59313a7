#!/usr/bin/env bash
# Startup-latency benchmark: builds lazysnap (release) and runs `lazysnap bench`, which starts a
# registry, link emulators, lazysnap and containerd on 127.0.0.1 and compares containerd's
# default overlayfs pull with a lazy pull through lazysnap (pull, create + run until ready).
#
# Usage: sudo scripts/bench.sh [lazysnap bench options]
#   default: --link unlimited --link 20mbit:50ms --link 10mbit:100ms --runs 3 --out bench-results
#   e.g.     sudo scripts/bench.sh --demo
#            sudo scripts/bench.sh --link 50mbit:20ms --runs 5 --layer-mb 100 --out /tmp/b
# Results: a table on stdout; results.json, startup.svg, startup.png, table.txt and table.md in the
# --out directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"

if [[ $(id -u) -ne 0 ]]; then
    echo "bench.sh: needs root (it starts containerd and runc and mounts FUSE): sudo $0 $*" >&2
    exit 1
fi
bash scripts/install-deps.sh >/dev/null

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
echo "== building lazysnap (release)" >&2
cargo build --quiet --release --bin lazysnap
LAZYSNAP="$CARGO_TARGET_DIR/release/lazysnap"

if [[ $# -eq 0 ]]; then
    set -- --link unlimited --link 20mbit:50ms --link 10mbit:100ms --runs 3 --out bench-results
fi
echo "== $LAZYSNAP bench $*" >&2
exec "$LAZYSNAP" bench "$@"
