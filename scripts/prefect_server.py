"""Start a Prefect server in the background and return once it answers (``make server``).

    python scripts/prefect_server.py [--host 127.0.0.1] [--port 4200] [--timeout 180]

A non-loopback ``--host`` (``0.0.0.0``, a routable address or name) is refused unless the server will ask for
credentials: ``PREFECT_SERVER_API_AUTH_STRING`` set (environment, ``.env``, ``prefect.toml`` or the Prefect profile).
Without it anyone who reaches the port can read every Secret block and start any deployment (docs/operations.md).

The server runs detached from this process (its own session; output in ``$PREFECT_HOME/server.log``) and its pid is
written where ``prefect server stop`` reads it (``$PREFECT_HOME/server.pid``), so that command stops it.
(``prefect server start --background`` is not used: in prefect 3.8.8 it leaves the server writing its logs into
pipes nobody reads, and the server dies at its first lines of output once the command has returned.)
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def prefect_home() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()).expanduser()


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (127.0.0.0/8, ::1); unresolvable: no."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def auth_configured() -> bool:
    """Whether the server will require basic authentication (``server.api.auth_string`` set and not empty)."""
    from prefect.settings import get_current_settings

    secret = get_current_settings().server.api.auth_string
    return secret is not None and bool(secret.get_secret_value())


NO_AUTH = (
    "refusing to listen on {host} without authentication: set PREFECT_SERVER_API_AUTH_STRING=user:password for the "
    "server (and PREFECT_API_AUTH_STRING, the same value, for every worker and client), e.g. "
    "`export PREFECT_SERVER_API_AUTH_STRING=admin:$(openssl rand -hex 16)` (docs/operations.md)"
)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start(host: str, port: int, timeout: float) -> int:
    if not is_loopback(host) and not auth_configured():
        print(NO_AUTH.format(host=host), file=sys.stderr)
        return 2
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    pid_file, log = home / "server.pid", home / "server.log"
    # Probe and poll through loopback when listening on every address (0.0.0.0 / ::).
    probe = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{f'[{probe}]' if ':' in probe else probe}:{port}"
    with socket.socket(socket.AF_INET6 if ":" in probe else socket.AF_INET) as sock:
        if sock.connect_ex((probe, port)) == 0:
            print(
                f"{host}:{port} is in use: stop what runs there (`prefect server stop`) or pass --port",
                file=sys.stderr,
            )
            return 1
    prefect = Path(sys.executable).with_name("prefect")
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(prefect), "server", "start", "--host", host, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(url):
            where = "" if probe == host else f" (listening on {host})"
            print(f"Prefect server on {url}{where} (log: {log}; stop it: .venv/bin/prefect server stop)")
            return 0
        if process.poll() is not None:
            break
        time.sleep(0.5)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
    pid_file.unlink(missing_ok=True)
    print(f"the Prefect server did not answer on {url} within {timeout:.0f} s; its log: {log}", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, loopback); any other needs PREFECT_SERVER_API_AUTH_STRING",
    )
    parser.add_argument("--port", type=int, default=4200, help="port (default: 4200)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for it to answer (default: 180)")
    args = parser.parse_args()
    return start(args.host, args.port, args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
