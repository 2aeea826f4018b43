"""What the console tests share: servers the tests start, and Chromium driven by Playwright."""

import os
import pathlib
import socket
import subprocess
import tempfile
import time
import uuid

import pytest
import requests
from playwright.sync_api import sync_playwright

BIN = os.environ["TIDEWATER_BIN"]
CHROMIUM = os.environ["CHROMIUM"]
ARTIFACTS = pathlib.Path(os.environ.get("ARTIFACTS", "target/console/screenshots"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `tidewater serve` on free loopback ports and a temporary data directory."""

    def __init__(self, config="", env=None):
        self.dir = tempfile.TemporaryDirectory(prefix="tidewater-console-")
        path = pathlib.Path(self.dir.name)
        (path / "tidewater.toml").write_text(config)
        for _ in range(5):
            http, protocol = free_port(), free_port()
            self.url = f"http://127.0.0.1:{http}"
            self.log = open(path / "server.log", "ab")
            self.process = subprocess.Popen(
                [BIN, "serve", "--data", str(path / "data"), "--listen", f"127.0.0.1:{http}",
                 "--protocol-listen", f"127.0.0.1:{protocol}", "--config", str(path / "tidewater.toml")],
                stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if requests.get(self.url + "/readyz", timeout=1).ok:
                        return
                except requests.RequestException:
                    pass
                time.sleep(0.1)
            self.process.kill()
        raise RuntimeError("the server did not start: " + (path / "server.log").read_text()[-2000:])

    def api(self, method, path, body=None, token=None, expect=(200, 201, 204)):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = requests.request(method, self.url + path, json=body, headers=headers, timeout=30)
        assert response.status_code in expect, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        self.dir.cleanup()


@pytest.fixture(scope="session")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request):
    """A fresh page; every request it makes must go to the server it was pointed at."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.elsewhere = []
    page.console_errors = []
    # Script errors; not the browser's note of each 4xx the tests provoke on purpose.
    page.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
            and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    yield page
    context.close()


def shot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fresh(name):
    return f"{name}-{uuid.uuid4().hex[:6]}"
