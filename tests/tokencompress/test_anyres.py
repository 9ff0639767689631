"""AnyRes layout counts against transformers' LLaVA-NeXT (its packing and its processor's
count) on the vision grid, and against hand-worked layouts on compressed grids."""

from __future__ import annotations

import functools
import types

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextModel, LlavaNextProcessor
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from tokencompress.anyres import LLAVA_NEXT_PINPOINTS, AnyResLayout, anyres_layout

TILE, PATCH = 336, 14
GRID = (TILE // PATCH,) * 2  # CLIP ViT-L/14-336: 24 x 24 tokens per view
# (height, width): square (2x2 tiles), landscape and portrait photos, the tall and wide
# pinpoints exactly, one that needs cropping on both axes' candidates, and a tiny image
# that every resolution upsamples (a tie on effective size, broken by the least waste).
SIZES = [(672, 672), (480, 640), (640, 480), (1000, 400), (400, 1000), (1008, 336), (336, 1008), (500, 700),
         (20, 30), (7, 7)]


@pytest.fixture(scope="module")
def llava_next() -> LlavaNextModel:
    """A LLaVA-NeXT core on meta with llava-v1.6's tiling (336 px tiles, patch 14) and tiny widths."""
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=TILE, patch_size=PATCH, projection_dim=8)
    text = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=64)
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
                             vision_feature_select_strategy="default", vision_feature_layer=-2)
    with torch.device("meta"):
        return LlavaNextModel(config)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layout_is_what_transformers_packs(llava_next, size: tuple[int, int]) -> None:
    layout = anyres_layout(size, LLAVA_NEXT_PINPOINTS, TILE, GRID)
    # The views the model splits pixel values into, then its own packing of their features.
    assert layout.views == image_size_to_num_patches(size, [list(p) for p in LLAVA_NEXT_PINPOINTS], TILE)
    views = torch.empty(layout.views, GRID[0] * GRID[1], 16, device="meta")
    packed, _ = llava_next.pack_image_features(
        [views], torch.tensor([size]), "default", image_newline=llava_next.image_newline
    )
    assert packed[0].shape[0] == layout.tokens  # (on meta its lengths tensor holds no values)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layout_is_what_the_processor_counts(size: tuple[int, int]) -> None:
    # The processor's own formula, called on a stand-in for the processor (a real one needs
    # a tokenizer, which the formula does not use); "default" takes the CLS token off.
    processor = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS]),
        patch_size=PATCH,
        num_additional_image_tokens=0,
        _get_unpadded_features=functools.partial(LlavaNextProcessor._get_unpadded_features, None),
    )
    counted = LlavaNextProcessor._get_number_of_features(processor, *size, TILE, TILE)
    assert anyres_layout(size, LLAVA_NEXT_PINPOINTS, TILE, GRID).tokens == counted


@pytest.mark.parametrize(
    "size, tile_grid, tiles, picture, tokens",
    [
        # 2x2 tiles of 12x12 (AvgPool(2)): 144 + 24 rows of 24 + a newline (docs/adapters.md)
        ((672, 672), (12, 12), (2, 2), (24, 24), 144 + 24 * 24 + 24),
        # 480x640 tiles at 672x672; the 24x24 picture keeps round(480 * 24 / 640) = 18 rows
        ((480, 640), (12, 12), (2, 2), (18, 24), 144 + 18 * 24 + 18),
        # portrait 1000x400 tiles at 1008x336 (3x1); 8x8 tiles (SAP, window 3): 24x8, keeps
        # round(1000 * 8 / 400) = 20 rows, a crop of 2 at the top and at the bottom
        ((1000, 400), (8, 8), (3, 1), (20, 8), 64 + 20 * 8 + 20),
        # tiny 20x30: every resolution holds it whole; 336x672 wastes least (first of a tie):
        # 1x2 tiles, a 12x24 picture keeps round(30 * 12 / 20) = 18 columns
        ((20, 30), (12, 12), (1, 2), (12, 18), 144 + 12 * 18 + 12),
        # a non-square tile grid: 2x2 tiles of 6x4 make a 12x8 picture, taller than the
        # square image: round(672 * 8 / 672) = 8 rows kept, 2 cropped at the top and bottom
        ((672, 672), (6, 4), (2, 2), (8, 8), 24 + 8 * 8 + 8),
    ],
)
def test_layout_on_a_compressed_grid_matches_hand_reference(size, tile_grid, tiles, picture, tokens) -> None:
    layout = anyres_layout(size, LLAVA_NEXT_PINPOINTS, TILE, tile_grid)
    assert layout == AnyResLayout(tiles=tiles, tile_grid=tile_grid, picture=picture)
    assert (layout.tokens, layout.newlines, layout.views) == (tokens, picture[0], 1 + tiles[0] * tiles[1])


def test_vision_grid_reference_figures() -> None:
    """The uncompressed counts the docs quote: 2,928 for a square image, 5 views."""
    layout = anyres_layout((672, 672), LLAVA_NEXT_PINPOINTS, TILE, GRID)
    assert (layout.views, layout.base_tokens, layout.picture, layout.tokens) == (5, 576, (48, 48), 2928)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": (0, 10)}, "image_size must be two positive ints"),
        ({"image_size": (10,)}, "image_size must be two positive ints"),
        ({"tile_grid": (24, 0)}, "tile_grid must be two positive ints"),
        ({"tile_pixels": 0}, "tile_pixels must be a positive int"),
        ({"grid_pinpoints": []}, "grid_pinpoints is empty"),
        ({"grid_pinpoints": [(336, 500)]}, r"\[\(336, 500\)\] are not multiples of tile_pixels=336"),
    ],
)
def test_bad_arguments_are_named(kwargs, message: str) -> None:
    arguments = {"image_size": (672, 672), "grid_pinpoints": LLAVA_NEXT_PINPOINTS, "tile_pixels": TILE,
                 "tile_grid": GRID, **kwargs}
    with pytest.raises(ValueError, match=message):
        anyres_layout(**arguments)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tile_grid", [(12, 12), (8, 8)], ids=["avgpool2", "sap3"])
def test_layout_is_what_the_compressor_graft_packs(size: tuple[int, int], tile_grid: tuple[int, int]) -> None:
    """Our LLaVA-NeXT graft packs compressed views with `pack_image` on the compressor's grid."""
    from tokencompress.adapters.llava_next import pack_image

    layout = anyres_layout(size, LLAVA_NEXT_PINPOINTS, TILE, tile_grid)
    views = torch.empty(layout.views, tile_grid[0] * tile_grid[1], 16, device="meta")
    newline = torch.empty(16, device="meta")
    packed = pack_image(views, size, tile_grid, [list(p) for p in LLAVA_NEXT_PINPOINTS], TILE, newline)
    assert packed.shape[0] == layout.tokens
