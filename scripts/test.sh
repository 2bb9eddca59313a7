#!/usr/bin/env bash
# The whole check CI runs: dependencies, formatting, lints, every test (real registry, FUSE and
# containerd, so it needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "test.sh: the tests start FUSE mounts, containerd and registries and need root: sudo $0" >&2
    exit 1
fi
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"

bash scripts/install-deps.sh
# The SOCI snapshotter, a peer the bench measures (Debian unstable's package, extracted privately).
echo "== scripts/get-soci.sh: $(bash scripts/get-soci.sh)"
# stargz-snapshotter's daemon, the other peer, built from Debian 12's packages.
echo "== scripts/get-stargz.sh: $(bash scripts/get-stargz.sh)"
# containerd 1.7 (Debian 13) and 2.x (unstable) beside the system's 1.6, extracted privately, for
# tests/containerd_versions.rs.
for suite in trixie unstable; do
    echo "== scripts/get-containerd.sh $suite: $(bash scripts/get-containerd.sh "$suite")"
done

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
# The dependency tree's licenses, bans and sources (deny.toml; advisories need a database CI
# cannot reach). cargo-deny is built from crates.io once, at a pinned version.
if ! cargo deny --version 2>/dev/null | grep -q "^cargo-deny 0.20.2$"; then
    echo "== cargo install cargo-deny 0.20.2"
    cargo install cargo-deny --locked --version 0.20.2
fi
echo "== cargo deny check bans licenses sources"
cargo deny check bans licenses sources
(cd fuzz && cargo deny check bans licenses sources)
# How full the disk under the tests is: above the cache's high watermark (90%) the chunk caches
# the tests start evict, which a failure's log should show.
echo "== disk under ${TMPDIR:-/tmp}: $(df -h --output=pcent,avail "${TMPDIR:-/tmp}" | tail -1)"
echo "== cargo test --workspace"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# One summary line over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
# Coverage-guided fuzzing of every parser target, briefly (scripts/fuzz.sh runs longer on demand).
echo "== scripts/fuzz.sh (${CI_FUZZ_SECONDS:-10} s per target)"
FUZZ_SECONDS="${CI_FUZZ_SECONDS:-10}" bash scripts/fuzz.sh || status=1
if ((status != 0)); then
    echo "test.sh: FAILED (cargo test exit status $status)" >&2
fi
exit "$status"
