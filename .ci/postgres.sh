#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the store tests and print its SQLAlchemy URL.
#
#   export INSTRUCTRL_TEST_PG_URL="$(.ci/postgres.sh)"
#
# Installs Debian's `postgresql` with apt if no server binaries exist, then runs a private cluster
# (data in $INSTRUCTRL_PG_DIR, default /tmp/instructrl-pg) as an unprivileged user -- `postgres` when
# called as root -- listening on loopback only, port $INSTRUCTRL_PG_PORT (default 55432). Loopback
# connections are trusted (test server only). Creates role `instructrl` and database `instructrl_test`.
# Idempotent: a server already answering on the port is reused. Stop it with:
#   pg_ctl -D /tmp/instructrl-pg stop   (as the same user)
# Only the URL goes to stdout; progress goes to stderr.
set -euo pipefail
log() { echo "[postgres.sh] $*" >&2; }

PORT="${INSTRUCTRL_PG_PORT:-55432}"
DATA="${INSTRUCTRL_PG_DIR:-/tmp/instructrl-pg}"
DB=instructrl_test
ROLE=instructrl

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(bindir)" ] || [ ! -x "$(bindir)/initdb" ]; then
  log "no PostgreSQL server found: installing Debian's postgresql"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >&2
fi
BIN="$(bindir)"

# run the server as an unprivileged user (postgres refuses to run as root)
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql postgres
  AS=(runuser -u postgres --)
  OWNER=postgres
else
  AS=()
  OWNER="$(id -un)"
fi

if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  log "reusing the server already on 127.0.0.1:$PORT"
else
  if [ ! -f "$DATA/PG_VERSION" ]; then
    log "initdb $DATA"
    mkdir -p "$DATA"
    chown "$OWNER" "$DATA"
    chmod 700 "$DATA"
    "${AS[@]}" "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >&2
  fi
  log "starting on 127.0.0.1:$PORT"
  "${AS[@]}" "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA -c fsync=on -c max_connections=200" start >&2
fi

PSQL=("${AS[@]}" "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
if [ "$("${PSQL[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='$ROLE'")" != "1" ]; then
  "${PSQL[@]}" -c "CREATE ROLE $ROLE LOGIN PASSWORD '$ROLE'" >&2
fi
if [ "$("${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname='$DB'")" != "1" ]; then
  "${PSQL[@]}" -c "CREATE DATABASE $DB OWNER $ROLE" >&2
fi
echo "postgresql+psycopg://$ROLE:$ROLE@127.0.0.1:$PORT/$DB"
