#!/usr/bin/env bash
# Sets up and runs the whole service on its embedded defaults, on this one machine:
# Redis (started if installed and not running), the Milvus Lite server, migrations, the
# ASGI web server on http://127.0.0.1:8000, one Celery worker per GPU plus the CPU worker,
# the housekeeping worker and celery beat (run_workers starts those). Without a reachable Ollama the workers answer with the small model
# shipped in requirements/embedded.txt (llama.cpp) and BM25 retrieval. On first run it also creates a
# web chat user and ingests the demo corpus (demo/, corpus "demo"). Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh

setup_venv
ensure_redis
choose_backend
mkdir -p var
.venv/bin/python manage.py migrate --noinput -v 0
.venv/bin/python manage.py collectstatic --noinput -v 0
ensure_first_user

processes="web workers"
if [ -z "${MILVUS_URI:-}" ]; then
  processes="milvus $processes"
  # Every process reaches the Milvus Lite server started here, on its port.
  export MILVUS_URI="http://127.0.0.1:${RMASSIMO_MILVUS_PORT:-19530}"
else
  echo "Using the Milvus at $MILVUS_URI"
fi
if [ ! -f var/demo-ingested ] && [ "${RMASSIMO_DEMO:-1}" != "0" ]; then
  processes="$processes demo"
fi
echo "R.Massimo on http://${RMASSIMO_HOST:-127.0.0.1}:${RMASSIMO_PORT:-8000}/ (Ctrl-C stops everything)"
exec .venv/bin/honcho -f Procfile start $processes
