"""The exported web app classifies a photo in a phone-sized headless Chromium, like
`pixclass predict`, and keeps working with the network cut after the first load."""

import json
from pathlib import Path

import pytest

from conftest import run_cli
from phone_browser import classify, needs_chromium, phone_page, wait_until_ready

OUTPUT = Path(__file__).resolve().parent / "output"


@needs_chromium
def test_webapp_on_a_phone_offline(trained_run, shapes_session, tmp_path):
    app = tmp_path / "webapp"
    proc = run_cli("export", trained_run["model_dir"], "--format", "webapp", "--out", app, "--json")
    assert proc.returncode == 0, proc.stderr
    image = shapes_session / "triangle" / "triangle_005.png"
    predicted = json.loads(run_cli("predict", trained_run["model_dir"], image, "--json").stdout)[0]
    expected = predicted["top_k"][0]["class"]

    errors = []
    with phone_page(app, errors) as (context, page):
        page.wait_for_function("navigator.serviceWorker.controller !== null || "
                               "navigator.serviceWorker.ready.then(() => true)", timeout=30000)
        page.evaluate("navigator.serviceWorker.ready")
        # the answer with the model's abstain threshold (meta.json), as predict gives it
        online = classify(page, image)
        page.screenshot(path=str(tmp_path / "phone.png"))

        context.set_offline(True)  # the network is gone: everything must come from the service worker
        page.reload()
        wait_until_ready(page)
        offline = classify(page, image)
        OUTPUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT / "webapp_phone_offline.png"))
    assert errors == []
    assert online["top"] == expected and offline["top"] == expected
    assert online["answer"] == predicted["answer"]
    # the knn_similarity score, read from the ONNX graph's second output, as predict computes it
    assert float(online["score"]) == pytest.approx(predicted["score"], abs=1e-4)
    meta = json.loads((app / "meta.json").read_text())
    assert meta["abstain"] and meta["abstain"]["threshold"] == pytest.approx(predicted_threshold(trained_run))


def predicted_threshold(run: dict) -> float:
    return json.loads((Path(run["model_dir"]) / "pixclass.json").read_text())["abstain"]["threshold"]
