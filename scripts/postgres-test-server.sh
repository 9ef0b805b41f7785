#!/usr/bin/env bash
# Start Debian's PostgreSQL on loopback and create what the tests use (idempotent):
# role slimconv/slimconv, databases slimconv_test and slimconv_test_studies.
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v pg_lsclusters >/dev/null 2>&1; then
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql
fi
read -r version cluster _ < <(pg_lsclusters --no-header | head -1)
$SUDO pg_ctlcluster "$version" "$cluster" start 2>/dev/null || true
for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -q && break; sleep 1; done
if [ "$(id -u)" = 0 ]; then AS_POSTGRES=(runuser -u postgres --); else AS_POSTGRES=(sudo -u postgres); fi
psql_as_postgres() { (cd /tmp && "${AS_POSTGRES[@]}" psql -v ON_ERROR_STOP=1 -qtA "$@"); }
if [ -z "$(psql_as_postgres -c "SELECT 1 FROM pg_roles WHERE rolname='slimconv'")" ]; then
    psql_as_postgres -c "CREATE ROLE slimconv LOGIN PASSWORD 'slimconv'"
fi
for db in slimconv_test slimconv_test_studies; do
    if [ -z "$(psql_as_postgres -c "SELECT 1 FROM pg_database WHERE datname='$db'")" ]; then
        psql_as_postgres -c "CREATE DATABASE $db OWNER slimconv"
    fi
done
echo "PostgreSQL $version up on 127.0.0.1:5432 (slimconv_test, slimconv_test_studies)"
