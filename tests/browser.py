"""The real ASGI server (daphne) in a subprocess, and the headless Chromium the browser
tests drive. Fixtures here are imported by the test modules that use them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import ROOT, free_port, port_open, stop, wait_for, worker_env

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class Daphne:
    """``daphne rmassimo_site.asgi:application`` on a free port, with the tests' DB and Redis."""

    def __init__(self, *, log_dir: Path, extra_env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.log = log_dir / f"daphne-{self.port}.log"
        env = worker_env(**(extra_env or {}))
        # Set for the browser tests' own process only: the server must keep Django's check.
        env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                "rmassimo_site.asgi:application",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._ready, timeout=60, interval=0.1, what="daphne to listen")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"daphne exited:\n{self.output()[-3000:]}")
        return port_open("127.0.0.1", self.port)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 15) -> None:
        stop(self.proc, timeout)


@pytest.fixture(scope="module")
def web_server(django_db_setup, django_db_blocker, var_dir, ollama):
    """The real ASGI app served by daphne, on the test database (stopped before it is dropped),
    pointed at the session's Ollama stand-in like the worker."""
    with django_db_blocker.unblock():
        server = Daphne(
            log_dir=var_dir / "logs",
            extra_env={"OLLAMA_URLS": ollama.url, "RMASSIMO_OLLAMA_URL": ollama.url},
        )
    yield server
    server.stop()


def launch_chromium(playwright):
    """Debian's Chromium driven by Playwright; no browser is downloaded."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium. Fails (not skips) when it cannot start, unless
    RMASSIMO_SKIP_BROWSER=1 says this machine has no browser on purpose."""
    if os.environ.get("RMASSIMO_SKIP_BROWSER") == "1":
        pytest.skip("RMASSIMO_SKIP_BROWSER=1")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(
            f"the playwright package is missing ({exc}); pip install -r requirements/test.txt"
        )
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    # Playwright's sync API keeps an event loop set on this thread; the ORM calls these tests
    # make between browser steps are plain blocking calls, not coroutines.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    playwright = sync_playwright().start()
    try:
        try:
            browser = launch_chromium(playwright)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"Chromium did not start: {exc}")
        ARTIFACTS.mkdir(exist_ok=True)
        yield browser
        browser.close()
    finally:
        playwright.stop()
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous
