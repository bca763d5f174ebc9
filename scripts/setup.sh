#!/usr/bin/env bash
# Prepares this machine (Debian 12) for courier: PostgreSQL and RabbitMQ
# installed and running, the `courier` vhost, role and database present, and
# the schema migrated. Safe to run again: every step checks before it changes.
#
#   scripts/setup.sh [--no-migrate]
#
# --no-migrate skips what needs the courier binary: the migrations and
# `courier broker apply` (the service users, their grants and the topology).
#
# Settings come from config/default.toml < config/$COURIER_ENV.toml (default
# `local`) < COURIER__DATABASE__USER/PASSWORD/NAME/HOST/PORT and
# COURIER__AMQP__VHOST, the same layering as the binaries. The broker is
# administered with RABBITMQ_ADMIN_USER/RABBITMQ_ADMIN_PASSWORD (guest/guest).
set -euo pipefail

usage() { sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

migrate=1
for arg in "$@"; do
    case $arg in
    --no-migrate) migrate=0 ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'setup: unknown argument %s\n' "$arg" >&2; usage >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# rabbitmqctl and friends live in /usr/sbin, which a non-root PATH may lack.
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

step() { printf '==> %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

# --- privileges ---------------------------------------------------------------
if [[ $EUID -eq 0 ]]; then
    as_root() { "$@"; }
elif command -v sudo >/dev/null 2>&1; then
    as_root() { sudo "$@"; }
else
    die "run as root, or install sudo: installing and starting services needs root"
fi

# Runs a command as the postgres superuser, talking to the server over the
# local UNIX socket (peer authentication), so pg_hba.conf is never touched.
as_postgres() {
    if [[ $(id -un) == postgres ]]; then
        (cd / && "$@")
    elif [[ $EUID -eq 0 ]] && command -v runuser >/dev/null 2>&1; then
        (cd / && runuser -u postgres -- "$@")
    elif [[ $EUID -eq 0 ]]; then
        (cd / && su postgres -s /bin/bash -c "$(printf '%q ' "$@")")
    else
        (cd / && sudo -u postgres -- "$@")
    fi
}

# The Debian wrapper switches to the rabbitmq user itself when run as root;
# a UTF-8 locale keeps the Elixir CLI from warning about latin1.
rmqctl() { as_root env LC_ALL=C.UTF-8 rabbitmqctl "$@"; }
rmqplugins() { as_root env LC_ALL=C.UTF-8 rabbitmq-plugins "$@"; }

# wait_until SECONDS WHAT COMMAND...: polls COMMAND until it succeeds or the deadline passes.
wait_until() {
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "gave up after ${limit}s waiting for $what"
        sleep 0.5
    done
}

# --- configuration -------------------------------------------------------------
CONFIG_DIR=${COURIER_CONFIG_DIR:-config}
COURIER_ENV=${COURIER_ENV:-local}

# toml_get SECTION KEY: the value of KEY under [SECTION]; a later file
# (config/$COURIER_ENV.toml) overrides an earlier one (config/default.toml).
# Handles the flat `key = "string"` / `key = number` lines courier's config uses.
toml_get() {
    local section=$1 key=$2 file raw value=''
    for file in "$CONFIG_DIR/default.toml" "$CONFIG_DIR/$COURIER_ENV.toml"; do
        [[ -f $file ]] || continue
        raw=$(sed -n "/^[[:space:]]*\[$section\][[:space:]]*\$/,/^[[:space:]]*\[/{
                s/^[[:space:]]*${key}[[:space:]]*=[[:space:]]*//p
              }" "$file" | tail -n 1)
        [[ -n $raw ]] || continue
        if [[ $raw == \"* ]]; then
            value=$(sed -E 's/^"([^"]*)".*$/\1/' <<<"$raw")
        else
            value=$(sed -E 's/[[:space:]]*#.*$//; s/[[:space:]]+$//' <<<"$raw")
        fi
    done
    printf '%s' "$value"
}

[[ -f $CONFIG_DIR/default.toml ]] || die "$CONFIG_DIR/default.toml not found (run from a courier checkout)"
DB_HOST=${COURIER__DATABASE__HOST-$(toml_get database host)}
DB_PORT=${COURIER__DATABASE__PORT-$(toml_get database port)}
DB_USER=${COURIER__DATABASE__USER-$(toml_get database user)}
DB_PASSWORD=${COURIER__DATABASE__PASSWORD-$(toml_get database password)}
DB_NAME=${COURIER__DATABASE__NAME-$(toml_get database name)}
AMQP_VHOST=${COURIER__AMQP__VHOST-$(toml_get amqp vhost)}
DB_HOST=${DB_HOST:-127.0.0.1}
DB_PORT=${DB_PORT:-5432}
for var in DB_USER DB_PASSWORD DB_NAME AMQP_VHOST; do
    [[ -n ${!var} ]] || die "$var is empty: check $CONFIG_DIR/default.toml and the COURIER__* variables"
done
MGMT_URL=http://127.0.0.1:15672
MGMT_USER=${RABBITMQ_ADMIN_USER:-guest}
MGMT_PASSWORD=${RABBITMQ_ADMIN_PASSWORD:-guest}

# --- packages ------------------------------------------------------------------
missing=()
command -v pg_ctlcluster >/dev/null 2>&1 && command -v psql >/dev/null 2>&1 || missing+=(postgresql)
command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if ((${#missing[@]})); then
    step "installing ${missing[*]} (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
else
    step "packages: postgresql, rabbitmq-server and curl are installed"
fi

# --- PostgreSQL ----------------------------------------------------------------
pg_ready() { pg_isready -q -h "$DB_HOST" -p "$DB_PORT"; }
if pg_ready; then
    step "postgresql: accepting connections on $DB_HOST:$DB_PORT"
else
    pg_version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
    if [[ -z $pg_version ]]; then
        pg_version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
        step "postgresql: creating cluster $pg_version/main"
        as_root pg_createcluster "$pg_version" main >/dev/null
    fi
    step "postgresql: starting cluster $pg_version/main"
    as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start
    wait_until 60 "PostgreSQL on $DB_HOST:$DB_PORT" pg_ready
    step "postgresql: accepting connections on $DB_HOST:$DB_PORT"
fi

# --- RabbitMQ ------------------------------------------------------------------
if rmqctl -q status >/dev/null 2>&1; then
    step "rabbitmq: running"
else
    # A node that answers ping is already booting: wait for it instead of starting a second one.
    if ! rmqctl -q ping >/dev/null 2>&1; then
        step "rabbitmq: starting"
        as_root env LC_ALL=C.UTF-8 rabbitmq-server -detached
    fi
    wait_until 120 "RabbitMQ to boot" rmqctl -q await_startup --timeout 10
    step "rabbitmq: running"
fi

# The management UI and API; the shovel plugins make the UI's "Move messages"
# (dead letters back to their work queue) work. Enabling is online: the
# broker keeps running.
for plugin in rabbitmq_management rabbitmq_shovel rabbitmq_shovel_management; do
    if rmqplugins -q is_enabled "$plugin" >/dev/null 2>&1; then
        step "rabbitmq: plugin $plugin enabled"
    else
        step "rabbitmq: enabling plugin $plugin"
        rmqplugins -q enable "$plugin" >/dev/null
    fi
done

mgmt() { # mgmt METHOD PATH [JSON]: one management API call; fails on HTTP errors.
    local args=(-fsS -o /dev/null -u "$MGMT_USER:$MGMT_PASSWORD" -X "$1" "$MGMT_URL/api$2")
    [[ $# -lt 3 ]] || args+=(-H 'content-type: application/json' --data "$3")
    curl "${args[@]}"
}
wait_until 60 "the management API at $MGMT_URL" mgmt GET /overview

urlencode() { # a vhost name as one URL path segment ("/" -> %2F)
    local LC_ALL=C s=$1 out='' c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
        [a-zA-Z0-9.~_-]) out+=$c ;;
        *) out+=$(printf '%%%02X' "'$c") ;;
        esac
    done
    printf '%s' "$out"
}
vhost_path=$(urlencode "$AMQP_VHOST")
if mgmt GET "/vhosts/$vhost_path" 2>/dev/null; then
    step "rabbitmq: vhost $AMQP_VHOST exists"
else
    step "rabbitmq: creating vhost $AMQP_VHOST"
    mgmt PUT "/vhosts/$vhost_path" '{}'
fi
# The service users, their grants and the topology are made by
# `courier broker apply` after the migrations below (it needs the binary).

# --- PostgreSQL role and database -----------------------------------------------
# The password travels as a psql variable and is quoted by psql (:'pw'), never
# pasted into the SQL text.
psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -v user="$DB_USER" -v pw="$DB_PASSWORD" -v db="$DB_NAME" "$@"; }

role_exists=$(psql_admin -At <<<"SELECT count(*) FROM pg_roles WHERE rolname = :'user';")
psql_admin <<'SQL'
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') AS create_role \gset
\if :create_role
CREATE ROLE :"user" LOGIN CREATEDB PASSWORD :'pw';
\else
ALTER ROLE :"user" WITH LOGIN CREATEDB PASSWORD :'pw';
\endif
SQL
if [[ $role_exists == 1 ]]; then
    step "postgresql: role $DB_USER exists (LOGIN CREATEDB, password set from config)"
else
    step "postgresql: created role $DB_USER (LOGIN CREATEDB)"
fi

db_owner=$(psql_admin -At <<<"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :'db';")
if [[ -z $db_owner ]]; then
    psql_admin <<<'CREATE DATABASE :"db" OWNER :"user";'
    step "postgresql: created database $DB_NAME owned by $DB_USER"
elif [[ $db_owner == "$DB_USER" ]]; then
    step "postgresql: database $DB_NAME exists, owned by $DB_USER"
else
    step "postgresql: WARNING database $DB_NAME exists but is owned by $db_owner, not $DB_USER"
fi

if PGPASSWORD=$DB_PASSWORD PGCONNECT_TIMEOUT=5 psql -X -q -At -h "$DB_HOST" -p "$DB_PORT" \
    -U "$DB_USER" -d "$DB_NAME" -c 'select 1' >/dev/null 2>&1; then
    step "postgresql: $DB_USER logs in to $DB_NAME over TCP with its password"
else
    cat >&2 <<EOF
setup: $DB_USER could not log in to $DB_NAME at $DB_HOST:$DB_PORT with the configured password.
       courier connects over TCP with a password, so pg_hba.conf must allow password
       authentication for 127.0.0.1, e.g. this line before any 'reject' rule:
           host  all  all  127.0.0.1/32  scram-sha-256
       (see: psql -h $DB_HOST -p $DB_PORT -U $DB_USER -d $DB_NAME for the server's reason).
       This script does not edit pg_hba.conf; after changing it, reload PostgreSQL
       (pg_ctlcluster <version> main reload) and run it again.
EOF
    exit 1
fi

# --- schema ----------------------------------------------------------------------
if ((migrate)); then
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) or run with --no-migrate"
    step "migrations: cargo run --release --bin courier -- migrate"
    cargo run --quiet --release --bin courier -- migrate
    # One user per service with the narrowest grant, the operator user, and
    # the topology declared as the operator (passwords from the same config).
    step "rabbitmq: courier broker apply (users, permissions, topology)"
    RABBITMQ_ADMIN_USER=$MGMT_USER RABBITMQ_ADMIN_PASSWORD=$MGMT_PASSWORD \
        cargo run --quiet --release --bin courier -- broker apply
    OPERATOR_USER=${COURIER__AMQP__OPERATOR__USER-$(toml_get amqp.operator user)}
    step "ready: management UI $MGMT_URL (log in as ${OPERATOR_USER:-courier-operator}, vhost $AMQP_VHOST)"
else
    step "migrations, broker users and topology: skipped (--no-migrate)"
    step "ready: management UI $MGMT_URL (vhost $AMQP_VHOST)"
fi
