"""A real ``prefect server start`` on loopback, shared by the tests that need what the temporary test server
lacks: deployments and their triggers (the automation services), process workers, and the UI.

Registered as a pytest plugin in ``tests/conftest.py``; starting it takes 15-30 s here, so it is one per
session and only started when a test asks for ``live_server``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text() if log else ''}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")


@dataclass
class LiveServer:
    """A running Prefect server: its UI and API URLs, its PREFECT_HOME, and env for subprocesses. With ``auth``
    (``PREFECT_SERVER_API_AUTH_STRING`` of the server) its clients send that string (``PREFECT_API_AUTH_STRING``)."""

    url: str
    home: Path
    log: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    auth: str | None = None

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess talking to this server (CLI, worker, flow runs)."""
        # Prefect's settings are this server's; a hub token is never needed offline, and one inherited from the
        # test process would hide whether a run read it from its Secret block (tests/ops/test_shared_server.py).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "HF_TOKEN"}
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        )
        if self.auth is not None:
            env["PREFECT_API_AUTH_STRING"] = self.auth
        env.update(extra)
        return env

    @contextmanager
    def connected(self, settings: dict | None = None) -> Iterator[None]:
        """Talk to this server from this process (flow runs, events, logs), then to whatever came before.

        Prefect's event and log workers are per-process singletons bound to the API they first talked to
        (the flow tests' temporary server, say); they are drained on the way in and out so they reconnect.
        """
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        def reconnect() -> None:
            EventsWorker.drain_all()
            APILogWorker.drain_all()

        reconnect()
        try:
            with temporary_settings(
                {PREFECT_API_URL: self.api_url, PREFECT_API_AUTH_STRING: self.auth, **(settings or {})}
            ):
                yield
                reconnect()  # deliver this server's events and logs while it is still the API
        finally:
            reconnect()

    def spawn(self, args: list[str], log: Path, **env: str) -> subprocess.Popen:
        """Start a long-running subprocess (e.g. a worker) that is stopped with the server."""
        handle = open(log, "ab")  # noqa: SIM115 - closed when the process ends
        process = subprocess.Popen(
            args, cwd=REPO, env=self.env(**env), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(process)
        return process

    def cli(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        """Run a ``prefect`` CLI command against this server; raise with its output if it fails."""
        done = subprocess.run(
            [PREFECT, *args], cwd=REPO, env=self.env(**env), capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done


def stop(process: subprocess.Popen) -> None:
    """Stop a process this fixture started (and its children, in its own session)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def serving(home: Path, auth: str | None = None) -> Iterator[LiveServer]:
    """``prefect server start`` on a free loopback port with ``home`` as its PREFECT_HOME (SQLite database), and
    basic authentication when ``auth`` is given; stopped, with every process spawned through it, on the way out."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = LiveServer(url=url, home=home, log=home / "server.log", auth=auth)
    # The UI must be told where the API is when it is not on the default port 4200.
    extra = {"PREFECT_SERVER_UI_API_URL": server.api_url}
    if auth is not None:
        extra["PREFECT_SERVER_API_AUTH_STRING"] = auth
    process = server.spawn(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server.log, **extra
    )
    try:
        wait_healthy(server.api_url, timeout=180, process=process, log=server.log)
        yield server
    finally:
        for started in reversed(server.processes):
            stop(started)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """``prefect server start`` on a free loopback port, with its own PREFECT_HOME (SQLite database)."""
    with serving(tmp_path_factory.mktemp("prefect-live")) as server:
        yield server
