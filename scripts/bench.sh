#!/usr/bin/env bash
# The benchmark of issue 7: builds the release binaries and runs
# target/release/bench against the machine's RabbitMQ and PostgreSQL (in a
# vhost and a database of its own, dropped afterwards). Writes BENCHMARKS.md
# and bench/*.svg; the Celery peer is installed into var/bench-venv.
#
#   scripts/bench.sh [BENCH_ARGS...]    (see: target/release/bench --help;
#                                        --quick for a smoke run, --backlog 200000 for the full backlog)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "courier needs a Rust toolchain (stable, 1.88 or newer, edition 2024): install it with rustup, then run this again" >&2
    exit 1
fi

bash scripts/setup.sh --no-migrate
printf '==> cargo build --release --bins\n'
cargo build --release --bins
export COURIER_BENCH_COMMAND="bash scripts/bench.sh${*:+ $*}"
exec "${CARGO_TARGET_DIR:-target}/release/bench" "$@"
