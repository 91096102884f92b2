"""A small W3C WebDriver client for Debian's chromium-driver, over httpx.

Enough for a test to act as a person in the browser: open a page, type, click,
read text, take a screenshot. No selenium: the protocol is a handful of JSON calls.
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def chromium_available() -> bool:
    return bool(shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser")))


class Browser:
    def __init__(self, width: int = 1400, height: int = 1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.driver = subprocess.Popen(
            ["chromedriver", f"--port={port}", "--allowed-ips=127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        for _ in range(100):
            try:
                self.http.get("/status")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={self.profile}", f"--window-size={width},{height}"]
        reply = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": {"binary": binary, "args": flags}}}})
        self.session = f"/session/{reply['sessionId']}"

    def _call(self, method: str, path: str, body: dict | None = None):
        reply = self.http.request(method, path, json=body)
        value = reply.json().get("value")
        if reply.status_code != 200:
            raise RuntimeError(f"webdriver {method} {path}: {value}")
        return value

    def open(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def find(self, css: str, timeout: float = 30.0) -> str:
        """The first element matching `css` once it is displayed; its element id."""
        deadline = time.monotonic() + timeout
        while True:
            found = self._call("POST", f"{self.session}/elements", {"using": "css selector", "value": css})
            for element in found:
                eid = element[ELEMENT]
                if self._call("GET", f"{self.session}/element/{eid}/displayed"):
                    return eid
            if time.monotonic() > deadline:
                raise TimeoutError(f"no visible element matches {css!r} after {timeout:.0f} s at {self.url()}")
            time.sleep(0.3)

    def find_text(self, css: str, text: str, timeout: float = 30.0) -> str:
        """The first displayed element matching `css` whose text contains `text`."""
        deadline = time.monotonic() + timeout
        while True:
            found = self._call("POST", f"{self.session}/elements", {"using": "css selector", "value": css})
            for element in found:
                eid = element[ELEMENT]
                try:
                    if text in self.text(eid) and self._call("GET", f"{self.session}/element/{eid}/displayed"):
                        return eid
                except RuntimeError:  # stale: the page re-rendered under us
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"no visible {css!r} with text {text!r} after {timeout:.0f} s at {self.url()}")
            time.sleep(0.3)

    def type(self, eid: str, text: str) -> None:
        self._call("POST", f"{self.session}/element/{eid}/value", {"text": text})

    def click(self, eid: str) -> None:
        self._call("POST", f"{self.session}/element/{eid}/click", {})

    def text(self, eid: str) -> str:
        return self._call("GET", f"{self.session}/element/{eid}/text")

    def url(self) -> str:
        return self._call("GET", f"{self.session}/url")

    def page_text(self) -> str:
        return self._call("POST", f"{self.session}/execute/sync",
                          {"script": "return document.body.innerText", "args": []})

    def screenshot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", f"{self.session}/screenshot")))
        return path

    def close(self) -> None:
        try:
            self._call("DELETE", self.session)
        except Exception:
            pass
        self.driver.terminate()
        try:
            self.driver.wait(10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
        self.http.close()
        shutil.rmtree(self.profile, ignore_errors=True)
