#!/usr/bin/env bash
# Convert throughput, lazysnap build_layer vs `ctr-remote image convert --estargz`, on the same
# uncompressed layer, same gzip level, same machine, in one run (issue 2 §8).
#   WORK     scratch dir (default /tmp/lazysnap-convert-bench); LEVEL gzip level (default 9)
# Starts its own containerd (socket and root under WORK), imports a one-layer OCI image whose
# layer is the benchmark tar (uncompressed, so ctr-remote does not pay for decompression), times
# the conversion, then runs the criterion bench on the same tar. Stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${WORK:-/tmp/lazysnap-convert-bench}"
level="${LEVEL:-9}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
rm -rf "$work"
mkdir -p "$work"/{oci/blobs/sha256,root,state}

# 1. the input tar: the bench's generated ~64 MB mixed tar (a quick bench run writes it)
ESTARGZ_BENCH_WRITE_TAR="$work/layer.tar" cargo bench --bench estargz_build -- --test gzip-9 >/dev/null
size=$(stat -c %s "$work/layer.tar")

# 2. a one-layer OCI archive
python3 - "$work" <<'PY'
import hashlib, json, os, sys, tarfile
work = sys.argv[1]
blobs = os.path.join(work, "oci/blobs/sha256")
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(os.path.join(blobs, d), "wb").write(data)
    return "sha256:" + d, len(data)
layer = open(os.path.join(work, "layer.tar"), "rb").read()
ld, ls = put(layer)
config = json.dumps({"architecture": "amd64", "os": "linux",
    "rootfs": {"type": "layers", "diff_ids": [ld]}, "config": {}}).encode()
cd, cs = put(config)
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]}).encode()
md, ms = put(manifest)
index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "bench.local/input:latest"}}]}
open(os.path.join(work, "oci/index.json"), "w").write(json.dumps(index))
open(os.path.join(work, "oci/oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
with tarfile.open(os.path.join(work, "image.tar"), "w") as t:
    for name in ["oci-layout", "index.json", "blobs"]:
        t.add(os.path.join(work, "oci", name), arcname=name)
PY

# 3. containerd of our own
cat > "$work/config.toml" <<TOML
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.sock.ttrpc"
TOML
containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
cpid=$!
trap 'kill $cpid 2>/dev/null; wait $cpid 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$work/containerd.sock" ] && break; sleep 0.2; done
ctr -a "$work/containerd.sock" images import --no-unpack "$work/image.tar" >/dev/null

# 4. ctr-remote, timed
start=$(date +%s.%N)
ctr-remote -a "$work/containerd.sock" image convert --estargz --oci \
    --estargz-compression-level "$level" bench.local/input:latest bench.local/output:esgz >/dev/null
end=$(date +%s.%N)
ctr_secs=$(echo "$end - $start" | bc -l)
ctr_mbs=$(echo "$size / 1000000 / $ctr_secs" | bc -l)
printf 'ctr-remote image convert --estargz (level %s): %d bytes in %.2f s = %.1f MB/s\n' \
    "$level" "$size" "$ctr_secs" "$ctr_mbs"

# 5. lazysnap build_layer on the same tar (criterion, MB/s = MB of uncompressed input per second)
ESTARGZ_BENCH_TAR="$work/layer.tar" cargo bench --bench estargz_build -- "gzip-$level" 2>&1 |
    grep -E "time:|thrpt:" || true
