"""SigLIP and FlashSloth-HD preprocessing against plain PIL/NumPy references and known tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.flashsloth.image_processing import (
    FlashSlothHDProcessor,
    SiglipProcessor,
    build_image_processor,
    hd_views,
    pad_to_square,
    split_2x2,
)

S = 16  # tile size for the tests; the real one is 384
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
MEAN_FILL = (127, 127, 127)  # int(0.5 * 255), LLaVA's padding colour for SigLIP


def reference(image: Image.Image, size: int) -> np.ndarray:
    """SigLIP by hand: bicubic squash, /255, (x - 0.5) / 0.5, channels first."""
    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(resized, dtype=np.float64) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)


def value(channel_byte: int) -> float:
    return (channel_byte / 255.0 - 0.5) / 0.5


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def quadrants(width: int, height: int, colours=(RED, GREEN, BLUE, WHITE)) -> Image.Image:
    """TL, TR, BL, BR quadrants of distinct colours."""
    image = Image.new("RGB", (width, height))
    half_w, half_h = width // 2, height // 2
    for (left, top), colour in zip([(0, 0), (half_w, 0), (0, half_h), (half_w, half_h)], colours):
        image.paste(colour, (left, top, left + half_w, top + half_h))
    return image


def assert_colour(tile: torch.Tensor, colour, rows=slice(None), cols=slice(None)):
    expected = torch.tensor([value(c) for c in colour], dtype=torch.float32)
    region = tile[:, rows, cols]
    assert torch.allclose(region, expected[:, None, None].expand_as(region), atol=1e-6), (
        region.mean(dim=(1, 2)), expected)


@pytest.mark.parametrize("width, height", [(50, 30), (16, 16), (7, 40), (100, 100)])
def test_siglip_matches_pil_numpy_reference(width, height):
    image = random_image(width, height)
    out = SiglipProcessor(S)(image)
    assert out.shape == (1, 3, S, S) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), reference(image, S), atol=1e-6)


def test_siglip_exact_values_of_a_flat_colour():
    out = SiglipProcessor(S)(Image.new("RGB", (30, 20), (255, 0, 128)))
    assert torch.all(out[0, 0] == 1.0) and torch.all(out[0, 1] == -1.0)
    assert torch.allclose(out[0, 2], torch.full((S, S), value(128)), atol=1e-7)


def test_siglip_squashes_instead_of_cropping():
    # A 2:1 image whose left half is red and right half blue keeps both halves.
    image = quadrants(64, 32, (RED, BLUE, RED, BLUE))
    out = SiglipProcessor(S)(image)[0]
    assert_colour(out, RED, cols=slice(0, S // 2 - 2))
    assert_colour(out, BLUE, cols=slice(S // 2 + 2, S))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_are_converted_to_rgb(mode):
    image = random_image(20, 20).convert(mode)
    out = SiglipProcessor(S)(image)
    np.testing.assert_allclose(out[0].numpy(), reference(image, S), atol=1e-6)


def test_hd_tiles_of_a_square_image_are_its_quadrants_row_major():
    # A 2S x 2S picture: no padding, no resampling, so each tile is exactly one colour.
    image = quadrants(2 * S, 2 * S)
    out = FlashSlothHDProcessor(S)(image)
    assert out.shape == (5, 3, S, S) and out.dtype == torch.float32
    for tile, colour in zip(out[1:], [RED, GREEN, BLUE, WHITE]):  # TL, TR, BL, BR
        assert_colour(tile, colour)
    # The thumbnail (first) is the whole picture at S x S: its quadrants away from the seams.
    thumb = out[0]
    inner, far = slice(0, S // 2 - 2), slice(S // 2 + 2, S)
    assert_colour(thumb, RED, inner, inner)
    assert_colour(thumb, GREEN, inner, far)
    assert_colour(thumb, BLUE, far, inner)
    assert_colour(thumb, WHITE, far, far)


def test_hd_pads_a_wide_image_with_the_mean_colour_centred():
    # 2S wide, S high: padding adds S/2 rows of grey above and below before tiling.
    image = quadrants(2 * S, S)
    out = FlashSlothHDProcessor(S)(image)
    top, bottom = slice(0, S // 2 - 1), slice(S // 2 + 1, S)
    assert_colour(out[1], MEAN_FILL, rows=top)  # TL: grey band, then the red quadrant
    assert_colour(out[1], RED, rows=bottom)
    assert_colour(out[2], MEAN_FILL, rows=top)  # TR
    assert_colour(out[2], GREEN, rows=bottom)
    assert_colour(out[3], BLUE, rows=top)  # BL: blue quadrant, then grey
    assert_colour(out[3], MEAN_FILL, rows=bottom)
    assert_colour(out[4], WHITE, rows=top)  # BR
    assert_colour(out[4], MEAN_FILL, rows=bottom)
    # The thumbnail is the unpadded picture squashed: no grey in it.
    thumb = out[0]
    assert_colour(thumb, RED, rows=slice(0, S // 2 - 2), cols=slice(0, S // 2 - 2))
    assert_colour(thumb, WHITE, rows=slice(S // 2 + 2, S), cols=slice(S // 2 + 2, S))


@pytest.mark.parametrize("width, height", [(37, 53), (90, 20), (32, 32)])
def test_hd_matches_pil_numpy_reference(width, height):
    image = random_image(width, height, seed=width)
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), MEAN_FILL)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    big = canvas.resize((2 * S, 2 * S), Image.BICUBIC)
    crops = [big.crop((x, y, x + S, y + S)) for y in (0, S) for x in (0, S)]
    expected = np.stack([reference(image, S)] + [reference(c, S) for c in crops])
    out = FlashSlothHDProcessor(S)(image)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_view_helpers():
    assert pad_to_square(Image.new("RGB", (4, 2)), MEAN_FILL).size == (4, 4)
    same = Image.new("RGB", (5, 5))
    assert pad_to_square(same, MEAN_FILL).size == (5, 5)
    tiles = split_2x2(quadrants(8, 8))
    assert [t.getpixel((0, 0)) for t in tiles] == [RED, GREEN, BLUE, WHITE]
    views = hd_views(random_image(30, 10), S, MEAN_FILL)
    assert len(views) == 5 and all(v.size == (S, S) for v in views)
    with pytest.raises(ValueError, match="square image with an even side"):
        split_2x2(Image.new("RGB", (8, 6)))


def test_build_image_processor_and_view_counts():
    plain, hd = build_image_processor(384), build_image_processor(384, hd=True)
    assert (type(plain), plain.num_views, plain.size) == (SiglipProcessor, 1, 384)
    assert (type(hd), hd.num_views, hd.fill) == (FlashSlothHDProcessor, 5, MEAN_FILL)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(TypeError, match="PIL.Image.Image, got ndarray"):
        SiglipProcessor(S)(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        SiglipProcessor(0)
