# Sourced by scripts/bench-python3.sh and scripts/bench-images.sh, not run: checks root, installs
# what the bench needs, gets the peers' daemons, builds lazysnap, and defines `bench NAME ARGS...`,
# which runs `lazysnap bench` against the peers into $out/NAME.
# Expects $script (the caller's name) and $out (its output directory); reads RUNS, CACHE_DIR,
# STARGZ_GRPC, SOCI_GRPC and STATE_DIR (see the callers).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"

if [[ $(id -u) -ne 0 ]]; then
    echo "$script: needs root (it starts containerd and runc and mounts FUSE): sudo $0" >&2
    exit 1
fi
bash scripts/install-deps.sh >/dev/null

runs=${RUNS:-3}
cache=${CACHE_DIR:-/var/cache/lazysnap-bench}
state=${STATE_DIR:-/dev/shm}/lazysnap-bench-state
mkdir -p "$out" "$cache" "$state"

stargz=${STARGZ_GRPC:-$(bash scripts/get-stargz.sh "$cache/stargz")}
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
