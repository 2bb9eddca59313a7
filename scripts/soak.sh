#!/usr/bin/env bash
# The long fault soak of the reliability suite: 1,000 faults (SOAK_FAULTS) injected by a fault
# proxy into the reads of a lazily mounted image, bounded by SOAK_SECONDS (default 900); prints
# faults injected and reads right, failed and wrong (must be 0). Needs root and FUSE.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"
export SOAK_FAULTS="${SOAK_FAULTS:-1000}" SOAK_SECONDS="${SOAK_SECONDS:-900}"
cargo test --test fault_soak -- --nocapture 2>&1 | grep -E "fault soak|test result|panicked|wrong"
