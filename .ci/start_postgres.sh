#!/usr/bin/env bash
# Start a local PostgreSQL (Debian packages) for the multi-worker sweep tests and print its URL.
# Usage: eval "$(bash .ci/start_postgres.sh)"   -> exports MEDSEL_TEST_POSTGRES_URL
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
command -v pg_lsclusters >/dev/null 2>&1 || { echo "echo 'postgresql not installed; PostgreSQL tests will skip' >&2"; exit 0; }
VERSION=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | grep -q "^$VERSION main"; then
  $SUDO pg_createcluster "$VERSION" main >/dev/null
fi
$SUDO pg_ctlcluster "$VERSION" main start >/dev/null 2>&1 || true
for _ in $(seq 1 30); do
  $SUDO -u postgres psql -qtAc "select 1" >/dev/null 2>&1 && break
  su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1 && break
  sleep 1
done
run_psql() { if [ -n "$SUDO" ]; then $SUDO -u postgres psql -qtAc "$1"; else su postgres -c "psql -qtAc \"$1\""; fi; }
run_psql "select 1 from pg_roles where rolname='medsel'" | grep -q 1 || run_psql "create role medsel login superuser password 'medsel'" >/dev/null
run_psql "select 1 from pg_database where datname='medsel_test'" | grep -q 1 || run_psql "create database medsel_test owner medsel" >/dev/null
echo "export MEDSEL_TEST_POSTGRES_URL=postgresql://medsel:medsel@127.0.0.1:5432/medsel_test"
