"""Graft a visual-token compressor onto LLaVA-OneVision, removably.

    graft = graft_compressor(model, AvgPool(2), processor=processor)    # dispatches here
    inputs = processor(images=[photo, chart], text=prompts, return_tensors="pt", padding=True)
    model.generate(**inputs)   # every tile gives a quarter of its tokens, rows and newlines follow
    graft.remove()             # the model and processor are exactly as before

LLaVA-OneVision lays images out as LLaVA-NeXT does (`llava_next`: a base view plus AnyRes
tiles, unpadded, an `image_newline` after each row), with three differences, each of
which follows the compressed tile grid (H', W') here, so that the language model gets
exactly the tokens an uncompressed model would get from a vision encoder of grid (H', W'):

- **the "anyres_max_N" cap**: a cropped picture of more than about N tiles' worth of
  tokens is resized down to that (bilinearly); "a tile's worth" is H' * W' tokens
  (`pack_image(..., max_tiles=N)`);
- **several images in one prompt**: each gets its base view only, plus one newline;
- **videos**: each frame goes through the projector (compressed, on the frame's grid)
  and is pooled 2x bilinearly on (H', W') (`apply_pooling`, an instance attribute).

The processor counts all three from one number, its `num_image_tokens` (the tokens of a
view); the graft sets that attribute to H' * W' (plus the CLS token it may count), so
`replace_image_token`, `replace_video_token` and `_get_num_multimodal_tokens` follow.
OneVision's processor assumes square views, so `out_grid` must be square.

`remove()` deletes the attributes (and puts `num_image_tokens` back) and unwraps the
projector.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from tokencompress.base import Grid, TokenCompressor

from ._projector_graft import graft_projector_compressor, load_projector_compressor_graft
from .compressor_graft import Placement
from .llava_next import LlavaNextCompressorGraft, pack_image

__all__ = [
    "LLAVA_ONEVISION_CLASSES",
    "LlavaOnevisionCompressorGraft",
    "graft_llava_onevision_compressor",
    "load_llava_onevision_compressor_graft",
    "llava_onevision_core",
    "max_tiles_of",
    "pool_frames",
]

LLAVA_ONEVISION_CLASSES: tuple[type[nn.Module], ...] = (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)


def llava_onevision_core(model: nn.Module, caller: str = "this graft") -> LlavaOnevisionModel:
    """The `LlavaOnevisionModel` inside `model` (or `model` itself)."""
    if isinstance(model, LlavaOnevisionForConditionalGeneration):
        return model.model
    if isinstance(model, LlavaOnevisionModel):
        return model
    raise TypeError(
        f"{caller} supports transformers' LlavaOnevisionForConditionalGeneration and LlavaOnevisionModel "
        f"(model_type 'llava_onevision'), got {type(model).__name__}"
    )


def max_tiles_of(vision_aspect_ratio: str) -> int:
    """N of OneVision's `vision_aspect_ratio` "anyres_max_N"."""
    match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"vision_aspect_ratio must be 'anyres_max_N' with N >= 1, got {vision_aspect_ratio!r}")
    return int(match.group(1))


def pool_frames(frames: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(F, rows * cols, C) video frames on `grid`, pooled 2x bilinearly as OneVision pools
    them: (F, ceil(rows / 2) * ceil(cols / 2), C)."""
    rows, cols = grid
    count, _, channels = frames.shape
    pictures = frames.view(count, rows, cols, channels).permute(0, 3, 1, 2)
    pooled = nn.functional.interpolate(pictures, size=[math.ceil(rows / 2), math.ceil(cols / 2)], mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(count, -1, channels)


def _packing_on(core: nn.Module, tile_grid: Grid) -> Callable[..., Any]:
    """OneVision's `pack_image_features`, laying every image out on `tile_grid`."""
    config = core.config

    def pack_image_features(
        image_features: Sequence[torch.Tensor], image_sizes: torch.Tensor, image_newline: torch.Tensor | None = None,
        vision_aspect_ratio: str | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        max_tiles = max_tiles_of(vision_aspect_ratio or config.vision_aspect_ratio)
        packed = [
            pack_image(views, image_sizes[index], tile_grid, config.image_grid_pinpoints,
                       config.vision_config.image_size, image_newline, max_tiles)
            for index, views in enumerate(image_features)
        ]
        lengths = torch.tensor([tokens.shape[0] for tokens in packed], dtype=torch.long, device=packed[0].device)
        return packed, lengths

    return pack_image_features


class LlavaOnevisionCompressorGraft(LlavaNextCompressorGraft):
    """What `graft_compressor` changed on a LLaVA-OneVision model (see `LlavaNextCompressorGraft`)."""

    family = "LLaVA-OneVision"
    record_format = "tokencompress.llava_onevision_compressor_graft"
    record_version = 1

    @classmethod
    def check_fit(cls, core: nn.Module, processor: Any | None, grid: Grid, out_grid: Grid) -> None:
        if out_grid[0] != out_grid[1]:
            raise ValueError(
                f"LLaVA-OneVision needs a square compressed tile grid (its processor counts "
                f"sqrt(num_image_tokens) tokens per side); the compressor maps {grid} to {out_grid}"
            )
        max_tiles_of(core.config.vision_aspect_ratio)
        if processor is None:
            return
        for name in ("num_image_tokens", "_get_number_of_features", "vision_aspect_ratio"):
            if not hasattr(processor, name):
                raise TypeError(
                    f"processor must be a LlavaOnevisionProcessor (or have its `{name}`), got {type(processor).__name__}"
                )
        if processor.vision_aspect_ratio != core.config.vision_aspect_ratio:
            raise ValueError(
                f"the processor's vision_aspect_ratio is {processor.vision_aspect_ratio!r}, the model's "
                f"{core.config.vision_aspect_ratio!r}"
            )
        extra = _counted_extra(processor, grid)
        if extra not in (0, 1):
            raise ValueError(
                f"the processor's num_image_tokens is {processor.num_image_tokens}, not the {grid[0] * grid[1]} "
                f"tokens of a view of grid {grid} (or one more, with a CLS token): it follows another "
                "compressor graft, or another model; remove() that graft first"
            )

    def _install(self) -> None:
        self._override(self._core, "pack_image_features", lambda _: _packing_on(self._core, self.out_grid))
        self._override(self._core, "apply_pooling", lambda _: lambda features: pool_frames(features, self.out_grid))
        if self.processor is not None:
            rows, cols = self.out_grid
            extra = _counted_extra(self.processor, self.grid)
            self._override(self.processor, "num_image_tokens", lambda _: rows * cols + extra)


def _counted_extra(processor: Any, grid: Grid) -> int:
    """What the processor's `num_image_tokens` counts beyond a view's grid tokens (a CLS token)."""
    return int(processor.num_image_tokens) - grid[0] * grid[1]


def graft_llava_onevision_compressor(
    model: nn.Module,
    compressor: TokenCompressor,
    *,
    processor: Any | None = None,
    placement: Placement = "auto",
    projector: nn.Module | None = None,
) -> LlavaOnevisionCompressorGraft:
    """`graft_compressor` for LLaVA-OneVision: run `compressor` on every tile, base view and
    video frame, on the vision grid; `placement` and `projector` as for LLaVA."""
    return graft_projector_compressor(
        LlavaOnevisionCompressorGraft, llava_onevision_core(model, "graft_compressor"), model, compressor,
        processor=processor, placement=placement, projector=projector,
    )


def load_llava_onevision_compressor_graft(
    model: nn.Module,
    folder: str | Path,
    *,
    processor: Any | None = None,
    compressor: TokenCompressor | None = None,
    projector: nn.Module | None = None,
) -> LlavaOnevisionCompressorGraft:
    """`load_compressor_graft` for LLaVA-OneVision (see it)."""
    return load_projector_compressor_graft(
        LlavaOnevisionCompressorGraft, llava_onevision_core(model, "load_compressor_graft"), model, folder,
        processor=processor, compressor=compressor, projector=projector,
    )
