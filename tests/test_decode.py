import io

import numpy as np
import pytest
from PIL import Image

from pixclass.data.decode import decode_image
from pixclass.data.transforms import Preprocess, image_to_uint8
from pixclass.errors import ImageDecodeError


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"])
def test_common_formats_decode_to_rgb_and_gray(fmt):
    img = Image.new("RGB", (20, 10), (200, 30, 30))
    data = _encode(img, fmt)
    rgb = decode_image(data, channels=3)
    assert rgb.mode == "RGB" and rgb.size == (20, 10)
    assert abs(np.asarray(rgb)[5, 10, 0] - 200) < 16
    assert decode_image(data, channels=1).mode == "L"


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "1"])
def test_every_mode_becomes_8bit_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("I",) else "PNG"
    img = Image.new("RGB", (8, 8), (120, 120, 120)).convert(mode) if mode not in ("I;16", "I") else None
    if mode == "I;16":
        img = Image.fromarray(np.full((8, 8), 40000, np.uint16))
    if mode == "I":
        img = Image.fromarray(np.full((8, 8), 40000, np.int32))
    out = decode_image(_encode(img, fmt), channels=3)
    arr = np.asarray(out)
    assert out.mode == "RGB" and arr.dtype == np.uint8
    if mode in ("I;16", "I"):  # scaled, not clipped: 40000/65535 of full range
        assert abs(int(arr[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode_image(_encode(img, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 30)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_image(buf.getvalue()))
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


@pytest.mark.parametrize("payload", [b"", b"hello, I am text", _encode(Image.new("RGB", (64, 64)), "JPEG")[:200],
                                     b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"])
def test_bad_bytes_raise_typed_error(payload, tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(payload)
    with pytest.raises(ImageDecodeError) as e:
        decode_image(path)
    assert "bad.jpg" in str(e.value)


def test_resize_modes():
    img = Image.new("RGB", (100, 50), (1, 2, 3))
    t = image_to_uint8(img, Preprocess(size=32))
    assert t.shape == (3, 32, 32) and str(t.dtype) == "torch.uint8"
    t = image_to_uint8(img.convert("L"), Preprocess(size=16, channels=1, mean=(0.5,), std=(0.5,), resize="crop", crop_pct=0.875))
    assert t.shape == (1, 16, 16)


def _blank_1bit_png(width: int, height: int) -> bytes:
    """A large image in few bytes: 10000x9000 1-bit pixels compress to about 11 kB."""
    return _encode(Image.new("1", (width, height)), "PNG")


@pytest.mark.parametrize("case", ["over Pillow's own limit too", "under Pillow's limit"])
def test_too_large_quotes_the_max_pixels_in_force(case, monkeypatch):
    from pixclass.data.decode import DEFAULT_MAX_PIXELS, set_max_pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS)  # Pillow's default, whatever ran before
    data, size = ((_blank_1bit_png(10000, 9000), "90,000,000") if case.startswith("over") else
                  (_encode(Image.new("RGB", (40, 30)), "PNG"), "40x30"))
    set_max_pixels(1000)
    try:
        with pytest.raises(ImageDecodeError) as e:
            decode_image(data)
    finally:
        set_max_pixels(None)
    assert e.value.kind == "too_large"
    assert f"({size} pixels, limit 1,000; raise it with --max-pixels)" in e.value.reason
    assert "89478485" not in e.value.reason and "178956970" not in e.value.reason  # never Pillow's limit


def test_a_max_pixels_above_pillows_limit_is_honoured(monkeypatch):
    from pixclass.data.decode import DEFAULT_MAX_PIXELS, open_image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS)
    assert open_image(_blank_1bit_png(10000, 9000), max_pixels=100_000_000).size == (10000, 9000)
