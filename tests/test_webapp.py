"""The exported web app classifies a photo in a phone-sized headless Chromium, like
`pixclass predict`, and keeps working with the network cut after the first load."""

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from conftest import run_cli

OUTPUT = Path(__file__).resolve().parent / "output"
CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None or shutil.which("npm") is None, reason="needs Debian's chromium and npm")
def test_webapp_on_a_phone_offline(trained_run, shapes_session, tmp_path):
    from playwright.sync_api import sync_playwright
    app = tmp_path / "webapp"
    proc = run_cli("export", trained_run["model_dir"], "--format", "webapp", "--out", app, "--json")
    assert proc.returncode == 0, proc.stderr
    image = shapes_session / "triangle" / "triangle_005.png"
    predicted = json.loads(run_cli("predict", trained_run["model_dir"], image, "--json").stdout)[0]
    expected = predicted["top_k"][0]["class"]

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(app))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    errors = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
            context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=3,
                                          is_mobile=True, has_touch=True)
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')", timeout=60000)
            page.wait_for_function("navigator.serviceWorker.controller !== null || "
                                   "navigator.serviceWorker.ready.then(() => true)", timeout=30000)
            page.evaluate("navigator.serviceWorker.ready")
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.getElementById('result').dataset.top", timeout=30000)
            online = page.evaluate("document.getElementById('result').dataset.top")
            # the answer with the model's abstain threshold (meta.json), as predict gives it
            answer = page.evaluate("document.getElementById('result').dataset.answer")
            score = page.evaluate("document.getElementById('result').dataset.score")
            page.screenshot(path=str(tmp_path / "phone.png"))

            context.set_offline(True)  # the network is gone: everything must come from the service worker
            page.reload()
            page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')", timeout=60000)
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.getElementById('result').dataset.top", timeout=30000)
            offline = page.evaluate("document.getElementById('result').dataset.top")
            OUTPUT.mkdir(exist_ok=True)
            page.screenshot(path=str(OUTPUT / "webapp_phone_offline.png"))
            browser.close()
    finally:
        server.shutdown()
    assert errors == []
    assert online == expected and offline == expected
    assert answer == predicted["answer"]
    # the knn_similarity score, read from the ONNX graph's second output, as predict computes it
    assert float(score) == pytest.approx(predicted["score"], abs=1e-4)
    meta = json.loads((app / "meta.json").read_text())
    assert meta["abstain"] and meta["abstain"]["threshold"] == pytest.approx(predicted_threshold(trained_run))


def predicted_threshold(run: dict) -> float:
    return json.loads((Path(run["model_dir"]) / "pixclass.json").read_text())["abstain"]["threshold"]
