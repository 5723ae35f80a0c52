# Shared by scripts/run.sh and scripts/test.sh.

PYTHON=${PYTHON:-python3}

setup_venv() {
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
  fi
  # Skip pip when requirements.txt has not changed since the last install.
  local stamp=.venv/.requirements.sha256
  local want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r requirements.txt
    echo "$want" > "$stamp"
  fi
}

redis_answers() {
  .venv/bin/python - "${REDIS_URL:-redis://127.0.0.1:6379/0}" <<'PY' 2>/dev/null
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()
PY
}

ensure_redis() {
  if redis_answers; then return 0; fi
  if command -v redis-server >/dev/null 2>&1 && [ -z "${REDIS_URL:-}" ]; then
    echo "Starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do redis_answers && return 0; sleep 0.1; done
  fi
  echo "No Redis answers at ${REDIS_URL:-redis://127.0.0.1:6379/0}." >&2
  echo "Install one (Debian/Ubuntu: sudo apt-get install redis-server) or set REDIS_URL." >&2
  exit 1
}

postgres_answers() {
  .venv/bin/python - <<'PY' 2>/dev/null
import psycopg
psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=2).close()
PY
}
