#!/usr/bin/env bash
# The failure-injection soak: a long run against a throwaway RabbitMQ node
# with consumer kills, relay kills and broker SIGKILL + restarts on a schedule,
# then the checker's table (lost, doubled, stuck must all be 0).
#
#   scripts/soak.sh                      # 10,000 orders, 100 consumer kills, 20 relay kills, 5 broker restarts
#   COURIER_SOAK_ORDERS=2000 COURIER_SOAK_CONSUMER_KILLS=20 COURIER_SOAK_RELAY_KILLS=5 \
#   COURIER_SOAK_BROKER_RESTARTS=2 scripts/soak.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --no-migrate
exec cargo test --test api faults::soak::soak -- --ignored --nocapture --test-threads=1
