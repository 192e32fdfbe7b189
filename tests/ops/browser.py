"""A headless Chromium driven over the DevTools protocol (a small JSON-over-websocket client).

Enough to do what a person does with the Prefect UI: open a page, wait until it shows something, click
a tab, read the rendered text and take a screenshot. Chromium is Debian's ``chromium`` package, started
with a fresh profile and with everything that would reach the network off.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from websockets.sync.client import connect


FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
    "--remote-debugging-port=0",
]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One Chromium process with one page; use as a context manager."""

    def __init__(self, profile: Path, binary: str):
        self.profile = profile
        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._ids = itertools.count(1)
        port = self._devtools_port(timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            [page] = [t for t in json.load(response) if t["type"] == "page"][:1]
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)

    def _devtools_port(self, timeout: float) -> int:
        """Chromium writes its DevTools port into the profile once it listens."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.2)
        raise TimeoutError("chromium did not open its DevTools port")

    def call(self, method: str, **params) -> dict:
        """Send one DevTools command and return its result (events in between are skipped)."""
        message_id = next(self._ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        """The page's rendered, visible text."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, ready: Callable[[str], bool], timeout: float = 90) -> str:
        """Poll the rendered text until ``ready(text)``; return it (raise with the last text on timeout)."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if ready(text):
                return text
            time.sleep(0.5)
        raise TimeoutError(f"the page did not show what was expected within {timeout:.0f} s; it shows:\n{text}")

    def wait_for_value(self, expression: str, ready: Callable, timeout: float = 90):
        """Poll a JavaScript expression until ``ready(value)``; return the value (raise with it on timeout)."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value is not None and ready(value):
                return value
            time.sleep(0.5)
        raise TimeoutError(f"{expression!r} did not become ready within {timeout:.0f} s; last value: {value!r}")

    def click(self, selector: str) -> None:
        found = self.evaluate(f"(e => e ? (e.click(), true) : false)(document.querySelector({json.dumps(selector)}))")
        if not found:
            raise LookupError(f"nothing matches {selector!r}")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
