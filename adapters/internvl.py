"""Graft a visual-token compressor onto InternVL (transformers' `InternVLForConditionalGeneration`).

    graft = graft_compressor(model, AvgPool(2), processor=processor)    # dispatches here
    inputs = processor(images=[photo], text=["<image>\\nWhat is it?"], return_tensors="pt")
    model.generate(**inputs)   # every tile gives a quarter of its tokens
    graft.remove()             # the model and processor are exactly as before

InternVL cuts an image into tiles (and a thumbnail) of the vision tower's size; each tile
goes through the tower, loses its CLS token, and is pixel-shuffled by `downsample_ratio`
(0.5: a 32x32 grid of width C becomes 16x16 of width 4C) before `multi_modal_projector`.
The graft wraps that projector (`CompressedProjector`, as for LLaVA), so the compressor
runs on each tile's shuffled grid, and sets the one number the processor counts from,
its `image_seq_length` (tokens per tile; also the config's), to the compressed count:
every image gets `tiles * out_grid` placeholders, each video frame one tile's worth.
Positions are 1-D.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import InternVLForConditionalGeneration, InternVLModel

from tokencompress.base import Grid, TokenCompressor

from ._projector_graft import ProjectorCompressorGraft, graft_projector_compressor, load_projector_compressor_graft
from .compressor_graft import Placement

__all__ = [
    "INTERNVL_CLASSES",
    "InternVLCompressorGraft",
    "graft_internvl_compressor",
    "internvl_core",
    "load_internvl_compressor_graft",
    "shuffled_sizes",
]

INTERNVL_CLASSES: tuple[type[nn.Module], ...] = (InternVLForConditionalGeneration, InternVLModel)


def internvl_core(model: nn.Module, caller: str = "this graft") -> InternVLModel:
    """The `InternVLModel` inside `model` (or `model` itself)."""
    if isinstance(model, InternVLForConditionalGeneration):
        return model.model
    if isinstance(model, InternVLModel):
        return model
    raise TypeError(
        f"{caller} supports transformers' InternVLForConditionalGeneration and InternVLModel "
        f"(model_type 'internvl'), got {type(model).__name__}"
    )


def _side(value: Any) -> int:
    """One side of a size that InternVL configs give as an int or a [height, width] pair."""
    sides = {int(side) for side in value} if isinstance(value, (list, tuple)) else {int(value)}
    if len(sides) != 1:
        raise ValueError(f"graft_compressor needs square vision tiles, got {value!r}")
    return sides.pop()


def shuffled_sizes(config: Any) -> tuple[Grid, int, int]:
    """A tile's grid after the pixel shuffle, and the projector's (input, output) widths."""
    vision = config.vision_config
    side = _side(vision.image_size) // _side(vision.patch_size)
    factor = round(1 / config.downsample_ratio)
    if side % factor or abs(factor * config.downsample_ratio - 1) > 1e-9:
        raise ValueError(
            f"downsample_ratio {config.downsample_ratio} must be 1/k for a k that divides the tile's grid side {side}"
        )
    return (side // factor,) * 2, vision.hidden_size * factor**2, config.text_config.hidden_size


class InternVLCompressorGraft(ProjectorCompressorGraft):
    """What `graft_compressor` changed on an InternVL model (see `ProjectorCompressorGraft`)."""

    family = "InternVL"
    record_format = "tokencompress.internvl_compressor_graft"
    record_version = 1

    @classmethod
    def sizes(cls, core: nn.Module) -> tuple[Grid, int, int]:
        config = core.config
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise ValueError(
                "the compressor needs one feature layer without its CLS token (vision_feature_select_strategy "
                f"'default', an int vision_feature_layer); got {config.vision_feature_select_strategy!r} and "
                f"{config.vision_feature_layer!r}"
            )
        return shuffled_sizes(config)

    @classmethod
    def check_fit(cls, core: nn.Module, processor: Any | None, grid: Grid, out_grid: Grid) -> None:
        if processor is None:
            return
        if not isinstance(getattr(processor, "image_seq_length", None), int):
            raise TypeError(
                f"processor must be an InternVLProcessor (or have its int `image_seq_length`), got "
                f"{type(processor).__name__}"
            )
        if processor.image_seq_length != grid[0] * grid[1]:
            raise ValueError(
                f"the processor's image_seq_length is {processor.image_seq_length}, not the {grid[0] * grid[1]} "
                f"tokens of a tile's shuffled grid {grid}: it follows another compressor graft, or another "
                "model; remove() that graft first"
            )

    def _install(self) -> None:
        count = self.out_grid[0] * self.out_grid[1]
        self._override(self._core.config, "image_seq_length", lambda _: count)
        if self.processor is not None:
            self._override(self.processor, "image_seq_length", lambda _: count)


def graft_internvl_compressor(
    model: nn.Module,
    compressor: TokenCompressor,
    *,
    processor: Any | None = None,
    placement: Placement = "auto",
    projector: nn.Module | None = None,
) -> InternVLCompressorGraft:
    """`graft_compressor` for InternVL: run `compressor` on every tile's pixel-shuffled grid
    (width 4C for downsample_ratio 0.5); `placement` and `projector` as for LLaVA."""
    return graft_projector_compressor(
        InternVLCompressorGraft, internvl_core(model, "graft_compressor"), model, compressor,
        processor=processor, placement=placement, projector=projector,
    )


def load_internvl_compressor_graft(
    model: nn.Module,
    folder: str | Path,
    *,
    processor: Any | None = None,
    compressor: TokenCompressor | None = None,
    projector: nn.Module | None = None,
) -> InternVLCompressorGraft:
    """`load_compressor_graft` for InternVL (see it)."""
    return load_projector_compressor_graft(
        InternVLCompressorGraft, internvl_core(model, "load_compressor_graft"), model, folder,
        processor=processor, compressor=compressor, projector=projector,
    )
