# syntax=docker/dockerfile:1
#
# Two stages: `build` compiles what has no binary wheel (llama-cpp-python) into a
# virtualenv; the runtime stage copies that virtualenv and nothing else from it, so the
# image carries no compiler and no test tools (requirements/test.txt is never installed).

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Portable CPU code: the image may run on another CPU than the one that built it
    # (llama.cpp otherwise compiles for the build machine's instruction set).
    CMAKE_ARGS="-DGGML_NATIVE=OFF"

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build
COPY requirements/runtime.txt requirements/embedded.txt requirements/
# llama-index-embeddings-ollama lists pytest-asyncio among its own dependencies, which
# brings pytest; nothing in the service imports either, and the image carries no test
# runner (scripts/replay-image.sh replays this line and checks it).
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -r requirements/runtime.txt -r requirements/embedded.txt \
    && /opt/venv/bin/pip uninstall -y pytest-asyncio pytest iniconfig


FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# libgomp1: the OpenMP runtime llama.cpp is linked against (not in the slim image).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 1000 rmassimo \
    && useradd --system --uid 1000 --gid 1000 --home-dir /app rmassimo

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
COPY . .

# The app code stays root-owned and read-only to the service user; only var/ (static
# files, uploaded documents, backups) is written at run time.
RUN python manage.py collectstatic --noinput \
    && mkdir -p var/media var/backups \
    && chown -R rmassimo:rmassimo var

# By number: Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 1000:1000
EXPOSE 8000

CMD ["sh", "-c", "python manage.py migrate --noinput && exec python manage.py run_web --host 0.0.0.0 --port 8000"]
