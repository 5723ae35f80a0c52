"""manage.py run_workers: one Celery worker per GPU, plus the CPU worker, supervised."""

import argparse
import os

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from workers import gpus, launcher


def _cards(value: str) -> tuple[int, ...]:
    parts = value.split("+")
    if not all(part.strip().isdigit() and part.strip().isascii() for part in parts):
        raise argparse.ArgumentTypeError(f"{value!r} is not a card index (2) or group (2+3)")
    indexes = tuple(sorted({int(part) for part in parts}))
    if len(indexes) != len(parts):
        raise argparse.ArgumentTypeError(f"{value!r} names a card twice")
    return indexes


class Command(BaseCommand):
    help = (
        "Start one Celery worker per GPU or card group (each bound to its cards' Ollama) and "
        "the CPU worker; restart any that dies; SIGTERM or Ctrl-C shuts them down warmly."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--gpu",
            type=_cards,
            default=None,
            help=(
                "Run only the worker of host card N, or of the card group N+M "
                "(one container per card or group)."
            ),
        )
        parser.add_argument("--cpu-only", action="store_true", help="Run only the CPU worker.")
        parser.add_argument("--no-cpu", action="store_true", help="Do not run the CPU worker.")
        parser.add_argument(
            "--no-beat",
            action="store_true",
            help="Another host runs the schedule (celery beat): do not run it with the CPU "
            "worker here.",
        )
        parser.add_argument(
            "--slots",
            type=int,
            default=settings.RMASSIMO_GPU_SLOTS,
            help="Jobs at once per GPU (default RMASSIMO_GPU_SLOTS or 1).",
        )
        parser.add_argument("--loglevel", default="info")
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=settings.RMASSIMO_METRICS_PORT,
            help="Serve the CPU worker's metrics on this port and card N's worker's on "
            "port + 1 + N (default RMASSIMO_METRICS_PORT or 9464; 0: not served).",
        )

    def handle(self, *args, **options):
        loglevel = options["loglevel"]
        metrics_base = options["metrics_port"] if settings.RMASSIMO_METRICS else 0
        specs = []
        if not options["cpu_only"]:
            specs.extend(
                self._gpu_specs(options["gpu"], options["slots"], loglevel, metrics_base)
            )
        if options["cpu_only"] or not (options["no_cpu"] or options["gpu"] is not None):
            specs.append(
                launcher.cpu_worker(
                    concurrency=settings.RMASSIMO_CPU_CONCURRENCY,
                    loglevel=loglevel,
                    metrics_base=metrics_base,
                )
            )
            # With the CPU worker: the reapers' own worker, and (unless another host runs
            # it) the schedule that sends them, so recovery needs nothing else started.
            specs.append(launcher.housekeeping_worker(loglevel=loglevel))
            if not options["no_beat"]:
                specs.append(
                    launcher.beat(
                        schedule=settings.VAR_DIR / "celerybeat-schedule", loglevel=loglevel
                    )
                )
        if not specs:
            raise CommandError("Nothing to run: RMASSIMO_GPUS names no GPU and --no-cpu was given.")
        launcher.Supervisor(
            specs, out=self.stdout, metrics_root=settings.VAR_DIR / "metrics"
        ).run()

    def _gpu_specs(
        self, only: tuple[int, ...] | None, slots: int, loglevel: str, metrics_base: int
    ):
        try:
            if only is not None:
                found = [gpus.pinned_group(only)]
            else:
                found = gpus.discover_gpus(settings.RMASSIMO_GPUS)
                if not found and gpus.parse_spec(settings.RMASSIMO_GPUS) == 0:
                    # Asked for by name: a host that only parses and chunks.
                    self.stdout.write(
                        f"RMASSIMO_GPUS={settings.RMASSIMO_GPUS}: no GPU worker on this host."
                    )
                    return []
            simulated_cpu = not found
            if simulated_cpu:
                found = [gpus.simulated_gpu(0)]
            urls = gpus.ollama_urls_for(
                found,
                settings.OLLAMA_URLS if only is None else settings.OLLAMA_URLS[:1],
                settings.RMASSIMO_OLLAMA_URL_TEMPLATE or None,
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if simulated_cpu:
            self.stdout.write(
                self.style.WARNING(
                    "No GPU found (NVML reports none and RMASSIMO_GPUS is not set): running one "
                    f"worker, gpu0, against {urls[0]}."
                )
            )
        else:
            self.stdout.write("GPUs:\n" + gpus.describe(found))
        if len(found) > 1 and len(set(urls.values())) == 1:
            self.stdout.write(
                self.style.WARNING(
                    f"All {len(found)} GPU workers share one Ollama ({urls[found[0].index]}); set "
                    "OLLAMA_URLS to one URL per GPU so each card has its own server."
                )
            )
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        return [
            launcher.gpu_worker(
                g, urls[g.index], slots=slots, loglevel=loglevel, metrics_base=metrics_base
            )
            for g in found
        ]
