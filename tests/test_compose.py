"""docker-compose.yml checked without a Docker engine: the Compose schema, then the GPU
pinning rules that the schema cannot express."""

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

HERE = Path(__file__).resolve().parent
COMPOSE_FILE = HERE.parent / "docker-compose.yml"
SCHEMA = HERE / "schemas" / "compose-spec.json"
# ollama-gpu2, worker-gpu2; a card group: ollama-gpu2-3, worker-gpu2-3 (run_workers --gpu 2+3)
GPU_SERVICE = re.compile(r"(ollama|worker)-gpu(\d+(?:-\d+)*)$")


def load_compose() -> dict:
    # safe_load resolves the `<<` merge keys, as Compose does before validating.
    with COMPOSE_FILE.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def compose():
    return load_compose()


@pytest.fixture(scope="module")
def schema():
    # Kept in the repository (tests/schemas/README.md): these checks never skip.
    return json.loads(SCHEMA.read_text(encoding="utf-8"))


def schema_problems(compose: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    ]


def _devices(service: dict) -> list[dict]:
    deploy = service.get("deploy") or {}
    reservations = (deploy.get("resources") or {}).get("reservations") or {}
    return reservations.get("devices") or []


def _device_ids(service: dict) -> list[str]:
    return [str(i) for device in _devices(service) for i in device.get("device_ids") or []]


def _environment(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def _command(service: dict) -> str:
    command = service.get("command") or ""
    return " ".join(command) if isinstance(command, list) else str(command)


def _depends_on(service: dict) -> dict[str, str]:
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):
        return dict.fromkeys(depends_on, "service_started")
    return {
        name: (options or {}).get("condition", "service_started")
        for name, options in depends_on.items()
    }


def _seconds(duration) -> float:
    """A Compose duration ("6m", "1m30s", "330s") in seconds; Compose's default is 10 s."""
    if duration is None:
        return 10.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(duration))
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(float(value) * unit[name] for value, name in parts)


def _published(service: dict) -> list[str]:
    # Short syntax only ("host_ip:host:container"), as this file writes them.
    return [str(port) for port in service.get("ports") or []]


# Longest warm shutdown of a worker: RMASSIMO_ANSWER_TIME_LIMIT (300 s) + Celery's 30 s.
WARM_SHUTDOWN_S = 330


def operations_problems(compose: dict) -> list[str]:
    """What breaks the operations rules of docs/deploy.md (proxy, secrets, shutdown)."""
    problems: list[str] = []
    services: dict = compose.get("services") or {}
    proxy = services.get("proxy")
    if proxy is None:
        problems.append("no proxy service")
    elif not any(port.endswith(":443") for port in _published(proxy)):
        problems.append("proxy does not publish port 443")
    for name, service in services.items():
        if name == "proxy":
            continue
        for port in _published(service):
            # "8000:8000" or "0.0.0.0:..." listens on every interface, beside the proxy.
            if port.count(":") < 2 or port.startswith(("0.0.0.0:", "[::]:")):
                problems.append(f"{name} publishes {port} on every interface")
    if _published(services.get("web") or {}):
        problems.append("web publishes a port: only the proxy may reach it")
    environment = _environment(services.get("web") or {})
    for variable in ("DJANGO_ALLOWED_HOSTS", "DJANGO_CSRF_TRUSTED_ORIGINS"):
        if "RMASSIMO_DOMAIN" not in environment.get(variable, ""):
            problems.append(f"web does not derive {variable} from RMASSIMO_DOMAIN")
    if "https://" not in environment.get("DJANGO_CSRF_TRUSTED_ORIGINS", ""):
        problems.append("web does not trust the https origin for CSRF")
    if "minioadmin" in json.dumps(compose):
        problems.append("MinIO's default credentials are used")
    required = {
        ("minio", "MINIO_ROOT_PASSWORD"),
        ("milvus", "MINIO_SECRET_ACCESS_KEY"),
        ("milvus", "COMMON_SECURITY_DEFAULTROOTPASSWORD"),
        ("postgres", "POSTGRES_PASSWORD"),
        ("flower", "FLOWER_BASIC_AUTH"),
        ("grafana", "GF_SECURITY_ADMIN_PASSWORD"),
        ("web", "RMASSIMO_METRICS_TOKEN"),
    }
    for name, variable in sorted(required):
        value = _environment(services.get(name) or {}).get(variable, "")
        if not (value.startswith("${") and ":?" in value):
            problems.append(f"{name} does not require {variable} from the environment")
    milvus = _environment(services.get("milvus") or {})
    if milvus.get("COMMON_SECURITY_AUTHORIZATIONENABLED") != "true":
        problems.append("milvus does not require clients to sign in")
    if "--requirepass" not in _command(services.get("redis") or {}):
        problems.append("redis does not require a password")
    for name, service in services.items():
        grace = _seconds(service.get("stop_grace_period"))
        if name.startswith("worker-") and grace < WARM_SHUTDOWN_S:
            problems.append(
                f"{name} is killed {grace:g} s after SIGTERM, "
                f"before a warm shutdown ({WARM_SHUTDOWN_S} s)"
            )
    return problems


def compose_problems(compose: dict) -> list[str]:
    """What breaks the deployment rules in docs/deploy.md; [] when all hold."""
    problems: list[str] = []
    services: dict = compose.get("services") or {}
    ollamas: dict[str, dict] = {}
    workers: dict[str, dict] = {}
    for name, service in services.items():
        match = GPU_SERVICE.match(name)
        if match:
            kind, index = match.group(1), match.group(2)
            (ollamas if kind == "ollama" else workers)[index] = service

    if not workers:
        problems.append("no worker-gpu<N> service")

    card_owner: dict[str, str] = {}
    for index, ollama in sorted(ollamas.items()):
        name = f"ollama-gpu{index}"
        ids = _device_ids(ollama)
        cards = index.split("-")
        if ids != cards:
            wanted = "exactly one" if len(cards) == 1 else f"cards {cards}"
            problems.append(f"{name} reserves {len(ids)} devices {ids}, not {wanted}")
        for device in _devices(ollama):
            if device.get("driver") != "nvidia" or "gpu" not in (device.get("capabilities") or []):
                problems.append(f"{name} reserves a device that is not an nvidia gpu: {device}")
        for card in ids:
            if card in card_owner:
                problems.append(f"card {card} is reserved by both {card_owner[card]} and {name}")
            card_owner[card] = name
        environment = _environment(ollama)
        if environment.get("OLLAMA_NUM_PARALLEL") != "1":
            problems.append(f"{name} does not set OLLAMA_NUM_PARALLEL=1")
        if environment.get("OLLAMA_KEEP_ALIVE") != "-1":
            problems.append(f"{name} does not set OLLAMA_KEEP_ALIVE=-1")
        if index not in workers:
            problems.append(f"{name} has no worker-gpu{index}")

    for index, worker in sorted(workers.items()):
        name = f"worker-gpu{index}"
        ollama = ollamas.get(index)
        if ollama is None:
            problems.append(f"{name} has no ollama-gpu{index}")
        elif _device_ids(worker) != _device_ids(ollama):
            problems.append(
                f"{name} reserves {_device_ids(worker)} but ollama-gpu{index} reserves "
                f"{_device_ids(ollama)}"
            )
        urls = _environment(worker).get("OLLAMA_URLS")
        if urls != f"http://ollama-gpu{index}:11434":
            problems.append(
                f"{name} calls OLLAMA_URLS={urls!r}, not http://ollama-gpu{index}:11434"
            )
        cards = index.replace("-", "+")
        if not re.search(rf"run_workers --gpu {re.escape(cards)}(?![+\d])", _command(worker)):
            problems.append(f"{name} does not run `manage.py run_workers --gpu {cards}`")
        depends_on = _depends_on(worker)
        if depends_on.get("models") != "service_completed_successfully":
            problems.append(f"{name} does not wait for the models service to complete")
        if f"ollama-gpu{index}" not in depends_on:
            problems.append(f"{name} does not depend on ollama-gpu{index}")

    for required in ("postgres", "redis", "milvus", "web", "worker-cpu", "beat", "flower"):
        if required not in services:
            problems.append(f"no {required} service")

    redis = services.get("redis") or {}
    if not re.search(r"--appendonly\s+yes", _command(redis)):
        problems.append("redis does not run with --appendonly yes")

    models = services.get("models")
    if models is None:
        problems.append("no models service")
    else:
        if str(models.get("restart")) != "no":
            problems.append("models is not a one-shot service (restart: 'no')")
        if not str(models.get("image", "")).startswith("ollama/ollama"):
            problems.append("models does not use the ollama/ollama image")
        if "ollama pull" not in _command(models):
            problems.append("models does not pull anything")

    if "run_workers --cpu-only" not in _command(services.get("worker-cpu") or {}):
        problems.append("worker-cpu does not run `manage.py run_workers --cpu-only`")
    if "beat" not in _command(services.get("beat") or {}):
        problems.append("beat does not run celery beat")
    if "run_web" not in _command(services.get("web") or {}):
        problems.append("web does not serve the ASGI app with `manage.py run_web` (daphne)")

    for name, service in services.items():
        environment = _environment(service)
        if "DATABASE_URL" in environment and "DJANGO_SECRET_KEY" not in environment:
            problems.append(f"{name} has the app environment without DJANGO_SECRET_KEY")
        secret = environment.get("DJANGO_SECRET_KEY")
        if secret is not None and not secret.startswith("${DJANGO_SECRET_KEY:?"):
            problems.append(f"{name} does not require DJANGO_SECRET_KEY from the environment")
        for dependency in _depends_on(service):
            if dependency not in services:
                problems.append(f"{name} depends on {dependency}, which is not a service")
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source")
            looks_named = source and not source.startswith((".", "/", "~", "$"))
            if looks_named and source not in (compose.get("volumes") or {}):
                problems.append(f"{name} mounts volume {source}, which is not declared")
    return problems


# --- the file ---------------------------------------------------------------------------


def test_compose_file_matches_the_compose_schema(compose, schema):
    assert schema_problems(compose, schema) == []


def test_compose_file_follows_the_deployment_rules(compose):
    assert compose_problems(compose) == []


def test_compose_file_follows_the_operations_rules(compose):
    assert operations_problems(compose) == []


def test_there_is_at_least_one_card_and_the_cards_are_numbered_from_zero(compose):
    workers = sorted(
        int(card)
        for m in map(GPU_SERVICE.match, compose["services"])
        if m and m.group(1) == "worker"
        for card in m.group(2).split("-")
    )
    assert workers == list(range(len(workers))) and workers


def with_the_card_group_example() -> dict:
    """docker-compose.yml with its commented two-card Ollama and worker switched on."""
    lines, inside = [], False
    for line in COMPOSE_FILE.read_text(encoding="utf-8").splitlines():
        if line in ("  # ollama-gpu2-3:", "  # worker-gpu2-3:"):
            inside = True
        elif not line.startswith("  #   "):
            inside = False
        lines.append("  " + line[4:] if inside else line)
    return yaml.safe_load("\n".join(lines))


def test_the_card_group_example_follows_the_rules():
    compose = with_the_card_group_example()
    assert {"ollama-gpu2-3", "worker-gpu2-3"} <= set(compose["services"])
    assert compose_problems(compose) == []
    worker = compose["services"]["worker-gpu2-3"]
    assert _device_ids(worker) == ["2", "3"]
    assert "run_workers --gpu 2+3" in _command(worker)


def test_every_ollama_shares_one_model_volume(compose):
    ollamas = [s for n, s in compose["services"].items() if n.startswith("ollama-gpu")]
    assert all("ollama-models:/root/.ollama" in s["volumes"] for s in ollamas)


# --- the checks themselves can fail -----------------------------------------------------


def test_a_worker_on_another_card_than_its_ollama_is_reported(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["worker-gpu1"]["deploy"]["resources"]["reservations"]["devices"][0][
        "device_ids"
    ] = ["0"]
    assert "worker-gpu1 reserves ['0'] but ollama-gpu1 reserves ['1']" in compose_problems(broken)


def test_a_card_reserved_by_two_ollamas_is_reported(compose):
    broken = copy.deepcopy(compose)
    for name in ("ollama-gpu1", "worker-gpu1"):
        broken["services"][name]["deploy"]["resources"]["reservations"]["devices"][0][
            "device_ids"
        ] = ["0"]
    assert "card 0 is reserved by both ollama-gpu0 and ollama-gpu1" in compose_problems(broken)


def test_an_ollama_with_two_cards_is_reported(compose):
    broken = copy.deepcopy(compose)
    devices = broken["services"]["ollama-gpu0"]["deploy"]["resources"]["reservations"]["devices"]
    devices[0]["device_ids"] = ["0", "2"]
    assert any("ollama-gpu0 reserves 2 devices" in p for p in compose_problems(broken))


def test_a_worker_calling_the_wrong_ollama_is_reported(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["worker-gpu0"]["environment"]["OLLAMA_URLS"] = "http://ollama-gpu1:11434"
    assert any("worker-gpu0 calls OLLAMA_URLS" in p for p in compose_problems(broken))


def test_missing_pieces_are_reported(compose):
    broken = copy.deepcopy(compose)
    del broken["services"]["ollama-gpu1"]
    del broken["services"]["flower"]
    broken["services"]["redis"]["command"] = ["redis-server"]
    broken["services"]["models"]["restart"] = "always"
    problems = compose_problems(broken)
    for expected in (
        "worker-gpu1 has no ollama-gpu1",
        "no flower service",
        "redis does not run with --appendonly yes",
        "models is not a one-shot service (restart: 'no')",
        "worker-gpu1 depends on ollama-gpu1, which is not a service",
    ):
        assert expected in problems


def test_a_schema_violation_is_reported(compose, schema):
    broken = copy.deepcopy(compose)
    broken["services"]["web"]["ports"] = "8000:8000"
    broken["services"]["web"]["restrat"] = "always"
    problems = schema_problems(broken, schema)
    assert any(p.startswith("services/web/ports") for p in problems)
    assert any("restrat" in p for p in problems)


def test_operations_rules_report_what_an_operator_would_trip_on(compose):
    broken = copy.deepcopy(compose)
    services = broken["services"]
    services["web"]["ports"] = ["8000:8000"]
    services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] = "minioadmin"
    services["milvus"]["environment"]["COMMON_SECURITY_AUTHORIZATIONENABLED"] = "false"
    services["redis"]["command"] = ["redis-server", "--appendonly", "yes"]
    del services["flower"]["environment"]
    services["worker-gpu0"]["stop_grace_period"] = "10s"
    del services["worker-cpu"]["stop_grace_period"]
    services["web"]["environment"]["DJANGO_CSRF_TRUSTED_ORIGINS"] = "http://localhost"
    del services["proxy"]
    problems = operations_problems(broken)
    for expected in (
        "no proxy service",
        "web publishes 8000:8000 on every interface",
        "web publishes a port: only the proxy may reach it",
        "web does not derive DJANGO_CSRF_TRUSTED_ORIGINS from RMASSIMO_DOMAIN",
        "web does not trust the https origin for CSRF",
        "MinIO's default credentials are used",
        "minio does not require MINIO_ROOT_PASSWORD from the environment",
        "milvus does not require clients to sign in",
        "redis does not require a password",
        "flower does not require FLOWER_BASIC_AUTH from the environment",
        "worker-gpu0 is killed 10 s after SIGTERM, before a warm shutdown (330 s)",
        "worker-cpu is killed 10 s after SIGTERM, before a warm shutdown (330 s)",
    ):
        assert expected in problems


def test_make_env_writes_every_variable_compose_requires():
    import subprocess

    required = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", COMPOSE_FILE.read_text()))
    written = subprocess.run(
        ["bash", str(HERE.parent / "scripts" / "make-env.sh"), "rmassimo.example.org"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    values = dict(line.split("=", 1) for line in written.splitlines())
    assert required - set(values) == set()
    # The passwords go into URLs (DATABASE_URL, REDIS_URL) unescaped.
    assert all(
        re.fullmatch(r"[0-9a-f]{24,}", values[name]) for name in required - {"FLOWER_BASIC_AUTH"}
    )
    assert values["RMASSIMO_DOMAIN"] == "rmassimo.example.org"
