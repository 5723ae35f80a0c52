#!/usr/bin/env bash
# Sets up and runs the whole service on its embedded defaults, on this one machine:
# Redis (started if installed and not running), the Milvus Lite server, migrations, the
# ASGI web server on http://127.0.0.1:8000, one Celery worker per GPU plus the CPU worker,
# and celery beat. Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

setup_venv
ensure_redis
mkdir -p var
.venv/bin/python manage.py migrate --noinput
.venv/bin/python manage.py collectstatic --noinput -v 0

processes="web workers beat"
if [ -z "${MILVUS_URI:-}" ]; then
  processes="milvus $processes"
else
  echo "Using the Milvus at $MILVUS_URI"
fi
echo "R.Massimo on http://${RMASSIMO_HOST:-127.0.0.1}:${RMASSIMO_PORT:-8000}/ (Ctrl-C stops everything)"
exec .venv/bin/honcho -f Procfile start $processes
