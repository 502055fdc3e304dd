"""The report page in a real browser: headless Chromium, driven over the Chrome DevTools Protocol.

CDP runs over Chromium's --remote-debugging-pipe (file descriptors 3 and 4, NUL-separated JSON), so no driver
package is needed. The test never skips: without Chromium it fails and says how to install it (`make browser`).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dinodiff.report import build_report
from test_report import make_workdir

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--window-size=1280,900"]
CANDIDATES = ("chromium", "chromium-headless-shell", "google-chrome", "chromium-browser")


def find_chromium() -> str:
    explicit = os.environ.get("DINODIFF_CHROMIUM")
    found = explicit or next((p for p in map(shutil.which, CANDIDATES) if p), None)
    if not found:
        pytest.fail("No Chromium found for the browser test of the report: run `make browser` "
                    "(apt-get install chromium) or set DINODIFF_CHROMIUM to its path.")
    return found


class Browser:
    """Headless Chromium with one page, over CDP on a pipe; records console errors and every request."""

    def __init__(self, binary: str, profile: Path, timeout: float = 120.0):
        to_chrome, self._send_fd = os.pipe()
        self._recv_fd, from_chrome = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4; bash puts the pipes there.
        script = f'exec "$0" "$@" 3<&{to_chrome} 4>&{from_chrome}'
        self.proc = subprocess.Popen(["bash", "-c", script, binary, *FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-pipe", "about:blank"],
                                     pass_fds=(to_chrome, from_chrome), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        os.close(to_chrome)
        os.close(from_chrome)
        self.timeout, self._buffer, self._next_id, self.events = timeout, b"", 0, []
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable", session=self.session)
        except BaseException:
            self.close()
            raise

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.time()
            if left <= 0 or not select.select([self._recv_fd], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer over CDP in time")
            chunk = os.read(self._recv_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe: {self.proc.stderr.read().decode()[-2000:]}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        deadline = time.time() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, seconds: float) -> None:
        deadline = time.time() + seconds
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read(deadline))

    def settle(self, seconds: float = 1.0) -> None:
        """Collect events for a moment (late console messages, lazy requests)."""
        deadline = time.time() + seconds
        try:
            while True:
                self.events.append(self._read(deadline))
        except TimeoutError:
            pass

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        try:
            os.write(self._send_fd, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._send_fd)
            os.close(self._recv_fd)
            self.proc.stderr.close()


def inspect_page(page: Path, profile: Path) -> dict:
    """Open `page` and return its images, console errors, requests and failed loads."""
    browser = Browser(find_chromium(), profile)
    try:
        browser.call("Page.navigate", session=browser.session, url=page.resolve().as_uri())
        browser.wait_for("Page.loadEventFired", 120)
        browser.settle(1.0)
        images = browser.evaluate("Promise.all([...document.images].map(i => i.decode().then(() => 0, () => 0)"
                                  ".then(() => ({src: i.currentSrc.slice(0, 40), w: i.naturalWidth, "
                                  "h: i.naturalHeight, complete: i.complete}))))")
        resources = browser.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
        title = browser.evaluate("document.title")
        screenshot = browser.call("Page.captureScreenshot", session=browser.session, format="png")["data"]
    finally:
        browser.close()
    events = browser.events
    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e["params"] for e in events if e.get("method") == "Runtime.consoleAPICalled"
               and e["params"]["type"] in ("error", "assert")]
    errors += [e["params"]["entry"] for e in events if e.get("method") == "Log.entryAdded"
               and e["params"]["entry"]["level"] == "error"]  # failed loads, blocked requests, CSP, ...
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    failed = [e["params"] for e in events if e.get("method") == "Network.loadingFailed"]
    return {"images": images, "errors": errors, "requests": requests, "failed": failed, "resources": resources,
            "title": title, "screenshot": screenshot}


def test_report_page_shows_every_figure_with_no_console_error_and_no_outside_request(tmp_path):
    page = build_report(make_workdir(tmp_path / "work"))["html"]
    seen = inspect_page(page, tmp_path / "profile")
    assert seen["title"].startswith("dinodiff report")
    assert len(seen["images"]) == 8  # loss + FID curves, 2 sample grids, 2 previews, overlay, Figure 4
    for image in seen["images"]:
        assert image["complete"] and image["w"] > 0 and image["h"] > 0, image
    assert seen["errors"] == []
    outside = [u for u in seen["requests"] if not u.startswith("data:") and u != page.resolve().as_uri()]
    assert outside == [] and seen["failed"] == []
    assert [r for r in seen["resources"] if not r.startswith("data:")] == []
    assert len(seen["screenshot"]) > 1000  # the page rendered


def test_the_browser_check_catches_a_broken_image_an_outside_request_and_a_console_error(tmp_path):
    """The negative control: the same check fails on a page that is not self-contained."""
    (tmp_path / "bad.html").write_text(
        '<!DOCTYPE html><html><head><title>bad</title></head><body><img src="missing.png">'
        '<img src="http://127.0.0.1:9/outside.png"><script>console.error("boom")</script></body></html>')
    seen = inspect_page(tmp_path / "bad.html", tmp_path / "profile")
    assert [i["w"] for i in seen["images"]] == [0, 0]
    assert any("boom" in json.dumps(e) for e in seen["errors"])
    assert "http://127.0.0.1:9/outside.png" in seen["requests"]
    assert any(u.endswith("/missing.png") for u in seen["requests"])
