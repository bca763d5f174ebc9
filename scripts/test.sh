#!/usr/bin/env bash
# Runs the whole test suite against the real RabbitMQ and PostgreSQL.
# Each test creates its own vhost and database and migrates it, so setup only
# has to make sure the services, the `courier` role (CREATEDB) and the broker's
# management API are there.
#
#   scripts/test.sh [CARGO_ARGS... --] [TEST_ARGS...]
#
# Arguments go to the test binaries (a name filter, --nocapture, --ignored...);
# arguments before a `--` go to cargo instead. COURIER_TEST_THREADS (default 6)
# bounds how many tests share the broker and database at once.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "courier needs a Rust toolchain (stable, 1.88 or newer, edition 2024): install it with rustup, then run this again" >&2
    exit 1
fi

cargo_args=()
test_args=("$@")
for ((i = 0; i < $#; i++)); do
    if [[ ${test_args[i]} == -- ]]; then
        cargo_args=("${test_args[@]:0:i}")
        test_args=("${test_args[@]:i+1}")
        break
    fi
done

bash scripts/setup.sh --no-migrate
printf '==> cargo test --all-targets (%s test threads)\n' "${COURIER_TEST_THREADS:-6}"
exec cargo test --all-targets "${cargo_args[@]}" -- --test-threads="${COURIER_TEST_THREADS:-6}" "${test_args[@]}"
