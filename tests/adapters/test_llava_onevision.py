"""The compressor graft on LLaVA-OneVision: the AnyRes layout with the anyres_max cap on the
compressed tile grid, multi-image prompts, videos, the processor's counts, bad grafts.
(Generation, batches, remove, save/load and gradients: `test_llava_next`, for both families.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from tests.adapters.conftest import IMAGE_TOKEN, TINY
from tests.adapters.test_llava_next import COMPRESSORS, GRID, IMAGE_SIZES, reference_layout, views_of
from tests.adapters.tiny_llava_next import PINPOINTS, TILE, inputs_for, make_image
from tests.adapters.tiny_llava_onevision import ASPECT_RATIO, VIDEO_TOKEN, build_tiny_llava_onevision
from tokencompress import AvgPool, PixelShuffle, TokenCompressor
from tokencompress.adapters import graft_compressor
from tokencompress.adapters.llava_next import pack_image
from tokencompress.adapters.llava_onevision import max_tiles_of, pool_frames

MAX_TILES = max_tiles_of(ASPECT_RATIO)
# 112x112 and 168x56 pick 2x2 and 3x1 tiles: over the cap of two tiles, so resized.
SIZES = [*IMAGE_SIZES, (112, 112), (168, 56), (60, 200)]


# -- plain references -------------------------------------------------------------------------
def bilinear(picture: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(h, w, C) resized to (height, width, C), pixel by pixel: bilinear, half-pixel centres,
    sources clamped at 0 (as PyTorch's `interpolate(..., mode="bilinear")`)."""

    def taps(index: int, inside: int, outside: int) -> tuple[int, int, float]:
        source = max((index + 0.5) * inside / outside - 0.5, 0.0)
        low = int(math.floor(source))
        return low, min(low + 1, inside - 1), source - low

    rows = []
    for y in range(height):
        y0, y1, wy = taps(y, picture.shape[0], height)
        row = []
        for x in range(width):
            x0, x1, wx = taps(x, picture.shape[1], width)
            row.append((1 - wy) * ((1 - wx) * picture[y0, x0] + wx * picture[y0, x1])
                       + wy * ((1 - wx) * picture[y1, x0] + wx * picture[y1, x1]))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def cap(grid: tuple[int, int]) -> callable:
    """OneVision's anyres_max cap for tiles of `grid` tokens, by its rule, on (h, w, C)."""

    def resize(picture: torch.Tensor) -> torch.Tensor:
        ratio = math.sqrt(picture.shape[0] * picture.shape[1] / (MAX_TILES * grid[0] * grid[1]))
        if ratio <= 1.1:
            return picture
        return bilinear(picture, int(picture.shape[0] // ratio), int(picture.shape[1] // ratio))

    return resize


@pytest.mark.parametrize("image_size", SIZES)
@pytest.mark.parametrize("grid", [GRID, (4, 4), (3, 3)])
def test_pack_image_with_the_cap_equals_the_token_by_token_reference(image_size, grid) -> None:
    views = views_of(image_size, grid, 5, seed=1)
    newline = torch.randn(5, dtype=torch.float64)
    expected = reference_layout(views, image_size, grid, newline, resize=cap(grid))
    got = pack_image(views, torch.tensor(image_size), grid, PINPOINTS, TILE, newline, max_tiles=MAX_TILES)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_the_cap_resizes_the_large_pictures_only() -> None:
    lengths = {}
    for image_size in [(112, 112), (40, 90)]:
        views = views_of(image_size, GRID, 3, seed=0)
        capped = pack_image(views, torch.tensor(image_size), GRID, PINPOINTS, TILE, None, max_tiles=MAX_TILES)
        lengths[image_size] = (capped.shape[0], pack_image(views, torch.tensor(image_size), GRID, PINPOINTS, TILE,
                                                           None).shape[0])
    assert lengths[(112, 112)][0] < lengths[(112, 112)][1]  # 2x2 tiles: over the cap
    assert lengths[(40, 90)][0] == lengths[(40, 90)][1]  # 1x2 tiles: within it


@pytest.mark.parametrize("image_size", SIZES)
def test_pack_on_the_vision_grid_is_transformers_own_packing(image_size) -> None:
    model, _ = build_tiny_llava_onevision()
    model.double()
    views = views_of(image_size, GRID, TINY["text_hidden"], seed=2)
    sizes = torch.tensor([image_size])
    theirs, _ = model.model.pack_image_features([views], sizes, model.model.image_newline, ASPECT_RATIO)
    ours = pack_image(views, sizes[0], GRID, PINPOINTS, TILE, model.model.image_newline, MAX_TILES)
    torch.testing.assert_close(ours, theirs[0], rtol=0, atol=0)


def test_pool_frames_on_the_vision_grid_is_transformers_own_pooling() -> None:
    model, _ = build_tiny_llava_onevision()
    frames = torch.randn(3, GRID[0] * GRID[1], 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pool_frames(frames, GRID), model.model.apply_pooling(frames), rtol=0, atol=0)


# -- the grafted model ---------------------------------------------------------------------------
def _views(model: nn.Module, compressor: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Views through the tower (layer -2, "full": no token dropped), compressed, projected."""
    core = model.model
    hidden = core.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    return core.multi_modal_projector.base_layer(compressor(hidden, GRID))


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_placeholders_features_and_the_reference_agree_for_every_image_size(name) -> None:
    model, processor = build_tiny_llava_onevision()
    compressor = COMPRESSORS[name]()
    graft_compressor(model, compressor, processor=processor)
    out_grid = compressor.out_grid(GRID)
    images = [make_image(height, width, seed=index) for index, (height, width) in enumerate(SIZES)]
    batch = inputs_for(processor, images, [f"{IMAGE_TOKEN} q"] * len(images))
    with torch.no_grad():
        features = model.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"], batch_num_images=batch["batch_num_images"]
        ).pooler_output
        expected = []
        for pixels, size in zip(batch["pixel_values"], batch["image_sizes"]):
            count = image_size_to_num_patches(size.tolist(), PINPOINTS, TILE)
            views = _views(model, compressor, pixels[:count])
            expected.append(reference_layout(views, tuple(size.tolist()), out_grid, model.model.image_newline,
                                             resize=cap(out_grid)))
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    served = processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    assert placeholders == [f.shape[0] for f in features] == [e.shape[0] for e in expected] == served
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_multi_image_prompt_gets_each_images_base_view_and_a_newline() -> None:
    model, processor = build_tiny_llava_onevision()
    compressor = AvgPool(2)
    graft_compressor(model, compressor, processor=processor)
    images = [[make_image(112, 112, seed=0), make_image(40, 90, seed=1)], [make_image(57, 113, seed=2)]]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=[f"{IMAGE_TOKEN}{IMAGE_TOKEN} two", f"{IMAGE_TOKEN} one"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        features = model.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"], batch_num_images=batch["batch_num_images"]
        ).pooler_output
        base_views = [_views(model, compressor, pixels[:1]) for pixels in batch["pixel_values"][:2]]
        logits = model(**batch).logits
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    newline = model.model.image_newline
    for got, views in zip(features[:2], base_views):  # the two images of the first prompt
        torch.testing.assert_close(got, torch.cat((views[0], newline[None])), rtol=1e-5, atol=1e-6)
    assert placeholders == [features[0].shape[0] + features[1].shape[0], features[2].shape[0]] == [2 * 17, 52]
    assert torch.isfinite(logits).all()


def test_video_frames_are_compressed_and_pooled_on_the_compressed_grid() -> None:
    model, processor = build_tiny_llava_onevision()
    compressor = AvgPool(2)
    graft_compressor(model, compressor, processor=processor)
    frames = torch.randn(1, 3, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = model.model.get_video_features(frames).pooler_output
        views = _views(model, compressor, frames[0])
    pooled = pool_frames(views, compressor.out_grid(GRID))  # 4x4 -> 2x2 per frame
    expected = torch.cat((pooled.reshape(1, -1, pooled.shape[-1]), model.model.image_newline[None, None]), dim=1)
    torch.testing.assert_close(video, expected, rtol=1e-5, atol=1e-6)
    served = processor._get_num_multimodal_tokens(video_sizes=[(3, TILE, TILE)]).num_video_tokens
    written = processor.replace_video_token({"pixel_values_videos": frames}, 0).count(VIDEO_TOKEN)
    assert video.shape[1] == served[0] == written == 3 * 2 * 2 + 1


class _EveryOtherColumn(TokenCompressor):
    """Keeps every other column: a non-square grid from a square one."""

    @classmethod
    def for_dim(cls, dim):
        return cls()

    def get_config(self):
        return {}

    def out_grid(self, grid):
        return grid[0], (grid[1] + 1) // 2

    def out_dim(self, dim):
        return dim

    def compress(self, x, grid):
        return x.view(x.shape[0], grid[0], grid[1], -1)[:, :, ::2].flatten(1, 2)


def test_bad_grafts_are_refused_with_the_reason() -> None:
    model, processor = build_tiny_llava_onevision()
    with pytest.raises(ValueError, match=r"square compressed tile grid .* maps \(8, 8\) to \(8, 4\)"):
        graft_compressor(model, _EveryOtherColumn(), processor=processor)
    with pytest.raises(ValueError, match="cannot follow it. Pass projector="):
        graft_compressor(model, PixelShuffle(2), processor=processor)
    other_processor = build_tiny_llava_onevision(vision_aspect_ratio="anyres_max_9")[1]
    with pytest.raises(ValueError, match="processor's vision_aspect_ratio is 'anyres_max_9', the model's"):
        graft_compressor(model, AvgPool(2), processor=other_processor)
    graft_compressor(build_tiny_llava_onevision()[0], AvgPool(2), processor=processor)
    with pytest.raises(ValueError, match="num_image_tokens is 16, not the 64 tokens"):
        graft_compressor(model, AvgPool(2), processor=processor)
    assert "pack_image_features" not in vars(model.model)  # nothing half-grafted
    with pytest.raises(ValueError, match="'anyres_max_N' with N >= 1, got 'anyres'"):
        max_tiles_of("anyres")
