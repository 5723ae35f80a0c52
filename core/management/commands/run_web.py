"""manage.py run_web: several daphne processes serving the ASGI app on one port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from workers import launcher


@dataclass
class WebSpec:
    name: str
    fd: int
    proxy_headers: bool
    env: dict[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        # Twisted adopts the inherited socket (daphne's "fd:" endpoint, IPv4 only).
        argv = [sys.executable, "-m", "daphne", "--fd", str(self.fd)]
        if self.proxy_headers:
            argv.append("--proxy-headers")
        module, _, attribute = settings.ASGI_APPLICATION.rpartition(".")
        return [*argv, f"{module}:{attribute}"]


class WebSupervisor(launcher.Supervisor):
    """The workers' supervisor, for daphne processes that inherit one listening socket."""

    def _say(self, message: str) -> None:
        self.out.write(f"[run_web] {message}\n")
        self.out.flush()

    def _start(self, spec: WebSpec) -> None:
        old = self.procs.get(spec.name)
        if old is not None and spec.env.get("PROMETHEUS_MULTIPROC_DIR"):
            # Its open-websocket gauge must not be summed after it died.
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(old.pid, spec.env["PROMETHEUS_MULTIPROC_DIR"])
        self.procs[spec.name] = subprocess.Popen(
            spec.argv(), pass_fds=(spec.fd,), env={**os.environ, **spec.env}
        )
        self.started_at[spec.name] = time.monotonic()
        self._say(f"started {spec.name} (pid {self.procs[spec.name].pid})")


class Command(BaseCommand):
    help = (
        "Serve the site with several daphne processes listening on one port (the kernel "
        "spreads new connections evenly over them); restart any that dies; SIGTERM "
        "or Ctrl-C stops them all."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--processes",
            type=int,
            default=settings.RMASSIMO_WEB_PROCESSES,
            help="daphne processes (default RMASSIMO_WEB_PROCESSES or 1). Each is one event "
            "loop on one core: more than the host's cores buys nothing.",
        )
        parser.add_argument(
            "--proxy-headers",
            action="store_true",
            help="Take the client address from X-Forwarded-For (behind a trusted proxy only).",
        )

    def handle(self, *args, **options):
        if options["processes"] < 1:
            raise CommandError("--processes must be 1 or more.")
        if ":" in options["host"]:
            # daphne adopts an inherited socket as IPv4 only.
            raise CommandError("--host must be an IPv4 address or name (e.g. 0.0.0.0).")
        # First a plain bind, which fails if anything listens there already: SO_REUSEPORT
        # alone would let a second run_web on the port quietly take half of the traffic.
        self._listen(options["host"], options["port"], reuse_port=False).close()
        # One listening socket per process, all bound to the port with SO_REUSEPORT: the
        # kernel spreads new connections evenly over them. With one socket shared by all,
        # the process that wakes first accepts the whole backlog (Twisted accepts up to a
        # hundred at a time), and kept-alive clients then stay on it while the others idle.
        # Each socket stays open here too, so connections that arrive while its process is
        # being restarted wait in its backlog instead of being refused.
        listeners = [
            self._listen(options["host"], options["port"]) for _ in range(options["processes"])
        ]
        self.stdout.write(
            f"Serving on http://{options['host']}:{options['port']}/ with "
            f"{options['processes']} daphne process(es)"
        )
        specs = [
            WebSpec(
                name=f"web{i}",
                fd=listener.fileno(),
                proxy_headers=options["proxy_headers"],
                env=self._metrics_env(),
            )
            for i, listener in enumerate(listeners)
        ]
        code = WebSupervisor(specs, out=self.stdout).run()
        for listener in listeners:
            listener.close()
        if code:
            raise CommandError("web processes stopped with errors", returncode=code)

    def _listen(self, host: str, port: int, *, reuse_port: bool = True) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            listener.bind((host, port))
        except OSError as exc:
            listener.close()
            raise CommandError(f"Cannot listen on {host}:{port}: {exc}") from exc
        # Many clients connect at once under load: a short backlog would refuse some.
        listener.listen(1024)
        listener.set_inheritable(True)
        return listener

    def _metrics_env(self) -> dict[str, str]:
        """One multiprocess directory for all the daphne processes, emptied at start: a
        scrape of /metrics reaches one of them, which answers for all (core/metrics.py)."""
        if not settings.RMASSIMO_METRICS:
            return {}
        directory = settings.VAR_DIR / "metrics" / "web"
        if not getattr(self, "_metrics_dir_ready", False):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            self._metrics_dir_ready = True
        return {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
