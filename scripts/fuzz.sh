#!/usr/bin/env bash
# Runs every estargz fuzz target (fuzz/fuzz_targets/*) for a bounded time each.
#   FUZZ_SECONDS  seconds per target (default 60)
# With a nightly toolchain it uses cargo-fuzz (installed when missing) and seeds each corpus from
# ../shared/fixtures. Without nightly it runs the same target bodies as a bounded loop over
# mutated inputs (tests/estargz_fuzz_smoke.rs, FUZZ_ITERATIONS per target) on stable.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
fixtures="${FIXTURES_DIR:-../shared/fixtures}"
[ -d "$fixtures" ] || fixtures=/work/shared/fixtures

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz.sh: no nightly toolchain; running the stable fuzz smoke loop instead" >&2
    export FUZZ_ITERATIONS="${FUZZ_ITERATIONS:-$((seconds * 20))}"
    exec cargo test --release --test estargz_fuzz_smoke
fi
[ -f fuzz/Cargo.lock ] || cp Cargo.lock fuzz/Cargo.lock
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly install cargo-fuzz --locked
fi

corpus="fuzz/corpus"
mkdir -p "$corpus"/{footer,toc_json,layer_blob,tar_input}
if [ -d "$fixtures" ]; then
    i=0
    for blob in "$fixtures"/*/*.blob; do
        i=$((i + 1))
        tail -c 51 "$blob" > "$corpus/footer/fixture-$i"
        size=$(stat -c %s "$blob")
        if [ "$size" -lt 300000 ]; then cp "$blob" "$corpus/layer_blob/fixture-$i"; fi
    done
    for toc in "$fixtures"/*/*.toc.json; do
        i=$((i + 1))
        if [ "$(stat -c %s "$toc")" -lt 8192 ]; then cp "$toc" "$corpus/toc_json/fixture-$i"; fi
    done
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/t/dir"
printf 'hello\n' > "$scratch/t/dir/a.txt"
head -c 10000 /dev/zero > "$scratch/t/dir/zeros"
ln -sf a.txt "$scratch/t/dir/link"
tar -C "$scratch/t" --format=pax -cf "$corpus/tar_input/seed.tar" dir

status=0
for target in footer toc_json layer_blob tar_input; do
    echo "== fuzzing $target for ${seconds}s"
    if ! cargo +nightly fuzz run "$target" "$corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=400000 -timeout=20; then
        echo "fuzz target $target FAILED (crash input under fuzz/artifacts/$target)" >&2
        status=1
    fi
done
exit "$status"
