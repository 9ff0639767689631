"""Graft a visual-token compressor onto LLaVA-NeXT (AnyRes), removably.

    graft = graft_compressor(model, AvgPool(2), processor=processor)    # dispatches here
    inputs = processor(images=[photo, chart], text=prompts, return_tensors="pt", padding=True)
    model.generate(**inputs)   # every tile gives a quarter of its tokens, rows and newlines follow
    graft.remove()             # the model and processor are exactly as before

LLaVA-NeXT encodes each image as a base view plus AnyRes tiles, every one on the vision
grid (H, W). `get_image_features` projects them (one tile per batch row) and
`pack_image_features` lays each image out: the base view's tokens, then the tiles joined
into one picture, cropped to the image's aspect ratio ("unpadding"), with an
`image_newline` token after each row. The processor counts the same layout from the
image's size (`_get_number_of_features`). Under a compressor of `out_grid` (H', W'), the
language model gets exactly the tokens an uncompressed model would get from a vision
encoder whose grid were (H', W'):

- **the tokens**: `multi_modal_projector` is wrapped (`CompressedProjector`, as for
  LLaVA): the compressor runs on every tile and on the base view, on each one's grid;
- **the layout**: the core's `pack_image_features` becomes an instance attribute that
  packs on the (H', W') tile grid (`pack_image`): the same unpadding and newlines;
- **the placeholders**: the processor's `_get_number_of_features` (an instance
  attribute; `replace_image_token` and `_get_num_multimodal_tokens` both ask it) counts
  on the (H', W') grid.

`remove()` deletes the attributes and unwraps the projector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from tokencompress.base import Grid, TokenCompressor

from ._projector_graft import ProjectorCompressorGraft, graft_projector_compressor, load_projector_compressor_graft
from .compressor_graft import Placement

__all__ = [
    "LLAVA_NEXT_CLASSES",
    "LlavaNextCompressorGraft",
    "graft_llava_next_compressor",
    "load_llava_next_compressor_graft",
    "llava_next_core",
    "pack_image",
    "number_of_features",
]

LLAVA_NEXT_CLASSES: tuple[type[nn.Module], ...] = (LlavaNextForConditionalGeneration, LlavaNextModel)


def llava_next_core(model: nn.Module, caller: str = "this graft") -> LlavaNextModel:
    """The `LlavaNextModel` inside `model` (or `model` itself)."""
    if isinstance(model, LlavaNextForConditionalGeneration):
        return model.model
    if isinstance(model, LlavaNextModel):
        return model
    raise TypeError(
        f"{caller} supports transformers' LlavaNextForConditionalGeneration and LlavaNextModel "
        f"(model_type 'llava_next'), got {type(model).__name__}"
    )


# -- the layout, on any tile grid ----------------------------------------------------------
def pack_image(
    views: torch.Tensor,
    image_size: Sequence[int] | torch.Tensor,
    tile_grid: Grid,
    grid_pinpoints: list,
    tile_pixels: int,
    image_newline: torch.Tensor | None,
    max_tiles: int | None = None,
) -> torch.Tensor:
    """One image's tokens in LLaVA-NeXT's layout, for tiles of `tile_grid` (rows, cols) tokens.

    Args:
        views: (1 + num_tiles, rows * cols, C): the base view, then the AnyRes tiles
            row-major over the tile grid that `grid_pinpoints` chose for the image.
        image_size: the image's original (height, width) in pixels.
        tile_pixels: the side of one tile in pixels (the vision tower's image size).
        image_newline: (C,), appended after each row of the tiled picture (and after the
            base view of an image without tiles); None appends nothing.
        max_tiles: LLaVA-OneVision's "anyres_max_N" cap: a cropped picture whose side
            ratio r = sqrt(its tokens / (N * a tile's tokens)) is over 1.1 is resized
            bilinearly by 1/r per side, to about N tiles' worth; None (LLaVA-NeXT) never
            resizes.

    Returns:
        (tokens, C): the base view's tokens, then the tiled picture cropped to the image's
        aspect ratio (and capped), row by row, a newline after each row.
    """
    rows, cols = tile_grid
    base = views[0]
    if views.shape[0] == 1:
        return base if image_newline is None else torch.cat((base, image_newline[None].to(base)), dim=0)
    tiles_high, tiles_wide = get_anyres_image_grid_shape(image_size, grid_pinpoints, tile_pixels)
    channels = views.shape[-1]
    picture = views[1:].view(tiles_high, tiles_wide, rows, cols, channels)
    # (C, tiles_high * rows, tiles_wide * cols): the tiles joined into one picture.
    picture = picture.permute(4, 0, 2, 1, 3).reshape(channels, tiles_high * rows, tiles_wide * cols)
    picture = unpad_image(picture, image_size)
    if max_tiles is not None:
        picture = _cap_picture(picture, rows * cols, max_tiles)
    if image_newline is not None:
        newline = image_newline[:, None, None].expand(channels, picture.shape[1], 1).to(picture)
        picture = torch.cat((picture, newline), dim=-1)
    return torch.cat((base, picture.flatten(1, 2).transpose(0, 1)), dim=0)


def _cap_picture(picture: torch.Tensor, tile_tokens: int, max_tiles: int) -> torch.Tensor:
    """(C, h, w) resized as LLaVA-OneVision does when it holds over `max_tiles` tiles'
    worth of tokens (its rule, with its 1.1 slack and floor division, so that the
    processor's count of the same rule agrees)."""
    _, height, width = picture.shape
    ratio = math.sqrt(height * width / (max_tiles * tile_tokens))
    if ratio <= 1.1:
        return picture
    size = [int(height // ratio), int(width // ratio)]
    return nn.functional.interpolate(picture[None], size, mode="bilinear")[0]


def number_of_features(processor: Any, image_size: Sequence[int], tile_size: Sequence[int], tile_grid: Grid) -> int:
    """The features `pack_image` gives (with newlines, CLS not counted) for an image of
    `image_size` (height, width) processed into tiles of `tile_size` pixels of
    `tile_grid` tokens, as the processor's own formula counts them."""
    best_height, best_width = select_best_resolution(list(image_size), processor.image_processor.image_grid_pinpoints)
    rows, cols = tile_grid
    unpadded, newlines = processor._get_unpadded_features(
        image_size[0], image_size[1], rows, cols, best_height // tile_size[0], best_width // tile_size[1]
    )
    return unpadded + newlines + rows * cols


def _packing_on(core: nn.Module, tile_grid: Grid) -> Callable[..., Any]:
    """`pack_image_features` that lays every image out on `tile_grid`."""
    config = core.config

    def pack_image_features(
        image_features: Sequence[torch.Tensor], image_sizes: torch.Tensor, vision_feature_select_strategy: str,
        image_newline: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        packed = [
            pack_image(views, image_sizes[index], tile_grid, config.image_grid_pinpoints,
                       config.vision_config.image_size, image_newline)
            for index, views in enumerate(image_features)
        ]
        lengths = torch.tensor([tokens.shape[0] for tokens in packed], dtype=torch.long, device=packed[0].device)
        return packed, lengths

    return pack_image_features


def _counting_on(processor: Any, tile_grid: Grid) -> Callable[..., int]:
    """The processor's `_get_number_of_features`, counting on `tile_grid`."""

    def get_number_of_features(orig_height: int, orig_width: int, height: int, width: int) -> int:
        # The processor then takes 1 off for the CLS token under the "default" strategy;
        # num_additional_image_tokens (1 for a CLS token, else 0) gives it back.
        count = number_of_features(processor, (orig_height, orig_width), (height, width), tile_grid)
        return count + processor.num_additional_image_tokens

    return get_number_of_features


# -- the graft --------------------------------------------------------------------------------
class LlavaNextCompressorGraft(ProjectorCompressorGraft):
    """What `graft_compressor` changed on a LLaVA-NeXT model, and how to undo, lift or save it.

    Attributes:
        model: the grafted model.
        processor: the processor whose placeholder counts follow the graft, if given.
        module: the `CompressedProjector` in place of `multi_modal_projector`.
        grid, out_grid: a tile's grid before and after the compressor.
    """

    family = "LLaVA-NeXT"
    record_format = "tokencompress.llava_next_compressor_graft"
    record_version = 1
    refuses_selection = "lays each tile's tokens out on a grid (unpadding, a newline token per row)"

    @classmethod
    def check_fit(cls, core: nn.Module, processor: Any | None, grid: Grid, out_grid: Grid) -> None:
        if processor is not None:
            _check_processor(processor, core.config, grid)

    def _install(self) -> None:
        self._override(self._core, "pack_image_features", lambda _: _packing_on(self._core, self.out_grid))
        if self.processor is not None:
            self._override(self.processor, "_get_number_of_features",
                           lambda _: _counting_on(self.processor, self.out_grid))


def _check_processor(processor: Any, config: Any, grid: Grid) -> None:
    for name in ("_get_number_of_features", "_get_unpadded_features", "image_processor", "patch_size"):
        if not hasattr(processor, name):
            raise TypeError(f"processor must be a LlavaNextProcessor (or have its `{name}`), got {type(processor).__name__}")
    if processor.patch_size != config.vision_config.patch_size:
        raise ValueError(
            f"the processor's patch_size is {processor.patch_size}, the vision tower's {config.vision_config.patch_size}"
        )
    # A processor that does not count the uncompressed layout already follows another graft.
    tile = (config.vision_config.image_size,) * 2
    written = processor._get_number_of_features(*tile, *tile) - processor.num_additional_image_tokens
    expected = number_of_features(processor, tile, tile, grid)
    if written != expected:
        raise ValueError(
            f"the processor counts {written} features for a one-tile image, not {expected}: it already "
            "follows another compressor graft; remove() that graft first"
        )


def graft_llava_next_compressor(
    model: nn.Module,
    compressor: TokenCompressor,
    *,
    processor: Any | None = None,
    placement: Placement = "auto",
    projector: nn.Module | None = None,
) -> LlavaNextCompressorGraft:
    """`graft_compressor` for LLaVA-NeXT: run `compressor` on every tile and base view.

    Args: as `graft_compressor`; `compressor` runs on the vision grid (image_size //
    patch_size per side) of each tile and base view, `placement` and `projector` as for
    LLaVA. A CLS token must be dropped (the "default" strategy).
    """
    return graft_projector_compressor(
        LlavaNextCompressorGraft, llava_next_core(model, "graft_compressor"), model, compressor,
        processor=processor, placement=placement, projector=projector,
    )


def load_llava_next_compressor_graft(
    model: nn.Module,
    folder: str | Path,
    *,
    processor: Any | None = None,
    compressor: TokenCompressor | None = None,
    projector: nn.Module | None = None,
) -> LlavaNextCompressorGraft:
    """`load_compressor_graft` for LLaVA-NeXT (see it)."""
    return load_projector_compressor_graft(
        LlavaNextCompressorGraft, llava_next_core(model, "load_compressor_graft"), model, folder,
        processor=processor, compressor=compressor, projector=projector,
    )
