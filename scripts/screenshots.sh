#!/usr/bin/env bash
# Takes the README's screenshots of the management UI (docs/queues.png and
# docs/dead-letter.png) with headless Chromium, while the demo's queues exist:
#
#   bash scripts/demo.sh && bash scripts/screenshots.sh
#
# Installs what it needs if missing: Debian's chromium (apt-get) and
# playwright-core (npm, into var/screenshots/, never committed). Logs in as
# the operator user of the configuration (COURIER_ENV, default demo).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
export COURIER_ENV=${COURIER_ENV:-demo}
WORK=$ROOT/var/screenshots

if ! command -v chromium >/dev/null 2>&1; then
    printf '==> installing chromium (apt-get)\n'
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
command -v npm >/dev/null 2>&1 || { echo "screenshots: npm is needed (apt-get install npm)" >&2; exit 1; }
mkdir -p "$WORK"
if [[ ! -d $WORK/node_modules/playwright-core ]]; then
    printf '==> installing playwright-core (npm, into %s)\n' "$WORK"
    (cd "$WORK" && npm install --silent --no-audit --no-fund playwright-core@1 >/dev/null)
fi

# The operator's login and the vhost, as the binaries read them.
operator=${COURIER__AMQP__OPERATOR__USER:-courier-operator}
password=${COURIER__AMQP__OPERATOR__PASSWORD:-$(sed -n '/^\[amqp.operator\]/,/^\[/s/^password *= *"\(.*\)"/\1/p' config/default.toml)}
vhost=${COURIER__AMQP__VHOST:-courier}
url=${RABBITMQ_MANAGEMENT_URL:-http://127.0.0.1:15672}

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
cp scripts/screenshots.mjs "$WORK/screenshots.mjs"
printf '==> screenshots of %s (vhost %s) into docs/\n' "$url" "$vhost"
(cd "$WORK" && node screenshots.mjs "$url" "$operator" "$password" "$vhost" "$ROOT/docs" "$profile")
ls -l docs/*.png
