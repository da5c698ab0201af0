import json

from conftest import run_cli


def test_demo_reaches_95_percent_on_digits(tmp_path):
    proc = run_cli("demo", "--out", tmp_path / "demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "demo" / "evaluation" / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.95 and metrics["n"] > 200
    assert "test accuracy" in proc.stderr and "run folder" in proc.stderr
