"""Memory flat in the dataset's size (issue 18): cached features are float16 in the cache's shards
and read batch by batch unless they fit what the run may hold (--max-memory)."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_shapes, needs_hymenoptera, run_cli

# Growth of the peak resident memory of one process that writes N feature entries of 64 KB (float16)
# through the cache's writer and trains two shuffled epochs' worth of batches on them, read from the
# shards; or with the features held in memory (the control: there the growth must follow N). Growth
# of a few tens of MiB either way is the allocator's, not the features'.
_PEAK_SCRIPT = r"""
import re, sys, tempfile
from pathlib import Path
import torch
from pixclass.train.features import FeatureStore, _FeatureSink
from pixclass.train.feature_rows import rows_from_batches

n, hold = int(sys.argv[1]), sys.argv[2] == "hold"
folder = Path(tempfile.mkdtemp()) / "store"
g = torch.Generator().manual_seed(0)
torch.randn(64, 2, 32768, generator=g).sum()  # the batch-sized allocations, before the baseline
def status_kb(field):
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
base = status_kb("VmRSS")
try:  # the high-water mark restarts from here: imports may have peaked above what follows
    Path("/proc/self/clear_refs").write_text("5")
except OSError:
    sys.exit("no-reset")
sink = _FeatureSink(FeatureStore(folder), None, n, shard_bytes=8 * 2**20)
for i in range(n):
    sink.put(f"k{i}", torch.randn(32768, generator=g))
    sink.done(1)
sink.finish()
rows = FeatureStore(folder).rows([[f"k{i}"] for i in range(n)], torch.zeros(n, dtype=torch.long), list(range(n)))
if hold:
    rows.hold()
pooled = rows_from_batches((x[:, :, :1024] for x, _, _ in rows.batches(64)), rows.labels, rows.paths, hold,
                           folder / "scratch")
total = 0.0
for epoch in range(2):
    for x, y, idx in rows.batches(64, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
        total += float(x[:, 0, :8].sum())
    for x, y, idx in pooled.batches(64, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
        total += float(x.sum())
print((status_kb("VmHWM") - base) * 1024)
"""


def _peak_growth(n: int, mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(n), mode], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode == 1 and proc.stderr.strip() == "no-reset":
        pytest.skip("this kernel does not let a process reset its peak memory (/proc/self/clear_refs)")
    assert proc.returncode == 0, proc.stderr
    return int(float(proc.stdout.strip()))


def test_peak_memory_of_writing_and_reading_features_does_not_follow_their_size():
    entry = 32768 * 2  # float16 bytes per image
    extra_bytes = (3200 - 400) * entry  # 175 MiB more features
    read_400, read_3200 = _peak_growth(400, "read"), _peak_growth(3200, "read")
    assert read_3200 - read_400 < 0.2 * extra_bytes, (read_400, read_3200)
    held_400, held_3200 = _peak_growth(400, "hold"), _peak_growth(3200, "hold")
    assert held_3200 - held_400 > 0.8 * extra_bytes, (held_400, held_3200)  # the measure sees what is held


def test_rows_read_per_batch_equal_the_rows_held(tmp_path):
    from pixclass.train.features import FeatureStore

    store = FeatureStore(tmp_path / "store")
    values = {f"k{i}": torch.randn(3, 4, 5).half() for i in range(50)}
    store.add(dict(list(values.items())[:20]))
    store.add(dict(list(values.items())[20:]), shard_bytes=400)  # several shards
    store = FeatureStore(tmp_path / "store")
    keys = [[f"k{i}", f"k{(i * 7) % 50}"] for i in range(50)]
    rows = store.rows(keys, torch.arange(50), list(range(50)))
    expected = torch.stack([torch.stack([values[k] for k in row]) for row in keys]).float()
    g = torch.Generator().manual_seed(1)
    for x, y, idx in rows.batches(16, shuffle=True, generator=g):
        assert x.dtype == torch.float32 and torch.equal(x, expected[idx]) and torch.equal(y, idx)
    assert torch.equal(rows.hold().tensor(), expected)


@needs_hymenoptera
def test_features_read_from_disk_train_the_model_features_held_train(ants_bees_small, tmp_path):
    """--max-memory below the features' size reads them from the cache per batch: the same model
    as holding them; the run says which it did in one line."""
    args = ["train", ants_bees_small, "--model", "efficientnet_lite0", "--head-epochs", "2", "--epochs", "1",
            "--feature-views", "1", "--seed", "1"]
    held = run_cli(*args, "--out", tmp_path / "held")
    read = run_cli(*args, "--max-memory", "0.002", "--out", tmp_path / "read")
    assert held.returncode == 0 and read.returncode == 0, held.stderr + read.stderr
    held_lines = [line for line in held.stderr.splitlines() if line.startswith("memory: ")]
    read_lines = [line for line in read.stderr.splitlines() if line.startswith("memory: ")]
    assert len(held_lines) == len(read_lines) == 1, held.stderr + read.stderr
    assert "features held in memory" in held_lines[0] and "ceiling 4 GB" in held_lines[0]
    assert "features read from disk per batch" in read_lines[0] and "ceiling 0.002 GB" in read_lines[0]
    a = load_file(tmp_path / "held" / "model" / "model.safetensors")
    b = load_file(tmp_path / "read" / "model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert (tmp_path / "read" / "config.yaml").read_text().count("max_memory_gb: 0.002") == 1


@needs_hymenoptera
def test_cached_float16_features_are_the_backbone_output_within_float16_rounding(ants_bees_small, tmp_path,
                                                                                   monkeypatch):
    from pixclass.data.decode import decode_image
    from pixclass.data.transforms import batch_to_input, image_to_uint8
    from pixclass.models.pretrained import pretrained_preprocess
    from pixclass.models.registry import create_model
    from pixclass.models.transfer import default_cut
    from pixclass.progress import Reporter
    from pixclass.train.features import FrozenPart, extract_features

    monkeypatch.setenv("PIXCLASS_CACHE_DIR", str(tmp_path / "cache"))
    files = sorted(ants_bees_small.rglob("*.jpg"))[:6]
    model, _ = create_model("efficientnet_lite0", 2)
    model.eval()
    pre = pretrained_preprocess(model.backbone)
    cut = default_cut(model)
    splits, _ = extract_features(model, cut, {"train": (files, [0] * 6, 0)}, pre, None, 0, Reporter(quiet=True))
    cached = splits["train"].tensor()[:, 0]
    with torch.inference_mode():
        exact = FrozenPart(model, cut)(batch_to_input(torch.stack([image_to_uint8(decode_image(f), pre)
                                                                   for f in files]), pre))
    assert exact.dtype == torch.float32 and cached.shape == exact.shape
    assert list(load_file(next((tmp_path / "cache" / "features").glob("*/*.safetensors"))).values())[0].dtype == \
        torch.float16
    # float16 keeps 11 significant bits; ONNX Runtime and PyTorch differ by float32 noise
    assert torch.allclose(cached, exact, rtol=2e-3, atol=2e-3), (cached - exact).abs().max()
    assert not torch.equal(cached, exact)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_bad_max_memory_is_one_error_line(value, tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=3)
    proc = run_cli("train", data, "--max-memory", value, "--out", tmp_path / "run")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "--max-memory" in lines[0], lines
    assert not (tmp_path / "run").exists()
