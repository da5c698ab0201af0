"""The service under hostile and careless requests (issue 16, cases 5-7): decoding never stalls the
event loop, /metrics stays bounded, every error has the one documented JSON shape, and oversized
uploads, chunked or not, get their 413 with ordinary Python clients."""

import functools
import http.client
import io
import random
import signal
import string
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import httpx
import pytest
import requests
from conftest import start_server
from PIL import Image


@functools.cache
def _pixel_bomb(side: int = 9000) -> bytes:
    """About 10 KB of PNG holding side x side 1-bit pixels: under the byte and the pixel limits,
    yet most of a second to decode."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _png(size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 50, 50)).save(buf, "PNG")
    return buf.getvalue()


@contextmanager
def uvicorn_in_a_thread(settings):
    """The real app under uvicorn on a free port, in this process; yields the base URL."""
    import uvicorn

    from pixclass.serve.app import create_app
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# case 5 ------------------------------------------------------------------------------------------

def test_healthz_answers_within_a_second_while_pixel_bombs_decode(trained_run):
    from pixclass.serve.app import Settings
    bomb = _pixel_bomb()
    # four of them (324 Mpx) are within the default request budget, so they are really decoded
    files = [("files", (f"bomb{i}.png", bomb, "image/png")) for i in range(4)]
    with uvicorn_in_a_thread(Settings(model=str(trained_run["model_dir"]))) as base, httpx.Client(timeout=120) as probe:
        attack, done = {}, threading.Event()

        def send_attack():
            attack["status"] = httpx.post(f"{base}/v1/predict", files=files, timeout=120).status_code
            done.set()
        thread = threading.Thread(target=send_attack)
        thread.start()
        waits, answered_during_attack = [], 0
        while not done.wait(0.05):  # a health check every 50 ms until the attack is answered
            start = time.perf_counter()
            assert probe.get(f"{base}/healthz").status_code == 200
            waits.append(time.perf_counter() - start)
            answered_during_attack += not done.is_set()
        thread.join()
    assert attack["status"] == 200
    # health checks were answered while the attack was being decoded; before the fix the
    # decoding held the event loop and one of them waited for the whole request (2-3 s)
    assert answered_during_attack >= 2
    assert max(waits) < 1.0, f"slowest /healthz {max(waits):.2f} s"


def test_request_over_the_pixel_budget_is_refused_before_decoding(trained_run):
    from fastapi.testclient import TestClient

    from pixclass.serve.app import Settings, create_app
    bomb = _pixel_bomb()
    with TestClient(create_app(Settings(model=str(trained_run["model_dir"])))) as client:
        r = client.post("/v1/predict", files=[("files", (f"b{i}.png", bomb, "image/png")) for i in range(30)])
        assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
        assert "together" in r.json()["detail"]
        # one such image alone is within every limit
        r = client.post("/v1/predict", files=[("files", ("b.png", bomb, "image/png"))])
        assert r.status_code == 200, r.text


def test_sigterm_lets_the_requests_in_flight_finish(trained_run):
    proc, base = start_server(trained_run["model_dir"])
    host, port = base.removeprefix("http://").split(":")
    try:
        bomb, small = _pixel_bomb(), _png()
        # the first request keeps both decode workers busy for a while; the others wait behind it
        bodies = [_multipart([bomb, bomb])] + [_multipart([small])] * 3
        connections = []
        for body, content_type in bodies:
            c = http.client.HTTPConnection(host, int(port), timeout=60)
            c.request("POST", "/v1/predict", body=body, headers={"Content-Type": content_type})
            connections.append(c)
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200  # the loop has read them
        proc.send_signal(signal.SIGTERM)
        statuses = [c.getresponse().status for c in connections]
        assert statuses == [200] * 4
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _multipart(images: list[bytes], boundary: str = "pixclass-test") -> tuple[bytes, str]:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="f{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(images)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# case 6 ------------------------------------------------------------------------------------------

def test_metrics_series_stay_bounded_under_random_paths(trained_run):
    from fastapi.testclient import TestClient

    from pixclass.serve.app import Settings, create_app
    rng = random.Random(0)
    paths = ["/" + "".join(rng.choices(string.ascii_lowercase, k=12)) for _ in range(200)]
    with TestClient(create_app(Settings(model=str(trained_run["model_dir"])))) as client:
        for path in paths:
            assert client.get(path).status_code == 404
        client.get("/static/nothing-here.js")
        client.post("/healthz")
        assert client.get("/healthz").status_code == 200
        text = client.get("/metrics").text
    series = [line for line in text.splitlines() if line.startswith("pixclass_requests_total{")]
    assert not any(path in text for path in paths)
    assert 'route="unmatched",status="404"} 200.0' in text
    assert 'route="/static/{name}",status="404"' in text and 'route="/healthz",status="405"' in text
    assert len(series) <= 6, series
    assert len(text) < 20_000


# case 7 ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_client(trained_run):
    """The app with a 1 MB upload limit, a token, and one route that fails unexpectedly."""
    from fastapi.testclient import TestClient

    from pixclass.serve.app import Settings, create_app
    app = create_app(Settings(model=str(trained_run["model_dir"]), max_upload_mb=1.0, token="s3cret"))

    @app.get("/fails", include_in_schema=False)
    async def fails():
        raise RuntimeError("a bug")
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": "Bearer s3cret"}) as client:
        yield client


@pytest.mark.parametrize("method, path, kwargs, status, error", [
    ("get", "/no/such/route", {}, 404, "not_found"),
    ("delete", "/v1/predict", {}, 405, "method_not_allowed"),
    ("post", "/v1/predict", {}, 400, "bad_request"),  # no files: request validation
    ("post", "/v1/predict?k=zero", {"files": [("files", ("a.png", _png(), "image/png"))]}, 400, "bad_request"),
    ("post", "/v1/predict", {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
     400, "bad_request"),  # multipart without a boundary: the parser's error
    ("get", "/v1/model", {"headers": {"Authorization": "Bearer wrong"}}, 401, "unauthorized"),
    ("post", "/v1/predict", {"files": [("files", ("a.png", b"\0" * (3 * 2**20), "image/png"))]}, 413, "too_large"),
    ("post", "/v1/predict", {"files": [("files", ("a.txt", b"plain text", "text/plain"))]}, 415, "unsupported_format"),
    ("post", "/v1/predict", {"files": [("files", ("a.png", _png()[:60], "image/png"))]}, 422, "undecodable"),
    ("get", "/fails", {}, 500, "internal"),
])
def test_every_error_has_the_one_json_shape(strict_client, method, path, kwargs, status, error):
    r = getattr(strict_client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == error and isinstance(body["detail"], str)
    assert body["detail"]


def test_the_error_shape_is_documented(strict_client):
    spec = strict_client.get("/openapi.json").json()
    assert "HTTPValidationError" not in str(spec)
    assert set(spec["components"]["schemas"]["ErrorBody"]["properties"]) == {"error", "detail"}
    assert "ErrorBody" in spec["info"]["description"] and "1 MiB" in spec["info"]["description"]
    for operations in spec["paths"].values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if not status.startswith("2"):
                    assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


@pytest.fixture(scope="module")
def server_1mb(trained_run):
    from pixclass.serve.app import Settings
    with uvicorn_in_a_thread(Settings(model=str(trained_run["model_dir"]), max_upload_mb=1.0)) as base:
        yield base


OVERSIZED = _multipart([b"\0" * (16 * 2**20)])  # 16 MB to a 1 MB limit: more than the socket buffers hold


def _assert_413(status: int, body: bytes):
    assert status == 413, body[:200]
    assert b'"error": "too_large"' in body


def test_oversized_upload_with_urllib_gets_413(server_1mb):
    request = urllib.request.Request(f"{server_1mb}/v1/predict", data=OVERSIZED[0],
                                     headers={"Content-Type": OVERSIZED[1]})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    _assert_413(refused.value.code, refused.value.read())


def test_oversized_upload_with_requests_gets_413(server_1mb):
    r = requests.post(f"{server_1mb}/v1/predict", data=OVERSIZED[0], headers={"Content-Type": OVERSIZED[1]},
                      timeout=60)
    _assert_413(r.status_code, r.content)


def _pieces(data: bytes, size: int = 64 * 1024):
    for start in range(0, len(data), size):
        yield data[start:start + size]


def test_oversized_chunked_upload_with_requests_gets_413(server_1mb):
    r = requests.post(f"{server_1mb}/v1/predict", data=_pieces(OVERSIZED[0]),
                      headers={"Content-Type": OVERSIZED[1]}, timeout=60)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    _assert_413(r.status_code, r.content)


def test_oversized_chunked_upload_with_http_client_gets_413(server_1mb):
    host, port = server_1mb.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/predict", body=_pieces(OVERSIZED[0]), encode_chunked=True,
                       headers={"Content-Type": OVERSIZED[1], "Transfer-Encoding": "chunked"})
    response = connection.getresponse()
    _assert_413(response.status, response.read())
    # and the service is still there
    assert httpx.get(f"{server_1mb}/healthz", timeout=5).status_code == 200
