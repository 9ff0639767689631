"""Image grids under a compressor: what the vision tower, the prompt and mRoPE each see.

An image is a row (t, h, w) of `image_grid_thw`, in patches. The vision tower outputs
its merged tokens row-major over the merged grid (t, h/m, w/m), m = spatial_merge_size;
the compressor maps each of the t frames' (h/m, w/m) grid to `out_grid` = (H', W').

transformers lays out an image's rotary positions (`get_rope_index`) from its row of
`image_grid_thw` alone: t x (h/m) x (w/m) positions, temporal index t, row index
`start + i`, column index `start + j`, and the text after the image starts at
`start + max(h, w) / m`. So giving it the *rope grid* (t, H' * m, W' * m) lays out the
compressed tokens exactly as it would for an image whose merged grid is (H', W'): the
position rewrite is a rewrite of that one row, nothing else.

All functions take and return (num_images, 3) integer tensors; the compressor's
`out_grid` (plain Python) is asked once per distinct grid, not once per image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokencompress.base import Grid

__all__ = ["merged_grid_thw", "compressed_grid_thw", "rope_grid_thw", "token_counts"]


def merged_grid_thw(image_grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(t, h/m, w/m) per image: the grid of the tower's merged tokens."""
    grids = torch.as_tensor(image_grid_thw)
    if grids.dim() != 2 or grids.shape[1] != 3:
        raise ValueError(f"image_grid_thw must have shape (num_images, 3), got {tuple(grids.shape)}")
    if bool((grids[:, 1:] % merge_size != 0).any()):
        raise ValueError(
            f"image_grid_thw {grids.tolist()} has a side not divisible by spatial_merge_size={merge_size}; "
            "the processor's grids always are (was it made for another merge size?)"
        )
    return grids // grids.new_tensor([1, merge_size, merge_size])


def compressed_grid_thw(
    image_grid_thw: torch.Tensor, merge_size: int, out_grid: Callable[[Grid], Grid]
) -> torch.Tensor:
    """(t, H', W') per image: the grid of its compressed tokens, (H', W') = out_grid((h/m, w/m))."""
    merged = merged_grid_thw(image_grid_thw, merge_size)
    if merged.shape[0] == 0:
        return merged
    distinct, which = torch.unique(merged, dim=0, return_inverse=True)
    compressed = [[frames, *out_grid((height, width))] for frames, height, width in distinct.tolist()]
    return merged.new_tensor(compressed)[which]


def rope_grid_thw(compressed: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(t, H' * m, W' * m): the `image_grid_thw` row under which `get_rope_index` lays out
    the compressed tokens as those of an image whose merged grid is (H', W')."""
    return compressed * compressed.new_tensor([1, merge_size, merge_size])


def token_counts(grid_thw: torch.Tensor) -> torch.Tensor:
    """Tokens per image, t * H * W, for grids in token units (merged or compressed)."""
    return grid_thw.prod(dim=-1)
