"""
The HTTP side of a real server, for the end-to-end tests: its port (from the server's log),
plain blocking HTTP requests to it (urllib, redirects not followed), and headless Chromium
driven by Selenium with Debian's ``chromium`` and ``chromium-driver``. No reactor here.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
import urllib.error
import urllib.request
from typing import Any

from measuring.local import LocalServer

HTTP_LISTENING = re.compile(r"measuring HTTP listening on 127\.0\.0\.1:(\d+) ")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: The flags Chromium runs with here: no sandbox (tests run as root), no network of its own.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1366,900",
)  # fmt: skip


def metric_samples(text: str, parse: Any = None) -> dict[tuple[Any, ...], float]:
    """
    Every sample of a /metrics scrape, (name, sorted labels) to its value; ``parse`` is one of
    prometheus_client's parsers (by default that of the text format).
    """
    if parse is None:
        from prometheus_client.parser import text_string_to_metric_families as parse
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in parse(text)
        for sample in family.samples
    }


def http_port(server: LocalServer, patience: float = 60.0) -> int:
    """The port the server's HTTP side listens on, as its log says."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        found = HTTP_LISTENING.search(server.log())
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise RuntimeError(f"the server did not say its HTTP port:\n{server.log()}")


class Reply:
    """An HTTP response: its status, headers and body."""

    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code, self.headers, self.body = code, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def fetch(
    port: int,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Reply:
    """One HTTP request to 127.0.0.1:``port``; any status is a Reply (no exception)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with _opener.open(request, timeout=60) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read())


@functools.cache
def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install {package})"
    return None


def chromium(profile: str) -> Any:
    """
    A headless Chromium with the fresh profile folder ``profile``, its console kept for
    ``get_log("browser")``. The caller quits it.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
