import json

from conftest import run_cli


def test_demo_reaches_95_percent_on_digits(tmp_path):
    proc = run_cli("demo", "--out", tmp_path / "demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "demo" / "evaluation" / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.95 and metrics["n"] > 200
    assert "test accuracy" in proc.stderr and "run folder" in proc.stderr


def test_demo_never_deletes_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"not the demo's")
    proc = run_cli("demo", "--out", mine, "--epochs", "1", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --out ") and proc.stderr.count("\n") == 1
    assert (mine / "holiday.jpg").read_bytes() == b"not the demo's"
    assert not (tmp_path / "photos-digits").exists()  # refused before anything was written beside it

    demo = tmp_path / "demo"  # an earlier demo run (its config trained on the demo's digits) is replaced
    demo.mkdir()
    (demo / "config.yaml").write_text(f"data:\n  path: {tmp_path / 'demo-digits'}\n")
    (demo / "stale.txt").write_text("from the earlier run")
    proc = run_cli("demo", "--out", demo, "--epochs", "1", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (demo / "model" / "model.safetensors").is_file() and not (demo / "stale.txt").exists()
