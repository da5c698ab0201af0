"""The web service: API with real images, limits, auth, metrics, batching, graceful shutdown."""

import io
import signal
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import start_server


@pytest.fixture(scope="module")
def client(trained_run):
    from fastapi.testclient import TestClient

    from pixclass.serve.app import Settings, create_app
    app = create_app(Settings(model=trained_run["model_dir"], max_upload_mb=1.0))
    with TestClient(app) as c:
        yield c


def _png(size=(40, 40), colour=(200, 50, 50)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _huge_png_header() -> bytes:
    """A valid PNG that claims 1 x 100000 x 100000 pixels (the pixels themselves are missing)."""
    data = bytearray(_png((1, 1)))
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_predict_one_and_several(client, shapes_session):
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in sorted((shapes_session / "circle").iterdir())[:3]]
    r = client.post("/v1/predict?k=2", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "classic-cnn" and len(body["version"]) == 12
    assert [p["filename"] for p in body["predictions"]] == [f[1][0] for f in files]
    assert all(len(p["top_k"]) == 2 for p in body["predictions"])


def test_predict_matches_the_predictor(client, trained_run, shapes_session):
    from pixclass.predict import Predictor
    path = shapes_session / "square" / "square_003.png"
    expected, _ = Predictor.load(trained_run["model_dir"]).predict_files([path], k=3)
    r = client.post("/v1/predict", files=[("files", (path.name, path.read_bytes(), "image/png"))])
    got = r.json()["predictions"][0]["top_k"]
    assert [c["class"] for c in got[:3]] == [c["class"] for c in expected[0]["top_k"]]
    assert abs(got[0]["probability"] - expected[0]["top_k"][0]["probability"]) < 1e-5


@pytest.mark.parametrize("payload, status, error", [
    (_huge_png_header(), 413, "too_large"),
    (b"just some text, not a picture", 415, "unsupported_format"),
    (_png()[:60], 422, "undecodable"),  # a PNG cut short
])
def test_bad_uploads_get_json_errors(client, payload, status, error):
    r = client.post("/v1/predict", files=[("files", ("x.jpg", payload, "image/jpeg"))])
    assert r.status_code == status and r.json()["error"] == error, r.text
    assert client.get("/healthz").status_code == 200


def test_truncated_jpeg_is_422(client):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG")
    r = client.post("/v1/predict", files=[("files", ("t.jpg", buf.getvalue()[:400], "image/jpeg"))])
    assert r.status_code == 422 and r.json()["error"] == "undecodable"


def test_upload_over_the_limit_is_413(client):
    r = client.post("/v1/predict", files=[("files", ("big.png", b"\x00" * (2 * 2**20), "image/png"))])
    assert r.status_code == 413 and r.json()["error"] == "too_large"


def test_model_health_ready_metrics_explain_page(client):
    info = client.get("/v1/model").json()
    assert info["classes"] == ["circle", "square", "triangle"] and info["preprocess"]["size"] == 32
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    r = client.post("/v1/explain", files=[("file", ("a.png", _png(), "image/png"))])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    metrics = client.get("/metrics").text
    assert "pixclass_requests_total" in metrics and "pixclass_request_seconds_bucket" in metrics
    assert "pixclass_batch_size_bucket" in metrics
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "http" not in page.text
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/v1/predict"]["post"]["responses"]
    assert {"200", "401", "413", "415", "422"} <= set(responses)


def test_token_is_required_when_set(trained_run):
    from fastapi.testclient import TestClient

    from pixclass.serve.app import Settings, create_app
    with TestClient(create_app(Settings(model=trained_run["model_dir"], token="s3cret"))) as c:
        assert c.get("/v1/model").status_code == 401
        assert c.get("/v1/model", headers={"Authorization": "Bearer wrong"}).json()["error"] == "unauthorized"
        assert c.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200  # health checks stay open


def test_real_server_batches_concurrent_requests_and_stops_cleanly_on_sigterm(trained_run, shapes_session):
    import httpx
    proc, base = start_server(trained_run["model_dir"], "--batch-wait-ms", "20")
    try:
        image = (shapes_session / "circle" / "circle_001.png").read_bytes()
        results = []

        def call():
            r = httpx.post(f"{base}/v1/predict", files=[("files", ("c.png", image, "image/png"))], timeout=30)
            results.append(r.status_code)
        threads = [threading.Thread(target=call) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 16
        metrics = httpx.get(f"{base}/metrics").text
        count = float([l for l in metrics.splitlines() if l.startswith("pixclass_batch_size_count")][0].split()[-1])
        assert count < 17  # 16 requests + warm-up in fewer model calls: they were batched
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="needs Debian's chromium")
def test_upload_page_in_a_real_browser(trained_run, shapes_session):
    import httpx
    from playwright.sync_api import sync_playwright
    proc, base = start_server(trained_run["model_dir"])
    image = shapes_session / "square" / "square_002.png"
    try:
        expected = httpx.post(f"{base}/v1/predict", files=[("files", (image.name, image.read_bytes(), "image/png"))]
                              ).json()["predictions"][0]["top_k"][0]["class"]
        errors = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=__import__("shutil").which("chromium"), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
            page.on("pageerror", lambda e: errors.append(str(e)))
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((base, "blob:", "data:")) else None)
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            page.check("#cam")
            page.set_input_files("#files", str(image))
            page.wait_for_selector(".card[data-top] img.cam", timeout=30000)
            shown = page.get_attribute(".card[data-top]", "data-top")
            out = Path(__file__).resolve().parent / "output"
            out.mkdir(exist_ok=True)
            page.screenshot(path=str(out / "serve_page.png"), full_page=True)
            browser.close()
        assert errors == [] and outside == []
        assert shown == expected
    finally:
        proc.terminate()
        proc.wait(timeout=30)
