#!/usr/bin/env bash
# Builds the image the DaemonSet runs (packaging/kubernetes/lazysnap-daemonset.yaml) without
# Docker: the lazysnap binary and the shared libraries it links, in one layer, written as an OCI
# image layout and pushed with `lazysnap convert` (as eStargz: the image itself pulls lazily).
# The tag is the crate's version, pinned in the DaemonSet.
#
# Usage: scripts/build-image.sh [--binary PATH] [--plain-http] REPOSITORY
#   e.g. scripts/build-image.sh ghcr.io/lazysnap/lazysnap   ->  ghcr.io/lazysnap/lazysnap:0.1.0
#   --binary: the lazysnap executable to ship (default: target/release/lazysnap, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""
plain_http=()
while [[ $# -gt 1 ]]; do
    case $1 in
        --binary) binary=$2; shift 2 ;;
        --plain-http) plain_http=(--plain-http); shift ;;
        *) echo "build-image: unknown option $1" >&2; exit 2 ;;
    esac
done
repository=${1:?usage: scripts/build-image.sh [--binary PATH] [--plain-http] REPOSITORY}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
if [[ -z $binary ]]; then
    binary=target/release/lazysnap
    [[ -x $binary ]] || cargo build --release --bin lazysnap
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc/lazysnap" "$root/var/lib/lazysnap" "$root/run/lazysnap" "$root/tmp"
chmod 1777 "$root/tmp"
# Debug information stays out of the image (the binary's symbols stay, for backtraces).
strip --strip-debug -o "$root/usr/local/bin/lazysnap" "$binary"
chmod 0755 "$root/usr/local/bin/lazysnap"
# The loader and the libraries the binary links, at the paths it looks for them.
for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# The system's CA bundle: registries are reached over TLS verified against it.
mkdir -p "$root/etc/ssl/certs"
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
echo "root:x:0:0:root:/root:/usr/local/bin/lazysnap" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$root" -cf "$work/layer.tar" .

python3 - "$work" "$version" <<'PY'
import gzip, hashlib, json, os, sys
work, version = sys.argv[1], sys.argv[2]
layout = os.path.join(work, "layout")
blobs = os.path.join(layout, "blobs", "sha256")
os.makedirs(blobs)
def put(data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)
tar = open(os.path.join(work, "layer.tar"), "rb").read()
layer_digest, layer_size = put(gzip.compress(tar, 6, mtime=0))
config = {
    "architecture": "amd64", "os": "linux",
    "config": {
        "Entrypoint": ["/usr/local/bin/lazysnap"],
        "Cmd": ["serve", "--config", "/etc/lazysnap/config.toml"],
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
        "Labels": {"org.opencontainers.image.version": version,
                   "org.opencontainers.image.title": "lazysnap"},
    },
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
}
config_digest, config_size = put(json.dumps(config, sort_keys=True).encode())
manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": config_digest, "size": config_size},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest, "size": layer_size}],
}
manifest_digest, manifest_size = put(json.dumps(manifest, sort_keys=True).encode())
with open(os.path.join(layout, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": version}}]}, f)
PY

"$binary" convert "${plain_http[@]}" "oci:$work/layout:$version" "$repository:$version" >&2
echo "$repository:$version"
