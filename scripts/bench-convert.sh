#!/usr/bin/env bash
# Convert throughput (MB/s of uncompressed layer input): `lazysnap convert` against
# `ctr-remote image convert --estargz`, same image, same gzip level, same machine, one run.
#
# The image has one ~200 MB layer of mixed data (Python stdlib and docs: many small text files;
# random and zero-filled files). Both tools read the source
# from local storage where possible: lazysnap from an OCI layout (and, second figure, from a
# registry on 127.0.0.1), ctr-remote from containerd's content store after `ctr images pull`.
# Usage: sudo scripts/bench-convert.sh [LEVEL]   (default level 9, ctr-remote's default)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
LEVEL=${1:-9}

if [[ $(id -u) -ne 0 ]]; then
    echo "bench-convert.sh: needs root (containerd): sudo $0" >&2
    exit 1
fi
bash scripts/install-deps.sh >/dev/null

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --quiet --release --bin lazysnap
LAZYSNAP="$CARGO_TARGET_DIR/release/lazysnap"

work=$(mktemp -d /var/tmp/lazysnap-bench.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- registry
port=$(free_port)
cat >"$work/registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
  redirect:
    disable: true
http:
  addr: 127.0.0.1:$port
log:
  level: warn
YAML
/usr/bin/docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
host="127.0.0.1:$port"

# --- containerd
mkdir -p "$work/containerd"
cat >"$work/containerd.toml" <<TOML
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd/containerd.sock"
[ttrpc]
  address = "$work/containerd/containerd.sock.ttrpc"
TOML
containerd --config "$work/containerd.toml" >"$work/containerd.log" 2>&1 &
pids+=($!)
sock="$work/containerd/containerd.sock"
for _ in $(seq 100); do
    [[ -S $sock ]] && curl -fs "http://$host/v2/" >/dev/null && break
    sleep 0.1
done
[[ -S $sock ]] || { cat "$work/containerd.log"; exit 1; }

# --- the image: one layer of mixed data (~200 MB uncompressed)
echo "== building a ~200 MB mixed-data layer"
rootfs="$work/rootfs"
mkdir -p "$rootfs/usr/lib" "$rootfs/usr/share" "$rootfs/data"
cp -a /usr/lib/python3.11 "$rootfs/usr/lib/" 2>/dev/null || true
cp -a /usr/share/doc "$rootfs/usr/share/" 2>/dev/null || true
head -c $((30 * 1024 * 1024)) /dev/urandom >"$rootfs/data/random.bin"
head -c $((10 * 1024 * 1024)) /dev/zero >"$rootfs/data/zeros.bin"
for i in $(seq 200); do head -c $((i * 97)) /dev/urandom >"$rootfs/data/small-$i"; done
tar --numeric-owner -C "$rootfs" -cf "$work/layer.tar" .
uncompressed=$(stat -c %s "$work/layer.tar")
gzip -1 -n -c "$work/layer.tar" >"$work/layer.tar.gz"
echo "layer: $((uncompressed / 1000000)) MB uncompressed, $(($(stat -c %s "$work/layer.tar.gz") / 1000000)) MB gzip -1"

layout="$work/src-oci"
mkdir -p "$layout/blobs/sha256"
arch=$(dpkg --print-architecture)
store() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); cp "$1" "$layout/blobs/sha256/$d"; echo "$d $(stat -c %s "$1")"; }
read -r layer_digest layer_size < <(store "$work/layer.tar.gz")
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
jq -cn --arg arch "$arch" --arg d "sha256:$diff_id" \
    '{architecture:$arch,os:"linux",config:{},rootfs:{type:"layers",diff_ids:[$d]}}' >"$work/config.json"
read -r config_digest config_size < <(store "$work/config.json")
jq -cn --arg cd "sha256:$config_digest" --argjson cs "$config_size" --arg ld "sha256:$layer_digest" --argjson ls "$layer_size" \
    '{schemaVersion:2,mediaType:"application/vnd.oci.image.manifest.v1+json",
      config:{mediaType:"application/vnd.oci.image.config.v1+json",digest:$cd,size:$cs},
      layers:[{mediaType:"application/vnd.oci.image.layer.v1.tar+gzip",digest:$ld,size:$ls}]}' >"$work/manifest.json"
read -r manifest_digest manifest_size < <(store "$work/manifest.json")
jq -cn --arg md "sha256:$manifest_digest" --argjson ms "$manifest_size" \
    '{schemaVersion:2,mediaType:"application/vnd.oci.image.index.v1+json",manifests:[{mediaType:"application/vnd.oci.image.manifest.v1+json",digest:$md,size:$ms,annotations:{"org.opencontainers.image.ref.name":"v1"}}]}' >"$layout/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

# push the source image to the registry with plain HTTP calls
push_blob() {
    local digest=$1 file=$2 location
    location=$(curl -fsS -X POST -D - -o /dev/null "http://$host/v2/bench/src/blobs/uploads/" | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
    [[ $location == /* ]] && location="http://$host$location"
    if [[ $location == *\?* ]]; then location="$location&digest=sha256:$digest"; else location="$location?digest=sha256:$digest"; fi
    curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$file" -o /dev/null "$location"
}
push_blob "$layer_digest" "$layout/blobs/sha256/$layer_digest"
push_blob "$config_digest" "$layout/blobs/sha256/$config_digest"
curl -fsS -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary "@$layout/blobs/sha256/$manifest_digest" -o /dev/null "http://$host/v2/bench/src/manifests/v1"

ctr_() { ctr --address "$sock" "$@"; }
ctr_ images pull --plain-http "$host/bench/src:v1" >/dev/null

seconds() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
now() { date +%s.%N; }
mbps() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1e6 / float(sys.argv[2]):.1f}')" "$uncompressed" "$1"; }

echo "== lazysnap convert oci -> oci (level $LEVEL)"
t0=$(now); "$LAZYSNAP" convert --level "$LEVEL" "oci:$layout:v1" "oci:$work/out-oci:esgz" >/dev/null; t1=$(now)
t_ls_local=$(seconds "$t0" "$t1")
echo "== lazysnap convert registry -> registry (level $LEVEL)"
t0=$(now); "$LAZYSNAP" convert --level "$LEVEL" "$host/bench/src:v1" "$host/bench/dst:esgz" >/dev/null; t1=$(now)
t_ls_reg=$(seconds "$t0" "$t1")
echo "== ctr-remote image convert --estargz --oci (level $LEVEL, content store -> content store)"
t0=$(now)
ctr-remote --address "$sock" images convert --estargz --oci --estargz-compression-level "$LEVEL" \
    "$host/bench/src:v1" "$host/bench/ctr-remote:esgz" >/dev/null
t1=$(now)
t_ctr=$(seconds "$t0" "$t1")

echo
printf '%-55s %8s %8s\n' "converter (one ${uncompressed} byte layer, gzip level $LEVEL)" "seconds" "MB/s"
printf '%-55s %8s %8s\n' "lazysnap convert oci layout -> oci layout" "$t_ls_local" "$(mbps "$t_ls_local")"
printf '%-55s %8s %8s\n' "lazysnap convert registry -> registry (loopback)" "$t_ls_reg" "$(mbps "$t_ls_reg")"
printf '%-55s %8s %8s\n' "ctr-remote images convert --estargz (content store)" "$t_ctr" "$(mbps "$t_ctr")"
echo "machine: $(nproc) cores, $(uname -r); temp files under $work"
