"""A small Chrome DevTools Protocol client for end-to-end tests: starts headless Chromium,
drives one page over a websocket (navigate, evaluate JavaScript, click, screenshot) and
shuts the browser down with its whole process group. Every wait is bounded in time, and
the browser reaches nothing but 127.0.0.1."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_port

try:
    import websocket  # the `websocket-client` package
except ImportError:  # the tests that need it skip with this reason
    websocket = None

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def missing_reason() -> str | None:
    """Why a browser test cannot run here, or None when it can."""
    if websocket is None:
        return ("the `websocket-client` package is not installed "
                "(pip install websocket-client, or the project's `test` extra)")
    if find_chromium() is None:
        return ("no Chromium executable on PATH (tried " + ", ".join(CHROMIUM_NAMES)
                + "); install it with `apt-get install -y chromium`")
    return None


class Browser:
    """Headless Chromium with one page, spoken to over the DevTools protocol."""

    def __init__(self, user_data_dir: Path, width: int = 1600, height: int = 1000,
                 executable: str | None = None, start_timeout: float = 30.0):
        if websocket is None:
            raise BrowserError(missing_reason())
        exe = executable or find_chromium()
        if exe is None:
            raise BrowserError(missing_reason())
        self.port = free_port()
        self.user_data_dir = Path(user_data_dir)
        self.user_data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.user_data_dir.parent / f"{self.user_data_dir.name}.chromium.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (open while chromium runs)
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu",
                f"--remote-debugging-port={self.port}", "--remote-debugging-address=127.0.0.1",
                f"--user-data-dir={self.user_data_dir}", f"--window-size={width},{height}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--mute-audio",
                "--disable-dev-shm-usage", "--no-proxy-server",
                # only 127.0.0.1: every other host name fails at once (the app's analytics)
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "about:blank"]
        # its own session: close() ends the renderer, GPU and zygote children with it
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._id = 0
        self.ws = None
        try:
            self.ws = websocket.create_connection(self._page_ws_url(start_timeout),
                                                  timeout=10, suppress_origin=True)
            self.send("Page.enable")
            self.send("Runtime.enable")
            # headless takes the window's chrome off --window-size: pin the viewport itself
            self.send("Emulation.setDeviceMetricsOverride", {
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    # -- start and stop --------------------------------------------------------------
    def _page_ws_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode} at start; "
                                   f"log: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json",
                                            timeout=2) as resp:
                    targets = json.loads(resp.read())
                pages = [t for t in targets
                         if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
                last = targets
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        raise BrowserError(f"no page target on port {self.port} within {timeout:.0f} s "
                           f"(last: {last!r}); log: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.ws is not None:
            # a polite close first; a hung or dead browser is killed below all the same
            with contextlib.suppress(BrowserError, TimeoutError, OSError,
                                     websocket.WebSocketException):
                self.send("Browser.close", timeout=5)
            with contextlib.suppress(OSError, websocket.WebSocketException):
                self.ws.close()
            self.ws = None
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)  # the group's leftovers too
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=5)
                if sig == signal.SIGTERM:
                    time.sleep(0.2)  # children of the group get a moment as well
            except subprocess.TimeoutExpired:
                continue
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the protocol ----------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, timeout: float = 15.0) -> dict:
        """One command; returns its result (events that arrive meanwhile are dropped)."""
        if self.ws is None:
            raise BrowserError("the browser is closed")
        self._id += 1
        msg_id = self._id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{method}: no answer within {timeout:.1f} s")
            self.ws.settimeout(left)
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                raise TimeoutError(f"{method}: no answer within {timeout:.1f} s") from None
            msg = json.loads(raw)
            if msg.get("id") != msg_id:
                continue
            if "error" in msg:
                raise BrowserError(f"{method}: {msg['error']}")
            return msg.get("result", {})

    def evaluate(self, expression: str, timeout: float = 10.0, await_promise: bool = False):
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        result = self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": await_promise,
            "timeout": int(timeout * 1000)}, timeout=timeout + 1)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error: {text}\n  in: {expression[:300]}")
        return result.get("result", {}).get("value")

    def wait_until(self, expression: str, timeout: float = 20.0, interval: float = 0.25,
                   what: str | None = None):
        """Evaluate `expression` until it is truthy and return that value; TimeoutError
        (with the last value seen) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            left = deadline - time.monotonic()
            try:
                last = self.evaluate(expression, timeout=max(min(left, 10.0), 1.0))
                if last:
                    return last
            except (BrowserError, TimeoutError) as exc:
                last = exc
            if time.monotonic() + interval > deadline:
                raise TimeoutError(f"{what or expression[:200]}: not true within "
                                   f"{timeout:.0f} s; last value {last!r}")
            time.sleep(interval)

    def navigate(self, url: str, timeout: float = 30.0) -> None:
        result = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise BrowserError(f"navigate {url}: {result['errorText']}")
        self.wait_until("document.readyState === 'complete' && location.href", timeout=timeout,
                        what=f"load of {url}")

    def click(self, x: float, y: float) -> None:
        """A real left click at page coordinates (CSS pixels)."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                   "button": "left", "clickCount": 1})

    def screenshot(self, path: Path, full_page: bool = False, timeout: float = 30.0) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = self.send("Page.captureScreenshot", params, timeout=timeout)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path
