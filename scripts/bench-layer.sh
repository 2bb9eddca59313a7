#!/usr/bin/env bash
# Measures a lazily mounted layer as `lazysnap mount` serves it, over loopback:
#   - daemon RSS with one layer of N entries mounted (default 100k) and per 100k entries,
#   - cold read latency of 1 MiB files (random bytes, and a program binary that compresses about
#     3x) and of 4 KiB files (nothing cached, no prefetch; READS files each). Each read is paired
#     with the one round trip it needs: a ranged GET by curl, just before it, of the compressed
#     bytes the daemon fetches for that file (from the TOC; on a kept-alive connection, as the
#     daemon's is). What the reads take beyond the GETs, at the median and the lower quartile, is
#     what lazysnap adds to the registry's own answer,
#   - sequential read of a BIG_MIB file (default 1024) once its chunks are cached, with FUSE
#     passthrough (the file assembled in the cache) and without (--no-passthrough), vs reading
#     that assembled file directly from local disk; the page cache is dropped before each timed
#     read, in ROUNDS interleaved rounds (default 5).
# Uses a registry on 127.0.0.1 and a release build. CHUNK_SIZE sets `lazysnap convert
# --chunk-size` (default 4 MiB). Run as root: sudo scripts/bench-layer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
[[ $(id -u) -eq 0 ]] || { echo "bench-layer.sh: run as root (FUSE mounts)" >&2; exit 1; }
bash scripts/install-deps.sh >/dev/null

entries=${ENTRIES:-100000}
big_mib=${BIG_MIB:-1024}
reads=${READS:-101}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --quiet --release --bin lazysnap
lazysnap="$CARGO_TARGET_DIR/release/lazysnap"

work=$(mktemp -d /tmp/lazysnap-bench-layer.XXXXXX)
registry_pid=""
cleanup() {
    for m in "$work/mnt" "$work/plain"; do
        "$lazysnap" umount --state-dir "$work/state" "$m" >/dev/null 2>&1 || true
    done
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

echo "== generating a layer: $entries small files, $reads files of 1 MiB and of 4 KiB, a $big_mib MiB file"
python3 - "$work/oci" "$entries" "$reads" "$big_mib" <<'PY'
import hashlib, io, json, os, sys, tarfile
out, n, reads, big_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
os.makedirs(f"{out}/blobs/sha256")
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{out}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d, len(data)
class Stream:
    # Random bytes generated as the tar writer reads them: the big file never sits in memory.
    def __init__(self, size): self.left = size
    def read(self, k):
        k = min(k, self.left); self.left -= k
        return os.urandom(k)
tar_path = f"{out}/layer.tar"
with tarfile.open(tar_path, mode="w", format=tarfile.PAX_FORMAT) as t:
    def add(name, size, data):
        info = tarfile.TarInfo(name); info.size = size; info.mtime = 1700000000
        t.addfile(info, data)
    for i in range(n):
        body = b"x%d\n" % i
        add(f"many/d{i // 1000:03d}/f{i:06d}", len(body), io.BytesIO(body))
    program = open("/usr/bin/docker-registry", "rb").read()
    for i in range(reads):
        add(f"read/one-mib-{i}.bin", 1 << 20, Stream(1 << 20))
        add(f"read/four-kib-{i}.txt", 4096, Stream(4096))
        at = i * (len(program) - (1 << 20)) // reads
        add(f"read/program-{i}.bin", 1 << 20, io.BytesIO(program[at:at + (1 << 20)]))
    add("read/big.bin", big_mib << 20, Stream(big_mib << 20))
h = hashlib.sha256()
with open(tar_path, "rb") as f:
    for piece in iter(lambda: f.read(1 << 20), b""):
        h.update(piece)
layer = "sha256:" + h.hexdigest()
size = os.path.getsize(tar_path)
os.rename(tar_path, f"{out}/blobs/sha256/{h.hexdigest()}")
config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer]}}).encode()
cd, cs = blob(config)
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": size}]}).encode()
md, ms = blob(manifest)
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}, open(f"{out}/index.json", "w"))
open(f"{out}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY

image="127.0.0.1:$port/bench/layer:esgz"
echo "== converting with lazysnap convert"
"$lazysnap" convert ${CHUNK_SIZE:+--chunk-size "$CHUNK_SIZE"} "oci:$work/oci:latest" "$image" 2>/dev/null
rm -rf "$work/oci"
read -r layer_blob layer_size < <(curl -fs -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:$port/v2/bench/layer/manifests/esgz" |
    python3 -c 'import json,sys; l = json.load(sys.stdin)["layers"][0]; print(l["digest"], l["size"])')

mkdir -p "$work/mnt" "$work/plain"
"$lazysnap" mount --no-prefetch --cache-dir "$work/cache" --state-dir "$work/state" "$image" "$work/mnt" 2>/dev/null
pid=$("$lazysnap" status --json --state-dir "$work/state" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["pid"])')
rss_kib=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)

# Prints the milliseconds each file took to open and read to its end.
time_reads() { python3 - "$@" <<'PY'
import sys, time
for path in sys.argv[1:]:
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    print(f"{(time.perf_counter() - t) * 1000:.3f}")
PY
}
median() { sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
# The layer's TOC, for the compressed byte range of each file.
"$lazysnap" inspect --toc "$image" 2>/dev/null | sed -n '/^{/,$p' >"$work/toc.json"
# For each file $1..: a ranged GET of the compressed bytes the daemon fetches for it (its chunks'
# gzip members, from the TOC), timed by curl on a kept-alive connection as the daemon's is, then a
# cold read of the file. Prints "read_ms registry_ms" a line.
cold_pairs() {
    python3 - "http://127.0.0.1:$port/v2/bench/layer/blobs/$layer_blob" "$work/toc.json" "$work/mnt" "$@" <<'PY'
import json, subprocess, sys, time
url, toc_path, root, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
entries = json.load(open(toc_path))["entries"]
# A member ends where the next one starts; the last ones end at the TOC's own member.
starts = sorted({e["offset"] for e in entries if e.get("offset")})
following = dict(zip(starts, starts[1:]))
ranges = {}
for e in entries:
    if e.get("offset") and e["type"] in ("reg", "chunk"):
        first, last = ranges.get(e["name"], (e["offset"], e["offset"]))
        ranges[e["name"]] = (min(first, e["offset"]), max(last, e["offset"]))
for path in paths:
    first, last = ranges[path[len(root) + 1:]]
    end = following[last]
    args = ["curl", "-fsS", "-o", "/dev/null", "-r", "0-4095", url,  # opens the connection
            "--next", "-o", "/dev/null", "-r", f"{first}-{end - 1}", "-w", "%{time_total}\\n", url]
    registry_ms = float(subprocess.run(args, check=True, capture_output=True, text=True).stdout) * 1000
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    print(f"{(time.perf_counter() - t) * 1000:.3f} {registry_ms:.3f}")
PY
}
# Of cold_pairs lines (ms): the median read, the median GET, and what the reads take beyond the
# GETs at the median and at the lower quartile (the registry's answer time varies from one request
# to the next by more than what lazysnap adds; its lower quartile is steadier).
pair_medians() {
    python3 -c '
import statistics, sys
rows = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
reads, gets = sorted(r for r, _ in rows), sorted(g for _, g in rows)
p25 = lambda v: v[len(v) // 4]
med = statistics.median
print(*(f"{v:.2f}" for v in (med(reads), med(gets), med(reads) - med(gets), p25(reads) - p25(gets))))'
}
files() { for i in $(seq 0 $((reads - 1))); do echo "$work/mnt/read/$1-$i.$2"; done; }
read -r cold_1m rtt_1m beyond_1m low_1m < <(cold_pairs $(files one-mib bin) | pair_medians)
read -r cold_code rtt_code beyond_code low_code < <(cold_pairs $(files program bin) | pair_medians)
read -r cold_4k rtt_4k beyond_4k low_4k < <(cold_pairs $(files four-kib txt) | pair_medians)
# The same 1 MiB files again, now in the page cache: what the reading process itself costs.
warm_1m=$(time_reads $(files one-mib bin) | median)
ls -R "$work/mnt/many" >/dev/null
rss_walked_kib=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)

big="read/big.bin"
cold_big_ms=$(time_reads "$work/mnt/$big")
# With every chunk cached, an open assembles the file in the cache; later opens pass through.
for _ in $(seq 600); do
    time_reads "$work/mnt/$big" >/dev/null
    assembled=$("$lazysnap" status --json --state-dir "$work/state" | python3 -c 'import json,sys; print(sum(l["files_assembled"] for s in json.load(sys.stdin) for l in s["layers"]))')
    [[ "$assembled" -ge 1 ]] && break
    sleep 0.5
done
# The same daemon and cache, mounted without passthrough: reads go through the daemon.
"$lazysnap" mount --no-prefetch --no-passthrough --cache-dir "$work/cache" --state-dir "$work/state" "$image" "$work/plain" 2>/dev/null
time_reads "$work/plain/$big" >/dev/null
# Local disk: the file the passthrough reads, in the cache directory (the same blocks of the same
# disk; a fresh copy would be read back from the host's cache, faster than anything else here).
local_file=$(python3 -c '
import json, sys
entry = next(e for e in json.load(open(sys.argv[1]))["entries"] if e["name"] == sys.argv[2] and e["type"] == "reg")
hex = entry["digest"].split(":")[1]
print(f"{sys.argv[3]}/chunks/sha256/{hex[:2]}/{hex}")' "$work/toc.json" "$big" "$work/cache")
[[ -f "$local_file" ]] || { echo "bench-layer.sh: the assembled file $local_file is missing" >&2; exit 1; }
# ROUNDS rounds (default 5) of: passthrough, through the daemon, local disk, each read after
# dropping the page cache. Ratios to local disk are taken within a round (the disk's own speed
# drifts from one round to the next) and reported at their median.
for _ in $(seq "${ROUNDS:-5}"); do
    for f in "$work/mnt/$big" "$work/plain/$big" "$local_file"; do
        sync; echo 3 >/proc/sys/vm/drop_caches
        time_reads "$f"
    done | paste -sd' '
done >"$work/cached.txt"
read -r passthrough_ms daemon_ms local_ms pass_ratio daemon_ratio < <(python3 -c '
import statistics, sys
rounds = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
med = lambda v: statistics.median(v)
print(*(med(r[i] for r in rounds) for i in range(3)),
      med(r[2] / r[0] for r in rounds), med(r[2] / r[1] for r in rounds))' "$work/cached.txt")

python3 - "$entries" "$rss_kib" "$rss_walked_kib" "$cold_1m" "$cold_4k" "$rtt_1m" "$rtt_4k" \
    "$big_mib" "$cold_big_ms" "$passthrough_ms" "$daemon_ms" "$local_ms" "$warm_1m" \
    "$beyond_1m" "$beyond_4k" "$cold_code" "$rtt_code" "$beyond_code" "$low_1m" "$low_4k" "$low_code" \
    "$pass_ratio" "$daemon_ratio" <<'PY'
import sys
n, rss, walked = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c1m, c4k, r1m, r4k = (float(v) for v in sys.argv[4:8])
mib = int(sys.argv[8])
cold_big, passthrough, daemon, local = (float(v) for v in sys.argv[9:13])
w1m, b1m, b4k, ccode, rcode, bcode, l1m, l4k, lcode = (float(v) for v in sys.argv[13:22])
pass_ratio, daemon_ratio = (float(v) for v in sys.argv[22:24])
rate = lambda ms: mib / (ms / 1000)
print(f"entries in the layer             {n}")
print(f"daemon RSS, mounted              {rss / 1024:.1f} MiB")
print(f"daemon RSS, after ls -R          {walked / 1024:.1f} MiB")
print("cold reads: median read; median ranged GET of the same compressed bytes from the registry; reads beyond GETs at the median / lower quartile")
print(f"  1 MiB of random bytes          {c1m:.2f} ms; registry {r1m:.2f} ms; beyond {b1m:.2f} / {l1m:.2f} ms")
print(f"  1 MiB of a program binary      {ccode:.2f} ms; registry {rcode:.2f} ms; beyond {bcode:.2f} / {lcode:.2f} ms")
print(f"  4 KiB                          {c4k:.2f} ms; registry {r4k:.2f} ms; beyond {b4k:.2f} / {l4k:.2f} ms")
print(f"same 1 MiB files, page-cached    {w1m:.2f} ms (the reading process's own cost)")
print(f"first read of {mib} MiB (fetch)   {rate(cold_big):.0f} MiB/s")
print(f"cached {mib} MiB, passthrough     {rate(passthrough):.0f} MiB/s ({pass_ratio:.2f}x local disk, median of rounds)")
print(f"cached {mib} MiB, through daemon  {rate(daemon):.0f} MiB/s ({daemon_ratio:.2f}x local disk, median of rounds)")
print(f"same file on local disk          {rate(local):.0f} MiB/s")
PY
echo "cached rounds, MiB/s (passthrough, through daemon, local disk):"
awk -v mib="$big_mib" '{printf "  %.0f %.0f %.0f\n", mib / ($1 / 1000), mib / ($2 / 1000), mib / ($3 / 1000)}' "$work/cached.txt"
