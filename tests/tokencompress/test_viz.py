"""tokencompress.viz: values of the maps, the PNGs, errors, and capture from whole models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from tokencompress import SAP, EmbQ  # noqa: E402
from tokencompress.viz import (  # noqa: E402
    attention_maps_from_modules,
    capture_attention_maps,
    draw_attention_maps,
    draw_embq_attention,
    draw_model_attention,
    draw_sap_weights,
    embq_attention_map,
    overlay_heat_map,
    sap_weight_map,
    upsample_token_map,
)

WHITE = (255, 255, 255)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def sap_weights(grid: tuple[int, int], dim: int = 8, window: int = 3) -> tuple[SAP, torch.Tensor, torch.Tensor]:
    sap = SAP(dim, window=window).eval()
    x = torch.randn(1, grid[0] * grid[1], dim)
    with torch.no_grad():
        _, weights = sap(x, grid, return_weights=True)
    return sap, x, weights


# -- maps ---------------------------------------------------------------------------------
def test_sap_weight_map_is_row_major_over_the_grid() -> None:
    _, _, weights = sap_weights((7, 5))
    token_map = sap_weight_map(weights, (7, 5))
    assert token_map.shape == (7, 5)
    for row in range(7):
        for col in range(5):
            assert token_map[row, col] == weights[0, row * 5 + col]
    # Each 3x3 window (edge windows smaller) sums to 1.
    for top in range(0, 7, 3):
        for left in range(0, 5, 3):
            assert float(token_map[top:top + 3, left:left + 3].sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(sap_weight_map(weights[0], (7, 5)), token_map)  # (H*W,) too


@pytest.mark.parametrize("grid, size", [((27, 27), (384, 384)), ((3, 4), (37, 50)), ((5, 2), (11, 3))])
def test_upsampled_heat_map_at_a_pixel_is_the_weight_of_the_token_covering_it(
    grid: tuple[int, int], size: tuple[int, int]
) -> None:
    _, _, weights = sap_weights(grid)
    width, height = size
    heat = upsample_token_map(sap_weight_map(weights, grid), size)
    assert heat.shape == (height, width)
    for y in range(height):
        for x in range(width):
            # Token (r, c) covers rows [r * height / H, (r + 1) * height / H), and so on.
            row = next(r for r in range(grid[0]) if r * height / grid[0] <= y < (r + 1) * height / grid[0])
            col = next(c for c in range(grid[1]) if c * width / grid[1] <= x < (c + 1) * width / grid[1])
            assert heat[y, x] == float(weights[0, row * grid[1] + col])


def test_embq_attention_map_mean_and_each() -> None:
    attention = torch.rand(9, 12).softmax(-1)
    mean = embq_attention_map(attention, (3, 4))
    assert mean.shape == (3, 4)
    assert torch.allclose(mean.flatten(), attention.mean(0))
    each = embq_attention_map(attention[None], (3, 4), reduce="each")
    assert each.shape == (9, 3, 4)
    assert torch.equal(each[4].flatten(), attention[4])


def test_overlay_colours_the_strongest_token_with_the_top_colour() -> None:
    from matplotlib import colormaps

    heat = np.array([[0.0, 0.25], [0.5, 1.0]])
    pixels = overlay_heat_map(np.zeros((2, 2, 3), dtype=np.uint8), heat, alpha=1.0, cmap="viridis")
    top = np.round(np.asarray(colormaps["viridis"](1.0)[:3]) * 255).astype(np.uint8)
    bottom = np.round(np.asarray(colormaps["viridis"](0.0)[:3]) * 255).astype(np.uint8)
    assert (pixels[1, 1] == top).all() and (pixels[0, 0] == bottom).all()
    # alpha=0 leaves the image as it was.
    image = np.asarray(random_image(2, 2))
    assert (overlay_heat_map(image, heat, alpha=0.0) == image).all()


# -- pictures -----------------------------------------------------------------------------
def test_draw_sap_weights_writes_a_png_of_the_image_size_with_window_borders(tmp_path: Path) -> None:
    _, _, weights = sap_weights((6, 6))
    image = random_image(120, 90)
    path = tmp_path / "nested" / "sap.png"
    returned = draw_sap_weights(image, weights, (6, 6), path, alpha=0.0)
    with Image.open(path) as written:
        assert written.format == "PNG" and written.size == (120, 90) and written.mode == "RGB"
        pixels = np.asarray(written)
    assert (np.asarray(returned) == pixels).all()
    # Window borders after 3 of 6 tokens: x = 60, y = 45; alpha=0 leaves the rest the image.
    assert (pixels[:, 60] == WHITE).all() and (pixels[45, :] == WHITE).all()
    original = np.asarray(image)
    assert (pixels[:40, :55] == original[:40, :55]).all()


def test_draw_sap_weights_accepts_arrays_and_tensors(tmp_path: Path) -> None:
    _, _, weights = sap_weights((3, 3))
    array = np.asarray(random_image(30, 20))
    as_uint8 = draw_sap_weights(array, weights, (3, 3), tmp_path / "a.png")
    as_float = draw_sap_weights(torch.tensor(array).permute(2, 0, 1) / 255.0, weights, (3, 3), None)
    assert as_uint8.size == as_float.size == (30, 20)
    assert np.abs(np.asarray(as_uint8, dtype=int) - np.asarray(as_float, dtype=int)).max() <= 1
    assert draw_sap_weights(array[:, :, 0], weights.numpy(), (3, 3), None).size == (30, 20)  # grey


@pytest.mark.parametrize("queries, columns, expected", [(9, None, (3, 3)), (5, None, (3, 2)), (4, 4, (4, 1))])
def test_draw_embq_attention_sizes(
    tmp_path: Path, queries: int, columns: int | None, expected: tuple[int, int]
) -> None:
    attention = torch.rand(queries, 16).softmax(-1)
    image = random_image(40, 30)
    mean_path, each_path = tmp_path / "mean.png", tmp_path / "each.png"
    draw_embq_attention(image, attention, (4, 4), mean_path)
    draw_embq_attention(image, attention, (4, 4), each_path, reduce="each", columns=columns)
    with Image.open(mean_path) as mean, Image.open(each_path) as each:
        assert mean.size == (40, 30)
        assert each.size == (40 * expected[0], 30 * expected[1])


# -- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights, grid, message",
    [
        (torch.rand(2, 9), (3, 3), "one image at a time"),
        (torch.rand(10), (3, 3), "holds 9"),
        (torch.rand(1, 3, 3), (3, 3), r"\(H\*W,\)"),
        (torch.rand(9), (3, 0), "pair of positive ints"),
    ],
)
def test_sap_weight_map_rejects_bad_shapes(weights: torch.Tensor, grid: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sap_weight_map(weights, grid)


@pytest.mark.parametrize(
    "attention, reduce, message",
    [
        (torch.rand(9, 10), "mean", "holds 9"),
        (torch.rand(9, 18), "mean", r"2 images' tokens: pass one image's columns"),
        (torch.rand(2, 9, 9), "mean", "one sample at a time"),
        (torch.rand(0, 9), "mean", "n >= 1"),
        (torch.rand(9, 9), "max", "reduce must be"),
    ],
)
def test_embq_attention_map_rejects_bad_input(attention: torch.Tensor, reduce: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        embq_attention_map(attention, (3, 3), reduce=reduce)  # type: ignore[arg-type]


def test_bad_pictures_raise_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "never.png"
    with pytest.raises(ValueError, match="holds 16"):
        draw_sap_weights(random_image(8, 8), torch.rand(9), (4, 4), path)
    with pytest.raises(ValueError, match=r"\(h, w, 3\)"):
        draw_sap_weights(np.zeros((8, 8, 4), dtype=np.uint8), torch.rand(9), (3, 3), path)
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        draw_embq_attention(torch.rand(8, 8), torch.rand(2, 9), (3, 3), path)
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        draw_embq_attention(random_image(8, 8), [[0.5, 0.5]], (1, 2), path)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        upsample_token_map(torch.rand(9), (4, 4))
    assert not path.exists()


def test_importing_viz_does_not_import_matplotlib() -> None:
    code = "import sys, tokencompress.viz; assert 'matplotlib' not in sys.modules, 'eager import'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- capture from modules and models ------------------------------------------------------
class _Pooler(nn.Module):
    """A model that calls SAP and EmbQ through __call__, as a user's model would."""

    def __init__(self) -> None:
        super().__init__()
        self.sap = SAP(8)
        self.embq = EmbQ(16, 8, inner_dim=8, num_heads=2)

    def forward(self, vision: torch.Tensor, queries: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        pooled = self.sap(vision, (6, 6))
        update = self.embq(queries, text, vision)
        return pooled.sum() + update.sum()


def test_capture_records_what_the_modules_return_and_leaves_outputs_unchanged(tmp_path: Path) -> None:
    model = _Pooler().eval()
    vision, queries, text = torch.randn(2, 36, 8), torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    with torch.no_grad():
        expected = model(vision, queries, text)
        with capture_attention_maps(model) as maps:
            assert torch.equal(model(vision, queries, text), expected)
            # A caller that asks for the weights still gets them.
            tokens, weights = model.sap(vision, (6, 6), return_weights=True)
        direct = attention_maps_from_modules(model.sap, model.embq, vision, grid=(6, 6), queries=queries, text=text)
    assert len(maps.sap_weights) == 4 and maps.sap_grids == [(6, 6)] * 4 and maps.window == 3
    for got, want in zip(maps.sap_weights, direct.sap_weights + [weights[0], weights[1]]):
        assert torch.equal(got, want)
    assert len(maps.embq_attention) == 2
    for got, want in zip(maps.embq_attention, direct.embq_attention):
        assert torch.equal(got, want)
    # The hooks are gone after the block.
    assert not model.sap._forward_hooks and not model.sap._forward_pre_hooks
    assert not model.embq._forward_hooks and not model.embq._forward_pre_hooks
    written = draw_attention_maps(random_image(60, 60), maps, tmp_path, sap_image=1, embq_block=1, prefix="x_")
    assert written == {"sap": tmp_path / "x_sap_weights.png", "embq": tmp_path / "x_embq_attention.png"}
    with pytest.raises(ValueError, match="SAP saw 4 image"):
        draw_attention_maps(random_image(60, 60), maps, tmp_path, sap_image=4)
    with pytest.raises(ValueError, match="1 image.* no embq_image=1"):
        draw_attention_maps(random_image(60, 60), maps, tmp_path, embq_image=1)


def test_capture_removes_its_hooks_when_the_model_raises() -> None:
    model = _Pooler()
    with pytest.raises(ValueError):
        with capture_attention_maps(model):
            model(torch.randn(1, 35, 8), torch.randn(1, 3, 16), torch.randn(1, 4, 16))  # 35 tokens on (6, 6)
    assert not model.sap._forward_hooks and not model.sap._forward_pre_hooks


def test_draw_model_attention_on_a_grafted_llava(tmp_path: Path) -> None:
    from tests.adapters.conftest import TINY, build_tiny_llava, make_images
    from tokencompress.adapters import graft_compressor, graft_embq, pad_prompts

    model, processor = build_tiny_llava("phi", "siglip")
    graft_compressor(model, SAP(TINY["vision_hidden"]), processor=processor)
    queries = graft_embq(
        model, EmbQ(TINY["text_hidden"], TINY["vision_hidden"], inner_dim=16, num_heads=4),
        layer=2, num_queries=3, tokenizer=processor.tokenizer,
    )
    prompt = queries.build_prompt([{"role": "user", "content": "<image>\nWhat is here?"}])
    image = make_images(1)[0]
    inputs = {
        **pad_prompts([prompt], pad_token_id=processor.tokenizer.pad_token_id),
        "pixel_values": processor.image_processor(images=[image], return_tensors="pt")["pixel_values"],
    }
    grid = (TINY["image_size"] // TINY["patch_size"],) * 2
    with torch.no_grad():
        expected = model(**inputs).logits
        with capture_attention_maps(model) as maps:
            assert torch.equal(model(**inputs).logits, expected)
    assert [w.shape for w in maps.sap_weights] == [(grid[0] * grid[1],)] and maps.sap_grids == [grid]
    assert [a.shape for a in maps.embq_attention] == [(3, grid[0] * grid[1])]
    assert torch.allclose(maps.embq_attention[0].sum(-1), torch.ones(3))

    written = draw_model_attention(model, inputs, image, tmp_path)
    for path in written.values():
        with Image.open(path) as picture:
            assert picture.size == image.size
    assert set(written) == {"sap", "embq"}


def test_embq_image_picks_one_image_of_a_multi_image_sample(tmp_path: Path) -> None:
    from tokencompress.viz import AttentionMaps

    attention = torch.rand(3, 2 * 9).softmax(-1)  # one block that read two 3x3 images
    maps = AttentionMaps(embq_attention=[attention])
    image = random_image(30, 30)
    written = draw_attention_maps(image, maps, tmp_path, embq_image=1, grid=(3, 3))
    expected = draw_embq_attention(image, attention[:, 9:], (3, 3), None)
    with Image.open(written["embq"]) as picture:
        assert (np.asarray(picture) == np.asarray(expected)).all()
