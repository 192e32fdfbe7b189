"""Wait until a Prefect server answers its health check (``make server`` runs this after starting one).

    python scripts/wait_for_server.py http://127.0.0.1:4200 [--timeout 180]
"""

from __future__ import annotations

import argparse
import time
import urllib.request


def wait_healthy(url: str, timeout: float) -> bool:
    """Whether ``<url>/api/health`` answered 200 within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:4200")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait (default 180)")
    args = parser.parse_args()
    if wait_healthy(args.url, args.timeout):
        print(f"Prefect server on {args.url} (stop it: .venv/bin/prefect server stop)")
        return 0
    print(f"{args.url}/api/health: no answer after {args.timeout:.0f} s")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
