#!/usr/bin/env bash
# Coverage-guided fuzzing of lazysnap's parsers on the stable toolchain: fuzz/ is built with LLVM's
# SanitizerCoverage (trace-pc-guard, the instrumentation libFuzzer uses) and its own edge map and
# mutator, then each target of lazysnap::fuzzing runs for a bounded time from a seed corpus (the
# ctr-remote fixtures, a tar, and fuzz/seeds: manifests, hosts.toml files). New inputs go to fuzz/corpus/TARGET,
# crashes, timeouts and out-of-memory inputs to fuzz/artifacts/TARGET. One line per target says
# execs, corpus, edges and crashes; the exit status is 1 if any target crashed.
#   FUZZ_SECONDS  seconds per target (default 60)
#   FUZZ_TARGETS  targets to run (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
seconds="${FUZZ_SECONDS:-60}"
targets="${FUZZ_TARGETS:-footer toc_json layer_blob tar_input manifest hosts_toml elf_libraries ztoc}"
fixtures="${FIXTURES_DIR:-../shared/fixtures}"
host=$(rustc -vV | sed -n 's/^host: //p')

# Build scripts and proc macros stay uninstrumented: the flags apply to --target builds only.
[ -f fuzz/Cargo.lock ] || cp Cargo.lock fuzz/Cargo.lock
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=3 \
-Cllvm-args=-sanitizer-coverage-trace-pc-guard -Cdebug-assertions -Coverflow-checks" \
    cargo build --quiet --release --offline --manifest-path fuzz/Cargo.toml --target "$host" \
    --target-dir target/fuzz
fuzzer="target/fuzz/$host/release/lazysnap-fuzz"

corpus="fuzz/corpus"
mkdir -p "$corpus"/{footer,toc_json,layer_blob,tar_input,manifest,hosts_toml,elf_libraries,ztoc}
if [ -d "$fixtures" ]; then
    i=0
    for blob in "$fixtures"/*/*.blob; do
        i=$((i + 1))
        tail -c 51 "$blob" > "$corpus/footer/fixture-$i"
        if [ "$(stat -c %s "$blob")" -lt 300000 ]; then cp "$blob" "$corpus/layer_blob/fixture-$i"; fi
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
# The start of real programs and libraries, as library prefetch sees them.
for elf in /bin/true /usr/lib/x86_64-linux-gnu/libc.so.6; do
    if [ -f "$elf" ]; then head -c 65536 "$elf" > "$corpus/elf_libraries/$(basename "$elf")"; fi
done
# The seeds kept in the repository (manifests, hosts.toml files, a small zTOC).
for dir in fuzz/seeds/*/; do cp "$dir"* "$corpus/$(basename "$dir")/"; done

status=0
for target in $targets; do
    echo "== fuzzing $target for ${seconds}s"
    if ! "$fuzzer" "$target" "$seconds" "$corpus/$target" "fuzz/artifacts/$target"; then
        echo "fuzz target $target FAILED (inputs under fuzz/artifacts/$target)" >&2
        status=1
    fi
done
exit "$status"
