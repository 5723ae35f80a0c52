#!/usr/bin/env bash
# Prints a .env for docker-compose.yml with a fresh random value for every secret:
#
#   bash scripts/make-env.sh rmassimo.example.org > .env
#
# The argument is the public host name the TLS proxy serves (default localhost, with a
# certificate from Caddy's local authority). Keep the file: Postgres, MinIO and Milvus
# take their passwords from it only when their volumes are first created.
set -euo pipefail
domain=${1:-localhost}
# Hex only: the values go into URLs (DATABASE_URL, REDIS_URL) without escaping.
random() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
cat <<ENV
RMASSIMO_DOMAIN=$domain
DJANGO_SECRET_KEY=$(random 32)
POSTGRES_PASSWORD=$(random 16)
REDIS_PASSWORD=$(random 16)
MINIO_ROOT_PASSWORD=$(random 16)
MILVUS_ROOT_PASSWORD=$(random 16)
FLOWER_BASIC_AUTH=admin:$(random 12)
RMASSIMO_METRICS_TOKEN=$(random 24)
GRAFANA_ADMIN_PASSWORD=$(random 12)
ENV
