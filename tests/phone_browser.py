"""A phone-sized headless Chromium on an exported web app folder, served over HTTP on localhost:
what the web app tests drive (Debian's chromium; Playwright's own browser download does not work
here)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None or shutil.which("npm") is None,
                                    reason="needs Debian's chromium and npm")


@contextlib.contextmanager
def phone_page(app: Path, errors: list):
    """(context, page) on `app`'s index.html, ready to classify; page errors go to `errors`."""
    from playwright.sync_api import sync_playwright
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(app))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
            context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=3,
                                          is_mobile=True, has_touch=True)
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
            wait_until_ready(page)
            yield context, page
            browser.close()
    finally:
        server.shutdown()


def wait_until_ready(page) -> None:
    page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')", timeout=60000)


def classify(page, image: Path) -> dict:
    """The result element's data attributes after the page classified `image`, and the status line."""
    page.evaluate("delete document.getElementById('result').dataset.top")
    page.set_input_files("#file", str(image))
    page.wait_for_function("document.getElementById('result').dataset.top", timeout=30000)
    return {**page.evaluate("Object.assign({}, document.getElementById('result').dataset)"),
            "status": page.evaluate("document.getElementById('status').textContent")}
