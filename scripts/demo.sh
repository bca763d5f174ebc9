#!/usr/bin/env bash
# The README's demo: prepares the services, builds every binary and lets
# `courier demo` drive a workload through the whole pipeline with the demo
# settings (config/demo.toml: short retry tiers, a flaky gateway).
#
#   scripts/demo.sh [DEMO_ARGS...]    (see: target/release/courier demo --help)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "courier needs a Rust toolchain (stable, 1.88 or newer, edition 2024): install it with rustup, then run this again" >&2
    exit 1
fi

# Setup and migrations read the same layered config the demo will run with.
export COURIER_ENV=demo
bash scripts/setup.sh
printf '==> cargo build --release --bins\n'
cargo build --release --bins
exec "${CARGO_TARGET_DIR:-target}/release/courier" demo "$@"
