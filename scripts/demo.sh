#!/usr/bin/env bash
# The largest working slice of lazysnap, end to end on this machine: start a registry on
# 127.0.0.1, build a small busybox image as an OCI layout, convert it to eStargz with
# `lazysnap convert` (pushing to the registry), then `lazysnap inspect --verify` every layer.
# Everything it starts or creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"

if [[ $(id -u) -ne 0 ]]; then
    echo "demo.sh: run as root (sudo $0): it installs Debian packages when missing" >&2
    exit 1
fi
bash scripts/install-deps.sh

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
echo "== building lazysnap"
cargo build --quiet --bin lazysnap
LAZYSNAP="$CARGO_TARGET_DIR/debug/lazysnap"

work=$(mktemp -d /tmp/lazysnap-demo.XXXXXX)
registry_pid=""
cleanup() {
    if [[ -n "$registry_pid" ]]; then kill "$registry_pid" 2>/dev/null || true; wait "$registry_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
  delete:
    enabled: true
  redirect:
    disable: true
http:
  addr: 127.0.0.1:$port
log:
  level: warn
YAML
echo "== starting docker-registry on 127.0.0.1:$port"
/usr/bin/docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break
    sleep 0.1
done
curl -fs "http://127.0.0.1:$port/v2/" >/dev/null || { cat "$work/registry.log"; exit 1; }

echo "== building a busybox image (OCI layout in $work/busybox-oci)"
rootfs="$work/rootfs"
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp"
cp /bin/busybox "$rootfs/bin/busybox"
for applet in sh ls cat echo; do ln -s busybox "$rootfs/bin/$applet"; done
echo "hello from a lazily pulled image" >"$rootfs/etc/motd"
head -c $((8 * 1024 * 1024)) /dev/urandom >"$rootfs/tmp/random.bin"

layout="$work/busybox-oci"
mkdir -p "$layout/blobs/sha256"
tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -6 -c "$work/layer.tar" >"$work/layer.tar.gz"
layer_digest=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
layer_size=$(stat -c %s "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$layout/blobs/sha256/$layer_digest"

put_blob() { # put_blob FILE -> prints "digest size"
    local d s
    d=$(sha256sum "$1" | cut -d' ' -f1)
    s=$(stat -c %s "$1")
    mv "$1" "$layout/blobs/sha256/$d"
    echo "$d $s"
}
jq -cn --arg arch "$(dpkg --print-architecture)" --arg diff "sha256:$diff_id" '{architecture:$arch,os:"linux",
    config:{Cmd:["/bin/sh","-c","cat /etc/motd"]},
    rootfs:{type:"layers",diff_ids:[$diff]}}' >"$work/config.json"
read -r config_digest config_size < <(put_blob "$work/config.json")
jq -cn --arg cd "sha256:$config_digest" --argjson cs "$config_size" \
    --arg ld "sha256:$layer_digest" --argjson ls "$layer_size" '{schemaVersion:2,
    mediaType:"application/vnd.oci.image.manifest.v1+json",
    config:{mediaType:"application/vnd.oci.image.config.v1+json",digest:$cd,size:$cs},
    layers:[{mediaType:"application/vnd.oci.image.layer.v1.tar+gzip",digest:$ld,size:$ls}]}' >"$work/manifest.json"
read -r manifest_digest manifest_size < <(put_blob "$work/manifest.json")
jq -cn --arg arch "$(dpkg --print-architecture)" --arg md "sha256:$manifest_digest" --argjson ms "$manifest_size" '{schemaVersion:2,
    mediaType:"application/vnd.oci.image.index.v1+json",
    manifests:[{mediaType:"application/vnd.oci.image.manifest.v1+json",digest:$md,size:$ms,
      annotations:{"org.opencontainers.image.ref.name":"latest"},
      platform:{architecture:$arch,os:"linux"}}]}' >"$layout/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

target="127.0.0.1:$port/demo/busybox:esgz"
echo
echo "\$ lazysnap convert oci:$layout:latest $target"
"$LAZYSNAP" convert "oci:$layout:latest" "$target"
echo
echo "\$ lazysnap inspect --verify $target"
"$LAZYSNAP" inspect --verify "$target"
echo
echo "demo: done (registry stopped, $work removed)"
