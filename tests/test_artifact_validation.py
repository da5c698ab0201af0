"""A tampered or damaged pixclass.json (issue 16, case 11): every command that loads the model
refuses it with one `error:` line naming the file and the field, before building anything; a
Hypothesis fuzz of mutated files never gets anything but a loaded model or that error, never runs
out of memory under a limit, and never opens a file the JSON names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import draw_shape, make_shapes

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures" / "artifacts-6de4714"
FUZZ_EXAMPLES = int(os.environ.get("PIXCLASS_FUZZ_EXAMPLES", "300"))
SENTINEL_NAME = "SENTINEL-never-open"


def save_small_model(folder: Path) -> Path:
    """An untrained classic CNN for 32-px images and three classes, saved as an artifact (what a
    trained one looks like on disk, without the seconds of training)."""
    from pixclass import artifact
    from pixclass.config import ModelConfig
    from pixclass.data.transforms import Preprocess
    from pixclass.models.registry import create_model
    model, arch = create_model("classic-cnn", num_classes=3, in_channels=3, image_size=32,
                               model_cfg=ModelConfig(name="classic-cnn", filters=(8, 16), dense=32))
    art = artifact.Artifact(model=model, arch=arch, classes=["circle", "square", "triangle"],
                            preprocess=Preprocess(size=32, mean=(0.3, 0.3, 0.3), std=(0.3, 0.3, 0.3)),
                            config={"data": {"image_size": 32}}, metrics={"accuracy": 0.9})
    return artifact.save(art, folder)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return save_small_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    import random
    path = tmp_path_factory.mktemp("img") / "circle.png"
    draw_shape("circle", random.Random(0)).save(path)
    return path


def tampered(small_model: Path, dest: Path, change) -> Path:
    """A copy of the model folder whose pixclass.json is `change(meta)` (a dict, None, a list...),
    or the bytes `change` returns."""
    shutil.copytree(small_model, dest)
    meta = json.loads((small_model / "pixclass.json").read_text())
    new = change(meta)
    (dest / "pixclass.json").write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())
    return dest


def with_(section: str, **values):
    return lambda m: {**m, section: {**m[section], **values}}


def with_kwargs(**values):
    return lambda m: {**m, "arch": {**m["arch"], "kwargs": {**m["arch"]["kwargs"], **values}}}


# case: (how the file is changed, the field the error names, words the error says)
TAMPERED = {
    "a JSON array": (lambda m: [1, 2, 3], None, "must hold a JSON object"),
    "null": (lambda m: None, None, "must hold a JSON object"),
    "binary bytes": (lambda m: bytes(range(256)) * 4, None, "not valid JSON"),
    "size 64 on a 32-px model": (with_("preprocess", size=64), "preprocess.size", "built for 32x32"),
    "size 0": (with_("preprocess", size=0), "preprocess.size", "greater than or equal to 8"),
    "size -5": (with_("preprocess", size=-5), "preprocess.size", "greater than or equal to 8"),
    "size 100000": (with_("preprocess", size=100000), "preprocess.size", "less than or equal to 1024"),
    "size as a string": (with_("preprocess", size="32"), "preprocess.size", "valid integer"),
    "shorter class list": (lambda m: {**m, "classes": m["classes"][:2]}, "classes", "2 names for a network with 3"),
    "longer class list": (lambda m: {**m, "classes": m["classes"] + ["ghost"]}, "classes", "4 names"),
    "duplicate class": (lambda m: {**m, "classes": ["a", "a", "b"]}, "classes", "listed twice"),
    "no classes": (lambda m: {**m, "classes": []}, "classes", "at least 1 item"),
    "mean for two channels": (with_("preprocess", mean=[0.5, 0.5]), "preprocess", "3 values each"),
    "zero std": (with_("preprocess", std=[0.3, 0.0, 0.3]), "preprocess.std.1", "greater than 0"),
    "two channels": (with_("preprocess", channels=2), "preprocess.channels", "1 or 3"),
    "grey images for a colour network": (with_("preprocess", channels=1, mean=[0.5], std=[0.5]),
                                         "preprocess.channels", "the network takes 3"),
    "config.data not an object": (lambda m: {**m, "config": {"data": [1]}}, "config", "config.data must be"),
    "unknown format": (lambda m: {**m, "format": "pixclass-artifact/9"}, "format", "pixclass-artifact/1"),
    "arch kwargs naming a checkpoint": (lambda m: {**m, "arch": {"name": "resnet18", "kwargs": {
        "num_classes": 3, "checkpoint_path": f"/tmp/{SENTINEL_NAME}"}}}, "arch.kwargs.checkpoint_path",
        "not a known argument"),
    "arch kwargs with a pretrained_cfg_overlay file": (lambda m: {**m, "arch": {"name": "resnet18", "kwargs": {
        "num_classes": 3, "pretrained_cfg_overlay": {"file": f"/tmp/{SENTINEL_NAME}"}}}},
        "arch.kwargs.pretrained_cfg_overlay", "not a known argument"),
    "a timm name that loads from a folder": (lambda m: {**m, "arch": {"name": f"local-dir:/tmp/{SENTINEL_NAME}",
                                                                      "kwargs": {"num_classes": 3}}},
                                             "arch.name", "should match pattern"),
    "a string for a layer width": (with_kwargs(dense="256"), "arch.kwargs.dense", "valid integer"),
    # within every range, but the weights on disk are for another network: refused from the
    # safetensors header, before the network is allocated
    "class count and classes changed together": (lambda m: {**with_kwargs(num_classes=4)(m), "classes": list("abcd")},
                                                 None, "does not fit the architecture"),
}


@pytest.mark.parametrize("case", TAMPERED, ids=list(TAMPERED))
def test_a_tampered_model_description_is_one_error_line(case, small_model, image, tmp_path, capsys):
    from pixclass.cli import main
    change, field, words = TAMPERED[case]
    model = tampered(small_model, tmp_path / "model", change)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(model), str(image)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(model) in err and words in err, err
    if field:
        assert f"pixclass.json: {field}" in err, err


def test_a_network_too_big_for_memory_is_refused_before_it_is_allocated(small_model, image, tmp_path):
    """Layer widths within range that would make a 12 GB network: the JSON disagrees with the
    weights' shapes, so the load stops before allocating, here under a 1 GiB headroom."""
    model = tampered(small_model, tmp_path / "model", with_kwargs(filters=[8192, 8192], dense=8192))
    script = ("import resource, sys, torch\n"
              "import pixclass.cli, pixclass.artifact, pixclass.predict\n"
              "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))\n"
              "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.RLIM_INFINITY))\n"
              f"pixclass.cli.main(['predict', {str(model)!r}, {str(image)!r}])\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "model.safetensors does not fit the architecture" in proc.stderr


def test_evaluate_refuses_a_shorter_class_list(small_model, tmp_path, capsys):
    """Was an IndexError once the model answered its third class."""
    from pixclass.cli import main
    data = make_shapes(tmp_path / "data", per_class=2, classes=("circle", "square"))
    model = tampered(small_model, tmp_path / "model", lambda m: {**m, "classes": ["circle", "square"]})
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(model), str(data), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "classes: 2 names for a network with 3" in err, err
    assert not (tmp_path / "eval").exists()


def test_the_untampered_model_still_predicts(small_model, image, capsys):
    from pixclass.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(small_model), str(image), "--json"])
    assert exit_.value.code == 0
    assert json.loads(capsys.readouterr().out)[0]["top_k"][0]["class"] in ("circle", "square", "triangle")


def test_a_class_named_after_a_folder_name_that_is_not_utf8_still_loads(small_model, tmp_path):
    """Such a name reaches the JSON as a lone surrogate escape, which json.loads reads back and
    stricter JSON parsers refuse."""
    from pixclass import artifact
    names = ["caf\udce9", "ete", "plain"]
    model = tampered(small_model, tmp_path / "model", lambda m: {**m, "classes": names})
    assert "\\udce9" in (model / "pixclass.json").read_text()
    assert artifact.load(model).classes == names


def test_integers_where_numbers_are_expected_still_load(small_model, tmp_path):
    from pixclass import artifact
    model = tampered(small_model, tmp_path / "model", lambda m: {
        **with_("preprocess", mean=[0, 0, 1], std=[1, 1, 1], crop_pct=1)(m),
        "arch": {**m["arch"], "kwargs": {**m["arch"]["kwargs"], "dropout": 0}}})
    art = artifact.load(model)
    assert art.preprocess.mean == (0.0, 0.0, 1.0) and art.preprocess.crop_pct == 1


@pytest.mark.parametrize("name", ["seed-cnn", "airbench", "timm", "transfer"])
def test_every_earlier_artifact_passes_the_schema(name):
    from pixclass.artifact_schema import read_metadata
    meta = read_metadata(FIXTURES / name / "pixclass.json")
    assert meta.arch == json.loads((FIXTURES / name / "pixclass.json").read_text())["arch"]


def test_serve_refuses_to_start_on_a_tampered_model(small_model, tmp_path):
    model = tampered(small_model, tmp_path / "model", lambda m: {**m, "classes": m["classes"] + ["ghost"]})
    proc = subprocess.run([sys.executable, "-m", "pixclass", "serve", str(model), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "classes: 4 names for a network with 3 outputs" in proc.stderr


# ---- fuzz: mutations of valid pixclass.json files, loaded in a subprocess under a memory limit ----

# numbers just inside and outside the bounds, and ones no network or image of that size fits in memory
_EDGE_NUMBERS = st.sampled_from([0, -5, 1, 2, 3, 7, 8, 9, 31, 32, 33, 64, 1023, 1024, 1025, 4096, 8192, 100_000,
                                 2**31, 2**63, 10**30, 0.5, 1.5, -0.0, 1e308])


def _naming(sentinel: str):
    """Values that name the sentinel file, as a path, a URL, a timm source or a timm config."""
    return st.sampled_from([sentinel, f"file://{sentinel}", f"local-dir:{sentinel}", f"hf-hub:{sentinel}",
                            {"file": sentinel}, {"url": f"file://{sentinel}", "file": sentinel}])


def _json_junk(sentinel: str):
    """Any JSON value, leaning to the ones that break loaders: sizes around the bounds, huge
    numbers, NaN, strings that name a file (the sentinel) or a place timm loads from."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
        _EDGE_NUMBERS,
        st.text(max_size=40), st.sampled_from(["resnet18", "classic-cnn", "airbench", "test_efficientnet"]),
        _naming(sentinel))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                         st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                        max_leaves=12)


# keys a loader could be talked into passing on; the first ones make timm open a file
_FILE_KEYS = ["checkpoint_path", "pretrained_cfg_overlay", "pretrained_cfg", "file", "cache_dir"]
_KEYS_TO_ADD = [*_FILE_KEYS, "pretrained", "img_size", "backbone", "name", "kwargs", "num_classes", "image_size",
                "filters", "widths", "hidden", "dense", "size", "channels", "mean", "std", "crop_pct"]
# where a mutation lands: anywhere, or (more often than chance would) where the loader's
# decisions are made
_TARGETS = [(), (), ("arch",), ("arch", "kwargs"), ("arch", "kwargs"), ("preprocess",), ("preprocess", "size"),
            ("classes",)]


def _paths(value, prefix=()):
    """Every place inside a JSON value: (path from the top, the value there)."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


@st.composite
def mutated_metadata(draw, bases: list[dict], sentinel: str):
    """(which base, the bytes of a mutated copy of its pixclass.json)."""
    junk, naming = _json_junk(sentinel), _naming(sentinel)
    index = draw(st.integers(0, len(bases) - 1))
    meta = json.loads(json.dumps(bases[index]))
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 4)) == 0:  # plant a file-naming argument where a builder would pass it on
            arch = meta.get("arch")
            place = arch.get("kwargs", arch) if isinstance(arch, dict) else None
            if isinstance(place, dict):
                place[draw(st.sampled_from(_FILE_KEYS))] = draw(naming)
            continue
        target = draw(st.sampled_from(_TARGETS))
        places = [(path, value) for path, value in _paths(meta) if path[:len(target)] == target]
        if not places:
            continue
        path, value = draw(st.sampled_from(places))
        parent = meta
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["replace", "replace", "drop", "add"] if path else ["add"]))
        if op == "add" and isinstance(value, dict):
            value[draw(st.one_of(st.sampled_from(_KEYS_TO_ADD), st.text(max_size=12)))] = draw(junk)
        elif op == "add" and isinstance(value, list):
            value.insert(draw(st.integers(0, len(value))), draw(junk))
        elif op == "drop" and path:
            del parent[path[-1]]
        elif path and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[path[-1]] = draw(st.one_of(_EDGE_NUMBERS, _EDGE_NUMBERS, junk))
        elif path:
            parent[path[-1]] = draw(junk)
    text = json.dumps(meta).encode()
    ending = draw(st.sampled_from(["whole"] * 6 + ["cut", "junk"]))
    if ending == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    elif ending == "junk":
        text = draw(st.sampled_from([b"", b"null", b"[1,2,3]", b"\xff\xfe\x00binary", b"[" * 5000,
                                     json.dumps(draw(junk)).encode()]))
    return index, text


def fuzz_artifact_loading(work: Path, examples: int, headroom_bytes: int = 2 * 2**30, shrink: bool = True) -> None:
    """The fuzz body, run in a process of its own: under an address-space limit (what the process
    holds once torch and timm are imported, plus `headroom_bytes`), with an audit hook recording
    every attempt to open a file whose name holds the sentinel."""
    import resource

    import timm
    import torch

    from pixclass import artifact
    from pixclass.errors import UserError

    timm.create_model("resnet18", pretrained=False)  # timm's registry and lazy imports, before the limit
    torch.set_num_threads(1)  # CI's cores are shared; one thread also keeps allocator arenas few
    sentinel = work / SENTINEL_NAME
    sentinel.write_bytes(b"a file the model description names")
    opened = []
    sys.addaudithook(lambda event, args: opened.append(args[0])
                     if event == "open" and SENTINEL_NAME in str(args[0]) else None)

    folders = []
    for source in (save_small_model(work / "base-small"), *(FIXTURES / n for n in ("airbench", "timm", "transfer"))):
        folder = work / f"fuzz-{source.name}"
        shutil.copytree(source, folder)
        folders.append(folder)
    bases = [json.loads((f / "pixclass.json").read_text()) for f in folders]

    with open("/proc/self/status") as status:
        vm_size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + headroom_bytes, resource.RLIM_INFINITY))
    outcomes = {"loaded": 0, "refused": 0}

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=list(Phase) if shrink else [Phase.generate])
    @given(mutated_metadata(bases, str(sentinel)))
    def load_never_fails_otherwise(case):
        index, text = case
        (folders[index] / "pixclass.json").write_bytes(text)
        try:
            art = artifact.load(folders[index])
        except UserError as e:
            # one line, and not an allocation that failed under the limit, passed off as the user's mistake
            assert "\n" not in str(e) and "allocate" not in str(e) and "MemoryError" not in str(e), str(e)
            outcomes["refused"] += 1
        else:
            pre = art.preprocess
            with torch.inference_mode():
                assert art.model(torch.zeros(1, pre.channels, pre.size, pre.size)).shape == (1, len(art.classes))
            outcomes["loaded"] += 1
        assert not opened, f"opened a file the JSON names: {opened[:3]}"

    load_never_fails_otherwise()
    print(json.dumps(outcomes))


def broken_loaders_fail_the_fuzz(work: Path) -> dict:
    """The fuzz harness given two broken loaders, one that opens the file the JSON names and one
    that allocates 120 GB: {loader: the first line of how the fuzz failed, or None}."""
    import torch

    from pixclass import artifact
    from pixclass.errors import UserError

    def opens(folder):
        open(folder.parent / SENTINEL_NAME).close()
        raise UserError("refused, after a look at the file")

    real, failures = artifact.load, {}
    for name, load in {"opens": opens, "allocates": lambda folder: torch.zeros(3, 100_000, 100_000)}.items():
        artifact.load, failures[name] = load, None
        (work / name).mkdir()
        try:
            fuzz_artifact_loading(work / name, 5, shrink=False)
        except BaseException as e:
            failures[name] = str(e).splitlines()[0]
        finally:
            artifact.load = real
    return failures


@pytest.mark.fuzz
def test_fuzzed_model_descriptions_load_or_give_one_user_error(tmp_path):
    """First the harness shows it can fail (so a pass means something), then the real loader."""
    script = (f"import json, sys; sys.path.insert(0, {str(TESTS)!r})\n"
              "from pathlib import Path\n"
              "from test_artifact_validation import broken_loaders_fail_the_fuzz, fuzz_artifact_loading\n"
              f"(Path({str(tmp_path)!r}) / 'broken').mkdir()\n"
              f"print(json.dumps(broken_loaders_fail_the_fuzz(Path({str(tmp_path)!r}) / 'broken')))\n"
              f"(Path({str(tmp_path)!r}) / 'real').mkdir()\n"
              f"fuzz_artifact_loading(Path({str(tmp_path)!r}) / 'real', {FUZZ_EXAMPLES})\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stderr[-6000:]
    broken = json.loads(lines[0])
    assert (broken["opens"] or "").startswith("opened a file the JSON names"), broken
    assert "allocate" in (broken["allocates"] or ""), broken
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    outcomes = json.loads(lines[-1])
    # both sides exercised: harmless mutations (config, metrics, a class name) still load
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0, outcomes
