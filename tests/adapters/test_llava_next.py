"""The compressor graft on LLaVA-NeXT: per-tile compression, the AnyRes layout on the
compressed tile grid, placeholders per image size; and, for every family whose graft wraps
a LLaVA-style projector (LLaVA-NeXT, LLaVA-OneVision, InternVL; their own layouts are
tested in `test_llava_onevision` and `test_internvl`): generation, batches, remove,
save/load, gradients."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from tests.adapters.conftest import IMAGE_TOKEN, TINY
from tests.adapters.tiny_llava_next import PINPOINTS, TILE, build_tiny_llava_next, inputs_for, make_image
from tests.adapters.tiny_internvl import build_tiny_internvl
from tests.adapters.tiny_llava_onevision import build_tiny_llava_onevision
from tokencompress import SAP, AvgPool, PixelShuffle
from tokencompress.adapters import graft_compressor, load_compressor_graft
from tokencompress.adapters.internvl import InternVLCompressorGraft
from tokencompress.adapters.llava_next import LlavaNextCompressorGraft, pack_image
from tokencompress.adapters.llava_onevision import LlavaOnevisionCompressorGraft

GRID = (TILE // TINY["patch_size"],) * 2  # 8x8 tokens per tile
# Portrait, landscape, square, tiny, very tall, odd: each picks other tiles and crops.
IMAGE_SIZES = [(40, 90), (100, 30), (56, 56), (10, 10), (150, 50), (57, 113)]
COMPRESSORS = {
    "avgpool2": lambda: AvgPool(2),  # 4x4 per tile
    "avgpool4": lambda: AvgPool(4),  # 2x2
    "sap3": lambda: SAP(TINY["vision_hidden"], window=3),  # 3x3
}
#: The families whose graft wraps a LLaVA-style projector: their tiny model and processor,
#: their graft's handle, and the width the compressor gets (an 8x8 grid in each).
FAMILIES = {
    "llava_next": (build_tiny_llava_next, LlavaNextCompressorGraft, TINY["vision_hidden"]),
    "llava_onevision": (build_tiny_llava_onevision, LlavaOnevisionCompressorGraft, TINY["vision_hidden"]),
    "internvl": (build_tiny_internvl, InternVLCompressorGraft, 4 * TINY["vision_hidden"]),
}


# -- a plain reference of the layout -----------------------------------------------------------
def reference_layout(views: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int],
                     newline: torch.Tensor, resize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> torch.Tensor:
    """LLaVA-NeXT's layout, token by token: the base view, then the tiled picture's rows
    (tile row by tile row, token row by token row, across the tiles), cropped to the image's
    aspect ratio, a newline after each row. `resize` maps the cropped (h, w, C) picture
    to another (OneVision's cap) before the rows are read."""
    rows, cols = grid
    tokens = list(views[0])
    if views.shape[0] == 1:
        return torch.stack(tokens + [newline])
    best_height, best_width = select_best_resolution(list(image_size), PINPOINTS)
    tiles_high, tiles_wide = best_height // TILE, best_width // TILE
    height, width = tiles_high * rows, tiles_wide * cols

    def at(y: int, x: int) -> torch.Tensor:
        tile = 1 + (y // rows) * tiles_wide + (x // cols)
        return views[tile][(y % rows) * cols + (x % cols)]

    original_height, original_width = image_size
    top, bottom, left, right = 0, height, 0, width
    if original_width / original_height > width / height:  # wider than the picture: crop rows
        kept = int(round(original_height * width / original_width, 7))
        top = (height - kept) // 2
        bottom = height - top
    else:
        kept = int(round(original_width * height / original_height, 7))
        left = (width - kept) // 2
        right = width - left
    picture = torch.stack([torch.stack([at(y, x) for x in range(left, right)]) for y in range(top, bottom)])
    if resize is not None:
        picture = resize(picture)
    for picture_row in picture:
        tokens += list(picture_row) + [newline]
    return torch.stack(tokens)


def views_of(image_size: tuple[int, int], grid: tuple[int, int], dim: int, seed: int) -> torch.Tensor:
    count = image_size_to_num_patches(list(image_size), PINPOINTS, TILE)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, grid[0] * grid[1], dim, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("grid", [GRID, (4, 4), (3, 3), (2, 3)])
def test_pack_image_equals_the_token_by_token_reference(image_size, grid) -> None:
    views = views_of(image_size, grid, 5, seed=1)
    newline = torch.randn(5, dtype=torch.float64)
    expected = reference_layout(views, image_size, grid, newline)
    got = pack_image(views, torch.tensor(image_size), grid, PINPOINTS, TILE, newline)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_pack_image_on_the_vision_grid_is_transformers_own_packing(image_size) -> None:
    model, _ = build_tiny_llava_next()
    model.double()
    views = views_of(image_size, GRID, TINY["text_hidden"], seed=2)
    sizes = torch.tensor([image_size])
    theirs, lengths = model.model.pack_image_features([views], sizes, "default", image_newline=model.model.image_newline)
    ours = pack_image(views, sizes[0], GRID, PINPOINTS, TILE, model.model.image_newline)
    torch.testing.assert_close(ours, theirs[0], rtol=0, atol=0)
    assert int(lengths[0]) == ours.shape[0]


# -- the grafted model ---------------------------------------------------------------------------
def _reference_features(model: LlavaNextForConditionalGeneration, compressor: nn.Module, pixel_values: torch.Tensor,
                        image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """What the grafted model must produce, computed step by step: each view through the
    vision tower, CLS dropped, compressed, projected, laid out by the reference."""
    core = model.model
    features = []
    for pixels, size in zip(pixel_values, image_sizes):
        count = image_size_to_num_patches(size.tolist(), PINPOINTS, TILE)
        hidden = core.vision_tower(pixels[:count], output_hidden_states=True).hidden_states[-2][:, 1:]
        out_grid = compressor.out_grid(GRID)
        views = core.multi_modal_projector.base_layer(compressor(hidden, GRID))
        features.append(reference_layout(views, tuple(size.tolist()), out_grid, core.image_newline))
    return features


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_placeholders_features_and_the_reference_agree_for_every_image_size(name) -> None:
    model, processor = build_tiny_llava_next()
    compressor = COMPRESSORS[name]()
    graft_compressor(model, compressor, processor=processor)
    images = [make_image(height, width, seed=index) for index, (height, width) in enumerate(IMAGE_SIZES)]
    batch = inputs_for(processor, images, [f"{IMAGE_TOKEN} q"] * len(images))
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
        expected = _reference_features(model, compressor, batch["pixel_values"], batch["image_sizes"])
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    served = processor._get_num_multimodal_tokens(image_sizes=IMAGE_SIZES).num_image_tokens
    assert placeholders == [f.shape[0] for f in features] == [e.shape[0] for e in expected] == served
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    uncompressed = build_tiny_llava_next()[1]
    fewer = inputs_for(uncompressed, images, [f"{IMAGE_TOKEN} q"] * len(images))
    assert all(c < u for c, u in zip(placeholders, (fewer["input_ids"] == model.config.image_token_id).sum(1)))


def _prompts(processor: Any) -> tuple[list, list[str]]:
    images = [make_image(40, 90, seed=3), make_image(100, 30, seed=4)]
    token = processor.image_token
    return images, [f"{token} What is here?", f"{token} Describe the picture in a few words please"]


def _generate(model: nn.Module, batch: dict, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                              pad_token_id=0)[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_with_the_cache_and_in_a_left_padded_batch(family: str) -> None:
    build, graft_class, width = FAMILIES[family]
    model, processor = build()
    graft_compressor(model, AvgPool(2), processor=processor)
    images, texts = _prompts(processor)
    batch = inputs_for(processor, images, texts)
    cached = _generate(model, batch, use_cache=True)
    assert torch.equal(cached, _generate(model, batch, use_cache=False))
    for index in range(len(texts)):
        alone = inputs_for(processor, [images[index]], [texts[index]])
        assert torch.equal(_generate(model, alone, use_cache=True)[0], cached[index])


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_remove_restores_the_model_and_the_processor_bit_for_bit(family: str) -> None:
    build, graft_class, width = FAMILIES[family]
    model, processor = build()
    images, texts = _prompts(processor)
    before = inputs_for(processor, images, texts)
    logits = _logits(model, before)
    states = lambda: (dict(vars(model.model)), dict(vars(model.config)), dict(vars(processor)))  # noqa: E731
    before_states = states()
    graft = graft_compressor(model, SAP(width, window=2), processor=processor)
    assert type(graft) is graft_class and graft.out_grid == (4, 4)
    assert states() != before_states
    assert not torch.equal(inputs_for(processor, images, texts)["input_ids"], before["input_ids"])
    graft.remove()
    after = inputs_for(processor, images, texts)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert torch.equal(_logits(model, after), logits)
    # The instance attributes the graft set are gone, those it shadowed back.
    assert states() == before_states


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_and_load_give_the_same_logits(family: str, tmp_path: Path) -> None:
    build, graft_class, width = FAMILIES[family]
    model, processor = build()
    graft = graft_compressor(model, SAP(width, window=2), processor=processor)
    with torch.no_grad():  # weights of its own, so that loading them is visible
        for parameter in graft.compressor.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    images, texts = _prompts(processor)
    batch = inputs_for(processor, images, texts)
    logits = _logits(model, batch)
    graft.save_pretrained(tmp_path, save_base_model=True)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    reloaded_processor = type(processor).from_pretrained(tmp_path, backend="pil")
    load_compressor_graft(reloaded, tmp_path, processor=reloaded_processor)
    again = inputs_for(reloaded_processor, images, texts)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    torch.testing.assert_close(_logits(reloaded, again), logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_reach_the_compressor(family: str) -> None:
    build, graft_class, width = FAMILIES[family]
    model, processor = build()
    graft = graft_compressor(model, SAP(width, window=2), processor=processor)
    model.train()
    images, texts = _prompts(processor)
    batch = inputs_for(processor, images, texts)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = [p.grad for p in graft.compressor.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_bad_grafts_are_refused_with_the_reason() -> None:
    model, processor = build_tiny_llava_next()
    with pytest.raises(ValueError, match="cannot follow it. Pass projector="):
        graft_compressor(model, PixelShuffle(2), processor=processor)
    graft = graft_compressor(model, AvgPool(2), processor=processor)
    with pytest.raises(ValueError, match="already has a grafted compressor"):
        graft_compressor(model, AvgPool(2), processor=processor)
    graft.remove()
    other = build_tiny_llava_next()[0]
    graft_compressor(other, AvgPool(2), processor=processor)  # the processor now follows `other`
    with pytest.raises(ValueError, match="already follows another compressor graft"):
        graft_compressor(model, AvgPool(2), processor=processor)
    with pytest.raises(ValueError, match="has a CLS token and vision_feature_select_strategy is 'full'"):
        graft_compressor(build_tiny_llava_next(strategy="full")[0], AvgPool(2))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_new_projector_takes_a_width_changing_compressor(family: str) -> None:
    build, graft_class, width = FAMILIES[family]
    model, processor = build()
    projector = nn.Linear(4 * width, TINY["text_hidden"])
    graft_compressor(model, PixelShuffle(2), processor=processor, projector=projector)
    images, texts = _prompts(processor)
    batch = inputs_for(processor, images, texts)
    assert torch.isfinite(_logits(model, batch)).all()
