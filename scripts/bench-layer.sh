#!/usr/bin/env bash
# Measures a lazily mounted layer as `lazysnap mount` serves it, over loopback:
#   - daemon RSS with one layer of N entries mounted (default 100k) and per 100k entries,
#   - cold read latency of a 1 MiB file and of a 4 KiB file (nothing cached, no prefetch),
#   - warm (chunk-cached) sequential read throughput of a 256 MiB file vs the same bytes on disk.
# Uses a registry on 127.0.0.1 and a release build. Run as root: sudo scripts/bench-layer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
[[ $(id -u) -eq 0 ]] || { echo "bench-layer.sh: run as root (FUSE mounts)" >&2; exit 1; }
bash scripts/install-deps.sh >/dev/null

entries=${ENTRIES:-100000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --quiet --release --bin lazysnap
lazysnap="$CARGO_TARGET_DIR/release/lazysnap"

work=$(mktemp -d /tmp/lazysnap-bench-layer.XXXXXX)
registry_pid=""
cleanup() {
    "$lazysnap" umount --state-dir "$work/state" "$work/mnt" >/dev/null 2>&1 || true
    [[ -n "$registry_pid" ]] && kill "$registry_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/registry
  redirect:
    disable: true
http:
  addr: 127.0.0.1:$port
YAML
/usr/bin/docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

echo "== generating a layer: $entries small files, a 1 MiB, a 4 KiB and a 256 MiB file"
python3 - "$work/oci" "$entries" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(f"{out}/blobs/sha256")
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{out}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d, len(data)
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
    def add(name, data):
        info = tarfile.TarInfo(name); info.size = len(data); info.mtime = 1700000000
        t.addfile(info, io.BytesIO(data))
    for i in range(n):
        add(f"many/d{i // 1000:03d}/f{i:06d}", b"x%d\n" % i)
    add("read/one-mib.bin", os.urandom(1 << 20))
    add("read/four-kib.txt", b"k" * 4096)
    add("read/big.bin", os.urandom(256 << 20))
tar = buf.getvalue()
diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
layer, size = blob(gzip.compress(tar, 1))
config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
cd, cs = blob(config)
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": size}]}).encode()
md, ms = blob(manifest)
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}, open(f"{out}/index.json", "w"))
open(f"{out}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY

image="127.0.0.1:$port/bench/layer:esgz"
echo "== converting with lazysnap convert"
"$lazysnap" convert "oci:$work/oci:latest" "$image" 2>/dev/null

mkdir -p "$work/mnt"
"$lazysnap" mount --no-prefetch --cache-dir "$work/cache" --state-dir "$work/state" "$image" "$work/mnt" 2>/dev/null
pid=$("$lazysnap" status --json --state-dir "$work/state" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["pid"])')
rss_kib=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)

time_read() { python3 - "$1" <<'PY'
import sys, time
t = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    while f.read(1 << 20):
        pass
print(f"{(time.perf_counter() - t) * 1000:.2f}")
PY
}
cold_1m=$(time_read "$work/mnt/read/one-mib.bin")
cold_4k=$(time_read "$work/mnt/read/four-kib.txt")
ls -R "$work/mnt/many" >/dev/null
rss_walked_kib=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)

# Warm read: fetch the big file once (into the chunk cache), drop the page cache, read again.
time_read "$work/mnt/read/big.bin" >/dev/null
cp "$work/mnt/read/big.bin" "$work/big-local.bin"
sync; echo 3 >/proc/sys/vm/drop_caches
warm_ms=$(time_read "$work/mnt/read/big.bin")
sync; echo 3 >/proc/sys/vm/drop_caches
local_ms=$(time_read "$work/big-local.bin")

python3 - "$entries" "$rss_kib" "$rss_walked_kib" "$cold_1m" "$cold_4k" "$warm_ms" "$local_ms" <<'PY'
import sys
n, rss, walked, c1m, c4k, warm, local = sys.argv[1:]
n = int(n); rss = int(rss); walked = int(walked)
print(f"entries in the layer           {n}")
print(f"daemon RSS, mounted            {rss / 1024:.1f} MiB ({rss / 1024 / n * 100000:.1f} MiB per 100k entries)")
print(f"daemon RSS, after ls -R        {walked / 1024:.1f} MiB")
print(f"cold read 1 MiB file           {float(c1m):.2f} ms")
print(f"cold read 4 KiB file           {float(c4k):.2f} ms")
mb = 256
print(f"warm read 256 MiB (cached)     {mb / (float(warm) / 1000):.0f} MiB/s")
print(f"same file on local disk        {mb / (float(local) / 1000):.0f} MiB/s  (ratio {float(local) / float(warm):.2f})")
PY
