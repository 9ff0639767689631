"""`read_rgb`: a truncated or corrupt file is an error even where Pillow was told to allow them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tokencompress.images import read_rgb


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "picture.png"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("allowed", [False, True], ids=["default", "truncation-allowed"])
def test_truncated_and_garbage_files_are_errors(picture: Path, allowed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", allowed)  # as lmms-eval's import sets it
    whole = read_rgb(picture)
    assert whole.mode == "RGB" and whole.size == (24, 32)
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(Image.open(picture).convert("RGB")))
    truncated = picture.with_name("truncated.png")
    truncated.write_bytes(picture.read_bytes()[:200])
    with pytest.raises(OSError):
        read_rgb(truncated)
    garbage = picture.with_name("garbage.png")
    garbage.write_bytes(b"not a picture")
    with pytest.raises(OSError):
        read_rgb(garbage)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is allowed  # the switch is put back as it was
