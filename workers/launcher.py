"""Builds the command line and environment of each Celery worker, and supervises them."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from workers.gpus import Unit

logger = logging.getLogger(__name__)

_RESTART_BACKOFF_S = (1, 2, 5, 10, 30)
_STABLE_AFTER_S = 60


@dataclass
class WorkerSpec:
    name: str  # celery node name, e.g. gpu0@host
    queues: list[str]
    concurrency: int
    env: dict[str, str] = field(default_factory=dict)
    loglevel: str = "info"
    # Where its metrics are served (None: not served); see metrics_port().
    metrics_port: int | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery",
            "worker",
            "-n",
            self.name,
            "-Q",
            ",".join(self.queues),
            "-c",
            str(self.concurrency),
            "--prefetch-multiplier",
            "1",
            "-l",
            self.loglevel,
            "-E",
            "--without-gossip",
            "--without-mingle",
        ]


def metrics_port(base: int | None, gpu: Unit | None) -> int | None:
    """The CPU worker serves its metrics on `base`, card N's worker on base + 1 + N (a card
    group's, on its first card's): fixed ports, so a scrape config can name them without
    discovery."""
    if not base:
        return None
    return base if gpu is None else base + 1 + gpu.index


def pinned_queue(gpu: Unit, host: str) -> str:
    """The queue of work for this one worker: `gpu.<cards>@<host>` (`gpu.2+3@host` for a
    group), unique across hosts, since card 1 of one host is not card 1 of another."""
    return f"gpu.{gpu.label.removeprefix('gpu')}@{host}"


def gpu_worker(
    gpu: Unit,
    ollama_url: str,
    *,
    slots: int,
    loglevel: str = "info",
    metrics_base: int | None = None,
) -> WorkerSpec:
    host = socket.gethostname()
    name = f"{gpu.label}@{host}"
    return WorkerSpec(
        name=name,
        queues=["interactive", "batch", pinned_queue(gpu, host)],
        concurrency=slots,
        loglevel=loglevel,
        metrics_port=metrics_port(metrics_base, gpu),
        env={
            "CUDA_VISIBLE_DEVICES": gpu.cuda_visible_devices,
            "RMASSIMO_WORKER_GPU": gpu.label,
            "RMASSIMO_WORKER_NAME": name,
            "RMASSIMO_OLLAMA_URL": ollama_url,
        },
    )


def cpu_worker(
    *, concurrency: int, loglevel: str = "info", metrics_base: int | None = None
) -> WorkerSpec:
    name = f"cpu@{socket.gethostname()}"
    return WorkerSpec(
        name=name,
        queues=["cpu"],
        concurrency=concurrency,
        loglevel=loglevel,
        metrics_port=metrics_port(metrics_base, None),
        # The CPU worker never runs a model: keep any CUDA library away from the cards.
        env={
            "CUDA_VISIBLE_DEVICES": "",
            "RMASSIMO_WORKER_GPU": "cpu",
            "RMASSIMO_WORKER_NAME": name,
        },
    )


def housekeeping_worker(*, loglevel: str = "info") -> WorkerSpec:
    """The reapers' own worker: nothing else is queued for it, so a parsing backlog on the
    CPU worker cannot delay recovery."""
    name = f"housekeeping@{socket.gethostname()}"
    return WorkerSpec(
        name=name,
        queues=["housekeeping"],
        concurrency=1,
        loglevel=loglevel,
        env={
            "CUDA_VISIBLE_DEVICES": "",
            "RMASSIMO_WORKER_GPU": "cpu",
            "RMASSIMO_WORKER_NAME": name,
        },
    )


@dataclass
class BeatSpec(WorkerSpec):
    """celery beat, which sends the periodic tasks (the reapers)."""

    schedule: str = ""

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "celery", "-A", "workers.celery", "beat", "-l", self.loglevel]
        return [*argv, "-s", self.schedule] if self.schedule else argv


def beat(*, schedule: Path, loglevel: str = "info") -> BeatSpec:
    return BeatSpec(
        name=f"beat@{socket.gethostname()}",
        queues=[],
        concurrency=1,
        loglevel=loglevel,
        schedule=str(schedule),
    )


class Supervisor:
    """Runs the workers, restarts one that dies, and shuts all down warmly on SIGTERM/SIGINT."""

    def __init__(
        self, specs: list[WorkerSpec], *, out=sys.stdout, metrics_root: Path | None = None
    ) -> None:
        self.specs = specs
        self.out = out
        self.metrics_root = metrics_root
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_at: dict[str, float] = {}
        self.restarts: dict[str, int] = {}
        self.stopping = False

    def _say(self, message: str) -> None:
        self.out.write(f"[run_workers] {message}\n")
        self.out.flush()

    def metrics_env(self, spec: WorkerSpec) -> dict[str, str]:
        """A worker's metrics: its port, and a multiprocess directory of its own, emptied
        at each start (its processes' files are summed by its main process)."""
        if spec.metrics_port is None or self.metrics_root is None:
            return {}
        directory = self.metrics_root / spec.name.split("@")[0]
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        return {
            "PROMETHEUS_MULTIPROC_DIR": str(directory),
            "RMASSIMO_METRICS_PORT": str(spec.metrics_port),
        }

    def _start(self, spec: WorkerSpec) -> None:
        env = {**os.environ, **spec.env, **self.metrics_env(spec)}
        self.procs[spec.name] = subprocess.Popen(spec.argv(), env=env)
        self.started_at[spec.name] = time.monotonic()
        metrics = f", metrics on port {spec.metrics_port}" if "RMASSIMO_METRICS_PORT" in env else ""
        self._say(
            f"started {spec.name} (pid {self.procs[spec.name].pid}) on queues "
            f"{','.join(spec.queues)}{metrics}"
        )

    def _stop(self, signum, frame) -> None:  # noqa: ARG002
        if self.stopping:
            # A second Ctrl-C: cold shutdown.
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGQUIT)
            return
        self.stopping = True
        self._say("warm shutdown: letting running jobs finish")
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for spec in self.specs:
            self._start(spec)
        due: dict[str, float] = {}
        while True:
            if self.stopping:
                for proc in self.procs.values():
                    proc.wait()
                self._say("all workers stopped")
                return
            for spec in self.specs:
                proc = self.procs[spec.name]
                if proc.poll() is None:
                    continue
                if spec.name not in due:
                    if time.monotonic() - self.started_at[spec.name] > _STABLE_AFTER_S:
                        self.restarts[spec.name] = 0
                    attempt = self.restarts.get(spec.name, 0)
                    delay = _RESTART_BACKOFF_S[min(attempt, len(_RESTART_BACKOFF_S) - 1)]
                    self.restarts[spec.name] = attempt + 1
                    due[spec.name] = time.monotonic() + delay
                    self._say(f"{spec.name} exited with {proc.returncode}; restarting in {delay}s")
                elif time.monotonic() >= due[spec.name]:
                    del due[spec.name]
                    self._start(spec)
            time.sleep(0.2)
