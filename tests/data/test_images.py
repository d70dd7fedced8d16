"""Reading real-world image files: EXIF orientation, grayscale, 16-bit, palette and RGBA, formats."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ddetr_cli.data.images import ImageReadError, decode_image, read_image
from ddetr_cli.data.transforms import resize_shape


def _rgb(h=30, w=40):
    a = np.zeros((h, w, 3), np.uint8)
    a[:10, :20] = (255, 0, 0)  # a red block at the top-left marks the orientation
    return a


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(_rgb())
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes(), quality=100)
    out = read_image(p)
    assert out.shape == (40, 30, 3)  # width and height swapped
    # the red block ends up at the top-right after a clockwise rotation
    assert out[:15, -8:, 0].mean() > 200 and out[-15:, :8, 0].mean() < 50
    # the same bytes downloaded (ddetr serve, URLs) decode the same way
    assert (decode_image(p.read_bytes(), "http://x/rot.jpg") == out).all()


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tiff", ".webp", ".jpg"])
def test_formats_round_trip(tmp_path, suffix):
    a = _rgb()
    p = tmp_path / f"x{suffix}"
    Image.fromarray(a).save(p, **({"quality": 100} if suffix in (".jpg", ".webp") else {}))
    out = read_image(p)
    assert out.shape == a.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - a).mean() < 8


def test_grayscale_16bit_palette_rgba(tmp_path):
    g = (np.arange(30 * 40).reshape(30, 40) % 256).astype(np.uint8)
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (30, 40, 3) and (out[..., 0] == g).all() and (out[..., 2] == g).all()

    g16 = (np.linspace(0, 65535, 30 * 40).reshape(30, 40)).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255  # scaled, not clipped or wrapped

    Image.fromarray(_rgb()).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png")[0, 0].tolist() == [255, 0, 0]

    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[:, :20, 3] = 255  # left half opaque green, right half transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out[5, 5].tolist() == [0, 255, 0] and out[5, 35].tolist() == [255, 255, 255]


def test_arrays_and_bad_files(tmp_path):
    assert read_image(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert read_image(np.ones((5, 6, 4), np.float32)).max() == 255
    with pytest.raises(ImageReadError):
        read_image(np.zeros((0, 6, 3), np.uint8))
    (tmp_path / "t.jpg").write_text("text")
    with pytest.raises(ImageReadError, match="cannot decode"):
        read_image(tmp_path / "t.jpg")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="^http://x/t.jpg: cannot decode"):
        decode_image(b"text", "http://x/t.jpg")


def test_resize_rule_matches_reference_cases():
    # short side to 800 unless the long side would pass 1333; already-sized images untouched
    assert resize_shape(480, 640) == (800, 1066)
    assert resize_shape(800, 1000) == (800, 1000)
    # the official code rounds the short side first: round(1333*500/2000)=333, int(333*4)=1332
    assert resize_shape(500, 2000) == (333, 1332)
    assert resize_shape(640, 480) == (1066, 800)
