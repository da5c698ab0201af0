"""Nothing a user gives pixclass runs code: pickled payloads in checkpoints, weight files and
model folders are refused, and the decoder fails only with its typed error."""

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pixclass.data.decode import decode_image, set_max_pixels
from pixclass.errors import ImageDecodeError, UserError

from conftest import run_cli


class Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload_files(tmp_path: Path) -> dict[str, Path]:
    marker = tmp_path / "PWNED"
    files = {}
    torch.save({"model": Payload(marker), "epoch": 1}, tmp_path / "evil.pt")  # torch's zip format
    files["pt"] = tmp_path / "evil.pt"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"weight": Payload(marker)}))  # a bare pickle
    files["pth"] = tmp_path / "evil.pth"
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:  # a hand-made zip holding data.pkl
        z.writestr("archive/data.pkl", pickle.dumps(Payload(marker)))
        z.writestr("archive/version", "3\n")
    files["zip"] = tmp_path / "evil.zip"
    return files


def test_pickle_payloads_are_refused_everywhere(tmp_path, shapes):
    from pixclass import artifact
    from pixclass.models.pretrained import read_state_dict
    from pixclass.train.checkpoint import load_checkpoint

    marker = tmp_path / "PWNED"
    for kind, path in _payload_files(tmp_path).items():
        with pytest.raises(UserError):
            load_checkpoint(path)
        with pytest.raises(UserError):
            read_state_dict(path)
        # as a model folder's weights
        folder = tmp_path / f"model-{kind}"
        folder.mkdir()
        (folder / "pixclass.json").write_text('{"format": "pixclass-artifact/1", "arch": {"name": "seed-cnn", '
                                              '"kwargs": {"num_classes": 2, "image_size": 32}}, "classes": ["a", "b"], '
                                              '"preprocess": {"size": 32}}')
        (folder / "model.safetensors").write_bytes(path.read_bytes())
        with pytest.raises(Exception):
            artifact.load(folder)
        # through the command line: --weights, --resume, predict
        proc = run_cli("train", shapes, "--model", "efficientnet_lite0", "--weights", path, "--freeze",
                       "--out", tmp_path / f"w-{kind}", "-q")
        assert proc.returncode == 2 and "cannot read weights" in proc.stderr, proc.stderr
        run = tmp_path / f"r-{kind}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(f"data:\n  path: {shapes}\nmodel:\n  name: seed-cnn\n")
        (run / "checkpoints" / "last.pt").write_bytes(path.read_bytes())
        proc = run_cli("train", "--resume", run, "-q")
        assert proc.returncode == 2 and "cannot load checkpoint" in proc.stderr, proc.stderr
        proc = run_cli("predict", folder, shapes / "circle" / "circle_000.png")
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()


def test_oversized_image_is_rejected_from_the_header(tmp_path):
    # a real PNG header that claims 100000 x 100000 pixels, without the pixels
    Image.new("L", (1, 1)).save(tmp_path / "small.png")
    data = bytearray((tmp_path / "small.png").read_bytes())
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(tmp_path / "bomb.png")
    set_max_pixels(10)
    try:
        Image.new("RGB", (4, 4)).save(tmp_path / "16px.png")
        with pytest.raises(ImageDecodeError, match="too large"):
            decode_image(tmp_path / "16px.png")
    finally:
        set_max_pixels(None)
    assert decode_image(tmp_path / "16px.png").size == (4, 4)


def _seeds() -> list[bytes]:
    out = []
    img = Image.new("RGB", (12, 9), (200, 30, 90))
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()
FUZZ_EXAMPLES = int(os.environ.get("PIXCLASS_FUZZ_EXAMPLES", "300"))


@st.composite
def mutated_images(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


@pytest.mark.fuzz
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.one_of(mutated_images(), st.binary(max_size=512)))
def test_decoder_fuzz_raises_only_the_typed_error(data):
    try:
        img = decode_image(data)
    except ImageDecodeError:
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0
