"""Qwen3-VL's vision tower for the profiler: an image's grid, the tower's inputs, one pass on `meta`.

Qwen3-VL's ViT takes images of any size: patches of `patch_size` pixels (two frames per
temporal patch; an image is its own second frame), `spatial_merge_size`^2 patches merged
into one token of the language model's width by the merger, and DeepStack mergers that turn
the hidden states of a few layers (`deepstack_visual_indexes`) into features of the same
shape, added to the language model's first layers at the visual positions.

The tower computes its position inputs (the bilinear taps into the learned position
table, the rotary positions, the attention boundaries) from `grid_thw` with real values,
so `grid_thw` stays a CPU tensor and the pass runs under `CpuOperandsOnMeta`, which moves
those CPU tensors to `meta` where they meet the activations. Nothing that is counted
(matmuls, convolutions, attention) involves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen3VLVisionConfig

from .profile_meter import CpuOperandsOnMeta, Measurement, measure

__all__ = ["Qwen3VLVisionPass", "patch_grid", "merged_grid", "vision_inputs", "run_vision"]


def patch_grid(config: Qwen3VLVisionConfig, image_size: Sequence[int]) -> tuple[int, int]:
    """(height, width) in patches of an image of `image_size` (height, width) pixels.

    Each side must be a multiple of patch_size * spatial_merge_size (32 for Qwen3-VL), as
    the processor's `smart_resize` makes it.
    """
    side = config.patch_size * config.spatial_merge_size
    sizes = tuple(image_size)
    if len(sizes) != 2 or not all(isinstance(s, int) and s >= side and s % side == 0 for s in sizes):
        raise ValueError(
            f"image_size must be (height, width) in pixels, each a positive multiple of patch_size * "
            f"spatial_merge_size = {side} (what the Qwen3-VL processor resizes to), got {image_size!r}"
        )
    return sizes[0] // config.patch_size, sizes[1] // config.patch_size


def merged_grid(config: Qwen3VLVisionConfig, image_size: Sequence[int]) -> tuple[int, int]:
    """(height, width) of the merged tokens the language model gets for the image."""
    height, width = patch_grid(config, image_size)
    return height // config.spatial_merge_size, width // config.spatial_merge_size


def vision_inputs(
    config: Qwen3VLVisionConfig, image_size: Sequence[int], num_images: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's inputs for `num_images` images of `image_size`: flattened pixel patches
    (meta, (patches, channels * temporal_patch_size * patch_size^2)) and `grid_thw` (CPU)."""
    height, width = patch_grid(config, image_size)
    patch_values = config.in_channels * config.temporal_patch_size * config.patch_size**2
    pixels = torch.empty(num_images * height * width, patch_values, device="meta", dtype=dtype)
    grid_thw = torch.tensor([[1, height, width]] * num_images, dtype=torch.long)
    return pixels, grid_thw


@dataclass(frozen=True)
class Qwen3VLVisionPass:
    """What one pass of the tower gave, per image, and what it cost."""

    merged: torch.Tensor  # (num_images, merged tokens, out_hidden_size)
    deepstack: tuple[torch.Tensor, ...]  # one per DeepStack level, shaped as `merged`
    cost: Measurement


def run_vision(tower: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor) -> Qwen3VLVisionPass:
    """Run `tower` (a `Qwen3VLVisionModel` on meta) once on its inputs and measure it."""
    with CpuOperandsOnMeta():
        out, cost = measure(tower, pixels, grid_thw)
    num_images = grid_thw.shape[0]

    def per_image(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(num_images, -1, tokens.shape[-1])  # the images are of one size

    return Qwen3VLVisionPass(
        merged=per_image(out.pooler_output),
        deepstack=tuple(per_image(level) for level in out.deepstack_features),
        cost=cost,
    )
