#!/usr/bin/env bash
# Installs what lazysnap's tests, demo and benchmarks need on Debian 12, idempotently:
# apt runs only when a package is missing. Also checks the Rust toolchain.
set -euo pipefail

PACKAGES=(gcc binutils ca-certificates containerd runc docker-registry fuse3 libfuse3-dev busybox-static stargz-snapshotter curl jq openssl python3 zstd attr debootstrap e2fsprogs fonts-dejavu-core)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-deps: missing Debian packages: ${missing[*]}; run as root (sudo $0)" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}"
else
    echo "install-deps: all Debian packages present (${PACKAGES[*]})"
fi

# FUSE and overlayfs as kernel modules, where they are not built in (root only; tests say
# clearly what is missing if this does not help).
if [[ $(id -u) -eq 0 ]]; then
    [[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || true
    grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
fi

if ! command -v cargo >/dev/null 2>&1; then
    for dir in "${HOME:-/root}/.cargo/bin" /root/.cargo/bin; do
        if [[ -x "$dir/cargo" ]]; then
            echo "install-deps: cargo found in $dir; add it to PATH" >&2
        fi
    done
    echo "install-deps: no Rust toolchain on PATH: install one with rustup (https://rustup.rs), rust >= 1.85" >&2
    exit 1
fi
rustc_version=$(rustc --version | awk '{print $2}')
if [[ "$(printf '%s\n' 1.85.0 "$rustc_version" | sort -V | head -1)" != "1.85.0" ]]; then
    echo "install-deps: rustc $rustc_version is older than 1.85: run rustup update" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        echo "install-deps: cargo $component missing: rustup component add $component" >&2
        exit 1
    fi
done
echo "install-deps: rustc $rustc_version with rustfmt and clippy"
