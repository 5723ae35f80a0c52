"""Metrics without other processes: GPU telemetry through a fake NVML, who may read
/metrics, the exposition's conventions, the alert rules, run_workers' ports."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client
from prometheus_client import CollectorRegistry, generate_latest

from core import gpu_telemetry, metrics
from tests.processes import ROOT
from tests.test_gpus import fake_pynvml
from workers import launcher
from workers.gpus import simulated_gpu

FAKE_NVML = ROOT / "tests" / "fake_nvml" / "pynvml.py"
ALERTS = ROOT / "monitoring" / "prometheus" / "alerts.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "promtool is not installed (Debian package prometheus; scripts/test.sh installs it)"
        )
    return found


@pytest.fixture
def fake_nvml(monkeypatch):
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def scrape(collector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    values = {}
    for family in registry.collect():
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


# --- GPU telemetry ------------------------------------------------------------------------


def test_nvml_telemetry_of_the_worker_s_own_card(fake_nvml):
    values = scrape(gpu_telemetry.NvmlCollector(gpu="gpu0", visible="GPU-fake-0000"))
    card = "{card=0,gpu=gpu0}"
    assert values == {
        f"rmassimo_gpu_utilization_ratio{card}": 0.75,
        f"rmassimo_gpu_memory_used_bytes{card}": 40 * 2**30,
        f"rmassimo_gpu_memory_total_bytes{card}": 80 * 2**30,
        f"rmassimo_gpu_temperature_celsius{card}": 61,
        f"rmassimo_gpu_power_watts{card}": 350.0,
    }


def test_nvml_telemetry_of_a_card_group_skips_a_refused_reading(fake_nvml):
    # No CUDA_VISIBLE_DEVICES: the cards come from the label; card 1 refuses its power.
    values = scrape(gpu_telemetry.NvmlCollector(gpu="gpu0+1", visible=""))
    assert values["rmassimo_gpu_utilization_ratio{card=1,gpu=gpu0+1}"] == 0.2
    assert values["rmassimo_gpu_temperature_celsius{card=0,gpu=gpu0+1}"] == 61
    assert "rmassimo_gpu_power_watts{card=1,gpu=gpu0+1}" not in values
    assert "rmassimo_gpu_power_watts{card=0,gpu=gpu0+1}" in values


def test_without_a_driver_there_is_no_gpu_metric_and_no_error(monkeypatch):
    # The binding without a driver behind it (nvmlInit fails), then no binding at all.
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_error=True))
    assert scrape(gpu_telemetry.NvmlCollector(gpu="gpu0", visible="")) == {}
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert scrape(gpu_telemetry.NvmlCollector(gpu="gpu0", visible="")) == {}


# --- who may read /metrics ----------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_are_for_staff_or_the_token(make_user, settings):
    settings.RMASSIMO_METRICS_TOKEN = "s3cret-token"
    anonymous = Client()
    assert anonymous.get("/metrics").status_code == 401
    assert anonymous.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    user = Client()
    user.force_login(make_user("someone"))
    assert user.get("/metrics").status_code == 403
    staff = Client()
    staff.force_login(make_user("boss", staff=True))
    for response in (
        staff.get("/metrics"),
        anonymous.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token"),
    ):
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/plain")
        text = response.content.decode()
        assert "# TYPE rmassimo_queue_depth gauge" in text
        assert "django_http_requests_total_by_method_total" in text


@pytest.mark.django_db
def test_without_a_token_setting_no_bearer_gets_in(make_user, settings):
    settings.RMASSIMO_METRICS_TOKEN = ""
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 401


# --- conventions and rules ---------------------------------------------------------------


@pytest.mark.django_db
def test_the_exposition_follows_prometheus_conventions():
    metrics.model_call(
        model="m", gpu="gpu9", first_token_s=0.2, prompt_tokens=3, completion_tokens=2, load_s=0
    )
    metrics.milvus_call("search", 0.01, failed=False)
    text = metrics.web_exposition()
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"gen_ai_server_time_to_first_token_seconds_created" not in text
    assert b"gen_ai_server_time_to_first_token_seconds_count" in text


def test_promtool_accepts_the_alert_rules():
    result = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


# --- run_workers ------------------------------------------------------------------------


def test_run_workers_gives_each_worker_a_fixed_port_and_a_clean_directory(tmp_path: Path):
    cpu = launcher.cpu_worker(concurrency=2, metrics_base=9464)
    gpu3 = launcher.gpu_worker(simulated_gpu(3), "http://o:11434", slots=1, metrics_base=9464)
    assert (cpu.metrics_port, gpu3.metrics_port) == (9464, 9468)
    assert launcher.cpu_worker(concurrency=2, metrics_base=0).metrics_port is None

    supervisor = launcher.Supervisor([cpu, gpu3], metrics_root=tmp_path)
    stale = tmp_path / "gpu3" / "counter_123.db"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    env = supervisor.metrics_env(gpu3)
    assert env == {
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "gpu3"),
        "RMASSIMO_METRICS_PORT": "9468",
    }
    assert not stale.exists()
    assert launcher.Supervisor([cpu]).metrics_env(cpu) == {}


def test_recording_is_a_no_op_when_metrics_are_off(monkeypatch):
    monkeypatch.setattr(metrics, "ENABLED", False)
    metrics.ollama_error(server="http://off", status="500")
    metrics.milvus_call("off", 1.0, failed=True)
    assert b"http://off" not in generate_latest(metrics.REGISTRY)
    assert b'operation="off"' not in generate_latest(metrics.REGISTRY)
    monkeypatch.setattr(metrics, "ENABLED", True)
    metrics.milvus_call("on", 1.0, failed=True)
    assert b'rmassimo_milvus_errors_total{operation="on"} 1.0' in generate_latest(metrics.REGISTRY)


def test_a_model_load_is_counted_and_remembered_for_the_fleet_page():
    from workers import fleet

    def loads() -> float:
        return (
            metrics.REGISTRY.get_sample_value(
                "rmassimo_model_load_seconds_count", {"gpu": "gpu7", "model": "big:70b"}
            )
            or 0.0
        )

    since = __import__("time").time() - 1
    metrics.model_call(
        model="big:70b",
        gpu="gpu7",
        first_token_s=9.0,
        prompt_tokens=1,
        completion_tokens=1,
        load_s=metrics.MODEL_LOAD_MIN_S / 2,  # a warm model's few milliseconds: no load
    )
    assert loads() == 0
    metrics.model_call(
        model="big:70b",
        gpu="gpu7",
        first_token_s=9.0,
        prompt_tokens=1,
        completion_tokens=1,
        load_s=8.5,
    )
    assert loads() == 1
    assert [(e["gpu"], e["model"], e["seconds"]) for e in fleet.load_events(since=since)] == [
        ("gpu7", "big:70b", 8.5)
    ]
