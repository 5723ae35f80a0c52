#!/usr/bin/env bash
# Replays the Dockerfile's steps without a Docker engine, then checks the result:
#
#   bash scripts/replay-image.sh [WORKDIR]
#
# build stage:   a fresh virtualenv from a bare Python 3.11 (what python:3.11-slim has),
#                requirements/runtime.txt and requirements/embedded.txt installed with
#                the Dockerfile's settings (no pip cache, CMAKE_ARGS), llama-cpp-python
#                compiled from source;
# runtime stage: the build context as .dockerignore leaves it, collectstatic, then as a
#                non-root user (uid 1000, like the image): no test tool importable, the
#                embedded model loads and writes a few tokens, `check --deploy` passes,
#                and run_web serves a page.
# Takes minutes (the compile). Needs gcc, g++, cmake and libgomp1, as the stages install.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d /tmp/rmassimo-image.XXXXXX)}
python=${PYTHON:-/usr/bin/python3.11}
mkdir -p "$work"
chmod 755 "$work"
echo "replaying the Dockerfile into $work"

# --- build stage ---
"$python" -m venv --clear "$work/venv"
grep -q '^ENV PIP_NO_CACHE_DIR=1' Dockerfile
cmake_args=$(sed -n 's/^ *CMAKE_ARGS="\(.*\)"$/\1/p' Dockerfile)
PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 CMAKE_ARGS="$cmake_args" \
  "$work/venv/bin/pip" install -q -r requirements/runtime.txt -r requirements/embedded.txt
# The packages the Dockerfile removes again (dependencies that only tests would use).
removed=$(sed -n 's#.*/opt/venv/bin/pip uninstall -y \(.*\)$#\1#p' Dockerfile)
[ -n "$removed" ] || { echo "FAIL: no pip uninstall line found in the Dockerfile" >&2; exit 1; }
# shellcheck disable=SC2086  # a list of package names
"$work/venv/bin/pip" uninstall -q -y $removed

# --- runtime stage ---
rm -rf "$work/app"
rsync -a --exclude-from=.dockerignore ./ "$work/app/"
export PATH="$work/venv/bin:$PATH" PYTHONDONTWRITEBYTECODE=1
unset DATABASE_URL REDIS_URL MILVUS_URI RMASSIMO_VAR_DIR
(cd "$work/app" && python manage.py collectstatic --noinput -v 0 \
  && mkdir -p var/media var/backups && chown -R 1000:1000 var)
as_user() { (cd "$work/app" && exec setpriv --reuid=1000 --regid=1000 --clear-groups "$@"); }

echo "--- no test tools in the image"
# (jsonschema and PyYAML are in requirements/test.txt too, but drf-spectacular needs them.)
for module in pytest pytest_asyncio pytest_django playwright schemathesis ruff fpdf; do
  if as_user python -c "import $module" 2>/dev/null; then
    echo "FAIL: $module is importable" >&2; exit 1
  fi
done
[ ! -e "$work/app/tests" ] || { echo "FAIL: tests/ is in the image" >&2; exit 1; }

echo "--- the compiled embedded backend, as uid 1000"
as_user python - <<'PY'
import os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rmassimo_site.settings")
import django
django.setup()
from llama_cpp import Llama
from core import llm_embedded
model = Llama(model_path=str(llm_embedded.model_path()), n_ctx=256, verbose=False)
out = model("The capital of Italy is", max_tokens=4, temperature=0)
print("embedded model says:", repr(out["choices"][0]["text"]))
PY

echo "--- production settings, as uid 1000"
prod=(env DJANGO_DEBUG=false DJANGO_SECRET_KEY="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
      DJANGO_ALLOWED_HOSTS=127.0.0.1 DJANGO_SECURE_SSL_REDIRECT=false)
as_user "${prod[@]}" python manage.py check --deploy --fail-level ERROR
as_user "${prod[@]}" python manage.py migrate --noinput -v 0

echo "--- run_web serves the login page, as uid 1000"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Not through as_user: a function run in the background is a shell of its own, and $! would
# be that shell, not run_web (which then outlives the kill below).
(cd "$work/app" && exec setpriv --reuid=1000 --regid=1000 --clear-groups "${prod[@]}" \
  python manage.py run_web --processes 2 --port "$port") > "$work/web.log" 2>&1 &
web=$!
code=000
for _ in $(seq 60); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/accounts/login/" || true)
  [ "$code" = 200 ] && break
  sleep 0.5
done
kill -TERM "$web"; wait "$web" || true
[ "$code" = 200 ] || { echo "FAIL: login page answered $code" >&2; tail -20 "$work/web.log" >&2; exit 1; }
echo "OK: the image's steps replay, and the result runs as a non-root user"
