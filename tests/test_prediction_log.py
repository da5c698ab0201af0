"""The prediction log (`pixclass serve --log-db`): every prediction stored, feedback joined to it,
corrections exported as class folders, against SQLite and a real PostgreSQL server; and the
service answering through a database outage, counting what it could not log."""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import make_shapes, start_server
from throwaway_postgres import ThrowawayPostgres, can_run_server, server_binaries

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "artifacts-6de4714" / "seed-cnn"  # a tiny classic CNN


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return Path(shutil.copytree(FIXTURE_MODEL, tmp_path_factory.mktemp("log") / "model"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[tuple[str, bytes]]:
    """(class, PNG bytes) of 60 distinct drawn shapes."""
    root = make_shapes(tmp_path_factory.mktemp("log-images") / "shapes", per_class=20)
    return [(p.parent.name, p.read_bytes()) for p in sorted(root.rglob("*.png"))]


@pytest.fixture(scope="module")
def postgres():
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (Debian's postgresql package)")
    if not can_run_server():
        pytest.skip("running as root with no `postgres` user to run the PostgreSQL server as")
    server = ThrowawayPostgres(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def log_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'predictions.db'}"
    return request.getfixturevalue("postgres").new_database()


def _logged(url: str) -> list[dict]:
    import sqlalchemy as sa

    from pixclass.serve.log_db import feedback, open_log, predictions as p
    engine = open_log(url, create=False)
    query = sa.select(p.c.id, p.c.image_sha256, p.c.image, p.c.predicted, feedback.c.label.label("feedback")).outerjoin(
        feedback, feedback.c.prediction_id == p.c.id)
    with engine.connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(query)]
    engine.dispose()
    return rows


def _post_image(session, base: str, name: str, data: bytes) -> dict:
    r = session.post(f"{base}/v1/predict", files=[("files", (name, data, "image/png"))], timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def _concurrently(clients: int, n: int, work) -> list:
    """`work(session, i)` for i in range(n) from `clients` threads, each with its own connection."""
    import requests
    local = threading.local()

    def call(i):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return work(local.session, i)
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(call, range(n)))


def _metrics(base: str) -> dict[str, float]:
    import requests
    text = requests.get(f"{base}/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(pixclass_prediction_log_\S+) (\S+)$", text, re.M)}


def _wait_until_written(base: str, expected: int, timeout_s: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = _metrics(base)
        done = metrics["pixclass_prediction_log_written_total"] + sum(
            v for k, v in metrics.items() if k.startswith("pixclass_prediction_log_dropped_total"))
        if done >= expected or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def _dropped(metrics: dict) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("pixclass_prediction_log_dropped_total"))


def _cli(capsys, *args) -> tuple[int, str]:
    """`pixclass ARGS` in this process: (exit code, stderr)."""
    from pixclass.cli import main
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    return exit_.value.code, capsys.readouterr().err


def test_concurrent_predictions_are_all_logged_and_corrections_export(log_url, model, images, tmp_path, capsys):
    import requests
    proc, base = start_server(model, "--log-db", log_url, "--log-images")
    try:
        start = time.perf_counter()
        answers = _concurrently(16, 1000, lambda s, i: _post_image(s, base, f"{i}.png", images[i % len(images)][1]))
        with capsys.disabled():
            print(f"\n{log_url.split(':')[0]}: 1000 predictions from 16 clients in {time.perf_counter() - start:.1f} s")
        metrics = _wait_until_written(base, 1000)
        assert metrics["pixclass_prediction_log_written_total"] == 1000 and _dropped(metrics) == 0, metrics

        # correct the first 12 images (distinct ones): half to their true class, half to another;
        # one is corrected twice, the later correction counts
        corrections = {}
        for i in range(12):
            true_class, _ = images[i]
            label = true_class if i % 2 else next(c for c in ("circle", "square", "triangle") if c != true_class)
            corrections[answers[i]["id"]] = (label, i)
        first = answers[0]["id"]
        requests.post(f"{base}/v1/feedback", json={"prediction_id": first, "label": "circle"}, timeout=10)
        for pid, (label, _) in corrections.items():
            r = requests.post(f"{base}/v1/feedback", json={"prediction_id": pid, "label": label}, timeout=10)
            assert r.status_code == 200 and r.json()["label"] == label, r.text

        # the API pages through the whole log, newest first, each prediction once, with its feedback
        seen, cursor = [], None
        while True:
            page = requests.get(f"{base}/v1/predictions", params={"limit": 300, **({"cursor": cursor} if cursor else {})},
                                timeout=30).json()
            seen += page["predictions"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == 1000 and {p["id"] for p in seen} == {a["id"] for a in answers}
        assert {p["id"]: p["feedback"] for p in seen if p["feedback"]} == {k: v[0] for k, v in corrections.items()}
    finally:
        proc.terminate()
        proc.wait(30)

    rows = _logged(log_url)
    assert len(rows) == 1000 and len({r["id"] for r in rows}) == 1000  # all there, none twice
    by_id = {r["id"]: r for r in rows}
    for i, answer in enumerate(answers):
        row = by_id[answer["id"]]
        assert row["image"] == images[i % len(images)][1] and row["predicted"] == answer["top_k"][0]["class"]
    assert {r["id"]: r["feedback"] for r in rows if r["feedback"]} == {k: v[0] for k, v in corrections.items()}

    out = tmp_path / "corrected"
    code, err = _cli(capsys, "feedback", "export", log_url, out)
    assert code == 0, err
    expected = {f"{label}/{hashlib.sha256(images[i][1]).hexdigest()[:16]}.png": images[i][1]
                for label, i in corrections.values()}
    written = {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    assert written == expected
    code, err = _cli(capsys, "feedback", "export", log_url, out)  # nothing overwritten, nothing added
    assert code == 0 and "wrote 0 image(s)" in err and "12 already there" in err, err


@pytest.mark.slow
def test_a_database_outage_fails_no_request_and_logging_resumes(postgres, model, images):
    import requests
    url = postgres.new_database()
    proc, base = start_server(model, "--log-db", url, "--log-queue", "100")
    sent, failures, health = [], [], []
    stop = threading.Event()

    def client(k):
        session = requests.Session()
        i = 0
        while not stop.is_set():
            try:
                answer = _post_image(session, base, f"{k}-{i}.png", images[(k * 7 + i) % len(images)][1])
                sent.append((time.monotonic(), answer["id"]))
            except Exception as e:  # noqa: BLE001 - every failure is what the test counts
                failures.append(repr(e))
            i += 1

    def health_check():
        while not stop.is_set():
            try:
                health.append(requests.get(f"{base}/healthz", timeout=5).status_code)
            except Exception as e:  # noqa: BLE001
                health.append(repr(e))
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)] + [threading.Thread(target=health_check)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        postgres.stop()
        time.sleep(3.0)
        postgres.start()
        restarted = time.monotonic()
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(30)
        metrics = _wait_until_written(base, len(sent))
    finally:
        stop.set()
        proc.terminate()
        proc.wait(30)

    assert failures == [] and len(sent) > 300
    assert health and all(status == 200 for status in health), [h for h in health if h != 200][:5]
    rows = _logged(url)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) and set(ids) <= {pid for _, pid in sent}
    # each prediction is either in the log or counted as not logged
    assert metrics["pixclass_prediction_log_written_total"] == len(rows)
    assert len(rows) + _dropped(metrics) == len(sent)
    assert metrics['pixclass_prediction_log_dropped_total{reason="queue_full"}'] > 0
    # after the restart (and the writer's next retry, at most a second later) logging resumed
    after = {pid for moment, pid in sent if moment > restarted + 1.5}
    assert after and after <= set(ids)
    assert metrics["pixclass_prediction_log_up"] == 1
    print(f"outage: {len(sent)} predictions answered 200, {len(rows)} logged, {_dropped(metrics):.0f} counted as "
          f"not logged, {len(after)} sent 1.5 s or more after the restart all logged; {len(health)} /healthz all 200")


def test_feedback_and_log_routes(model, images, tmp_path):
    from fastapi.testclient import TestClient

    from pixclass.serve.app import Settings, create_app
    db = tmp_path / "log.db"
    app = create_app(Settings(model=str(model), token="s3cret", log_db=str(db), log_images=True,
                              log_image_limit_kb=1, backend="torch"))
    big = images[0][1] + b"\0" * 1024  # a PNG over the 1 KiB limit (trailing bytes after IEND)
    auth = {"Authorization": "Bearer s3cret"}
    with TestClient(app) as client:
        r = client.post("/v1/predict", files=[("files", ("a.png", images[1][1], "image/png")),
                                              ("files", ("big.png", big, "image/png"))],
                        headers={**auth, "X-Request-ID": "req-42"})
        assert r.status_code == 200 and r.headers["X-Request-ID"] == "req-42" and r.json()["request_id"] == "req-42"
        small_id, big_id = (p["id"] for p in r.json()["predictions"])
        for pid in (small_id, big_id):  # feedback right away: it waits for its prediction to be written
            assert client.post("/v1/feedback", json={"prediction_id": pid, "label": "square"}, headers=auth).status_code == 200

        assert client.post("/v1/feedback", json={"prediction_id": "0" * 32, "label": "square"},
                           headers=auth).json()["error"] == "not_found"
        r = client.post("/v1/feedback", json={"prediction_id": small_id, "label": "dog"}, headers=auth)
        assert r.status_code == 422 and r.json()["error"] == "unknown_class"
        assert client.post("/v1/feedback", json={"label": "square"}, headers=auth).status_code == 400
        for route, call in (("/v1/feedback", lambda: client.post("/v1/feedback", json={"prediction_id": small_id,
                                                                                        "label": "circle"})),
                            ("/v1/predictions", lambda: client.get("/v1/predictions"))):
            assert call().status_code == 401, route
        assert client.get("/v1/predictions?cursor=abc", headers=auth).status_code == 400

        page = client.get("/v1/predictions?limit=1", headers=auth).json()
        assert [p["id"] for p in page["predictions"]] == [big_id] and page["predictions"][0]["image_stored"] is False
        older = client.get(f"/v1/predictions?limit=1&cursor={page['next_cursor']}", headers=auth).json()
        assert [p["id"] for p in older["predictions"]] == [small_id] and older["next_cursor"] is None
        logged = older["predictions"][0]
        assert logged["request_id"] == "req-42" and logged["feedback"] == "square" and logged["image_stored"]
        assert logged["image_sha256"] == hashlib.sha256(images[1][1]).hexdigest()
        assert logged["model_digest"] == client.get("/v1/model", headers=auth).json()["digest"]

    from pixclass.serve.feedback_export import export_corrections
    result = export_corrections(str(db), tmp_path / "out")
    assert result.written == {"square": 1} and result.without_image == 1


def test_without_a_log_there_are_no_log_routes_and_no_sqlalchemy(model):
    import subprocess
    import sys
    code = ("import sys\nimport pixclass.cli\nfrom pixclass.serve.app import Settings, create_app\n"
            f"app = create_app(Settings(model={str(model)!r}))\n"
            "paths = {route.path for route in app.routes}\n"
            "assert '/v1/predict' in paths and not paths & {'/v1/feedback', '/v1/predictions'}, paths\n"
            "assert 'sqlalchemy' not in sys.modules, 'imported without a log'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_log_mistakes_are_one_line_errors(model, tmp_path, capsys):
    import sqlalchemy as sa

    from pixclass.serve.log_db import open_log
    (tmp_path / "empty.db").touch()
    (tmp_path / "a-file").touch()
    engine = open_log(str(tmp_path / "newer.db"), create=True)
    with engine.begin() as connection:  # as if a later pixclass had migrated it
        connection.execute(sa.text("UPDATE pixclass_alembic_version SET version_num = '9999'"))
    engine.dispose()
    cases = [
        (("serve", model, "--log-db", "postgresql://nobody@127.0.0.1:1/none"), "Connection refused"),
        (("serve", model, "--log-db", "mysql://x/y"), "SQLite and PostgreSQL"),
        (("serve", model, "--log-images"), "--log-images needs --log-db"),
        (("serve", model, "--log-db", tmp_path / "newer.db"), "newer pixclass"),
        (("feedback", "export", tmp_path / "missing.db", tmp_path / "out"), "no such prediction log"),
        (("feedback", "export", tmp_path / "empty.db", tmp_path / "out"), "holds no pixclass prediction log"),
        (("feedback", "export", tmp_path / "empty.db", tmp_path / "a-file"), "is a file"),
    ]
    for args, message in cases:
        code, err = _cli(capsys, *args)
        assert code == 2 and message in err, (args, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
