"""DistributedDataParallel on CPU: two gloo processes with half the batch each end where one
process with the whole batch ends."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pixclass.feature_bank import BANK_KEY

from conftest import needs_hymenoptera, run_cli, subset

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpg.tar.gz"


@pytest.fixture(scope="module")
def cifar_2000(cifar_train_400, tmp_path_factory):
    return subset(cifar_train_400, tmp_path_factory.mktemp("cifar2000") / "train", per_class=200).parent


# Two processes sum the batch in another order than one, so the weights differ by float noise
# (1e-8 after a step). A gentle optimizer keeps it there; Adam at 1e-3 or SGD at 0.05 amplify it
# over the epoch's 32 steps to ~1e-3 (measured), as any chaotic training would.
GENTLE_RUN = ["--model", "classic-cnn", "--image-size", "32", "--epochs", "1", "--batch-size", "64",
              "--augment", "standard", "--optimizer", "sgd", "--lr", "0.01", "--split", "1,0,0", "--seed", "7", "-q"]


def without_rank_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


@pytest.fixture(scope="module")
def one_process_run(cifar_2000, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process") / "one"
    one = run_cli("train", cifar_2000, *GENTLE_RUN, "--out", out, "--threads", "1")
    assert one.returncode == 0, one.stderr
    return out


def assert_same_training(one: Path, other: Path) -> None:
    a = load_file(one / "model" / "model.safetensors")
    b = load_file(other / "model" / "model.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-4, diff
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)
    rows = (other / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # one epoch, logged once (by rank 0)
    one_row, other_row = (p.read_text().splitlines()[1].split(",") for p in (one / "metrics.csv", other / "metrics.csv"))
    assert abs(float(one_row[3]) - float(other_row[3])) < 1e-3  # train loss reduced over both ranks


@pytest.mark.ddp
@pytest.mark.skipif(not CIFAR.is_file(), reason="CIFAR-10 archive not available")
def test_two_gloo_processes_match_one_process(cifar_2000, one_process_run, tmp_path):
    two = subprocess.run([sys.executable, "-m", "pixclass", "train", str(cifar_2000), *GENTLE_RUN,
                          "--out", str(tmp_path / "two"), "--nproc", "2"],
                         capture_output=True, text=True, env=without_rank_env(), timeout=600)
    assert two.returncode == 0, two.stderr
    assert_same_training(one_process_run, tmp_path / "two")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
@pytest.mark.skipif(not CIFAR.is_file(), reason="CIFAR-10 archive not available")
def test_two_nodes_with_c10d_rendezvous_match_one_process(cifar_2000, one_process_run, tmp_path):
    """Two "machines" on localhost, one process each, meeting through torchrun's c10d
    rendezvous as nodes on a network do; each node has its own working folder (as separate
    machines have their own disks) and only the first rank writes the run."""
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node in (0, 1):
        work = tmp_path / f"node{node}"
        work.mkdir()
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "pixclass-test",
             "-m", "pixclass", "train", str(cifar_2000), *GENTLE_RUN, "--out", str(work / "run")],
            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=without_rank_env()))
    outputs = [p.communicate(timeout=600) for p in nodes]
    for p, (_, err) in zip(nodes, outputs):
        assert p.returncode == 0, err
    rank0 = [work / "run" for work in (tmp_path / "node0", tmp_path / "node1") if (work / "run" / "model").is_dir()]
    assert len(rank0) == 1  # one run folder in all, on the node that holds rank 0
    assert_same_training(one_process_run, rank0[0])


@pytest.mark.ddp
@needs_hymenoptera
def test_transfer_recipe_under_two_processes_shares_the_feature_work(ants_bees_small, tmp_path):
    """Each rank computes the frozen backbone's features for half of the files; both then train
    with DDP, and only rank 0 writes the run folder and the cache. The features equal those of a
    single process; without dropout (whose masks each rank draws for its own slice) the trained
    head does too, up to float noise."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}

    def train(name, *extra):
        cache = tmp_path / f"cache-{name}"
        proc = subprocess.run([sys.executable, "-m", "pixclass", "train", str(ants_bees_small), "--seed", "3", "-q",
                               "--optimizer", "sgd", "--lr", "0.01", "--out", str(tmp_path / name), *extra],
                              capture_output=True, text=True, env={**env, "PIXCLASS_CACHE_DIR": str(cache)}, timeout=600)
        assert proc.returncode == 0, proc.stderr
        # the images' own features (the single process also caches the held-out images mirrored,
        # for test-time augmentation: entries "digest:tag:view", in a shard of their own)
        features = {k: v for shard in (cache / "features").glob("*/*.safetensors")
                    for k, v in load_file(shard).items() if ":" not in k}
        return features, load_file(tmp_path / name / "model" / "model.safetensors")

    head_only = ["--freeze", "--head-epochs", "3", "--dropout", "0"]
    one_features, one = train("one", *head_only, "--threads", "1")
    two_features, two = train("two", *head_only, "--nproc", "2")
    assert one_features.keys() == two_features.keys() and len(one_features) == 72
    assert max((one_features[k] - two_features[k]).abs().max().item() for k in one_features) < 1e-4
    assert one.keys() == two.keys() and BANK_KEY in one
    assert max((one[k] - two[k]).abs().max().item() for k in one if k != BANK_KEY) <= 1e-4
    # the unknown-answer bank (float16): one process reads it from its cached float16 features, the
    # ranks (which cache no mirrored views) from the images; they differ by that rounding alone
    assert (one[BANK_KEY].float() - two[BANK_KEY].float()).abs().max().item() <= 2e-3
    # the default recipe (head, then fine-tuning the tail) under DDP: logged once, by rank 0
    train("two-finetune", "--head-epochs", "2", "--epochs", "1", "--nproc", "2")
    rows = (tmp_path / "two-finetune" / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == ["head"] * 2 + ["finetune"]


def test_device_and_precision_choices(monkeypatch):
    """What runs where: CPU here; a GPU per local rank and mixed precision where there are GPUs."""
    from pixclass.errors import UserError
    from pixclass.train.distributed import Dist, choose_device
    from pixclass.train.precision import training_autocast

    cpu = torch.device("cpu")
    assert choose_device("auto") == cpu and choose_device("cpu") == cpu
    assert training_autocast("auto", cpu) is None and training_autocast("bf16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="needs a GPU"):
        training_autocast("fp16", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            choose_device("cuda")
    # as on a machine with 2 GPUs (nothing is allocated: only the choice is checked)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device("auto") == torch.device("cuda", 0)
    assert choose_device("auto", Dist(rank=3, world=4, local_rank=1, local_world=2)) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="only 2 GPU"):
        choose_device("cuda:2")
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert training_autocast("auto", gpu) == torch.bfloat16 and training_autocast("fp16", gpu) == torch.float16
    assert training_autocast("fp32", gpu) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 or T4
    assert training_autocast("auto", gpu) == torch.float16


def test_bf16_autocast_trains_on_the_cpu(shapes, tmp_path):
    proc = run_cli("train", shapes, "--model", "classic-cnn", "--image-size", "32", "--epochs", "2", "--precision", "bf16",
                   "--device", "cpu", "--out", tmp_path / "r", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    import json
    summary = json.loads(proc.stdout)
    assert summary["metrics"]["n"] > 0 and (tmp_path / "r" / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "r" / "model" / "pixclass.json").read_text())["config"]["train"]["precision"] == "bf16"
