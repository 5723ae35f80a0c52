#!/usr/bin/env bash
# Sets up and runs the whole test suite: virtualenv, dependencies, lint, migration check, pytest.
# Needs Python 3.11+ and a Redis (started here if `redis-server` is installed); uses the
# PostgreSQL at 127.0.0.1:5432 when one answers, else SQLite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

setup_venv
ensure_redis
ensure_chromium
ensure_prometheus
if [ -z "${DATABASE_URL:-}" ] && postgres_answers; then
  export DATABASE_URL="postgres://postgres@127.0.0.1:5432/rmassimo"
fi
case "${DATABASE_URL:-}" in
  postgres://*|postgresql://*) ensure_postgres_db "$DATABASE_URL" ;;
esac
echo "database: ${DATABASE_URL:-sqlite (var/)}"

.venv/bin/ruff check .
.venv/bin/python manage.py makemigrations --check --dry-run >/dev/null \
  || { echo "models changed without a migration: run manage.py makemigrations" >&2; exit 1; }
exec .venv/bin/python -m pytest "$@"
