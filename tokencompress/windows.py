"""Non-overlapping window maths shared by the window compressors (`SAP`, `AvgPool`).

A (B, H*W, C) grid is cut into `window x window` tiles with stride `window`, row-major
over tiles and row-major inside a tile. When `window` does not divide the grid, the last
row/column of tiles hold fewer real tokens (as in the FlashSloth release): the grid is
zero-padded to a multiple of `window` and a validity mask marks the padded slots, so a
consumer can leave them out of softmaxes and means. Pure functions, no Python loop over
windows, samples or tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Grid

__all__ = ["check_window", "window_grid", "window_valid_mask", "partition_windows", "merge_windows"]


def check_window(window: int, name: str = "window") -> int:
    """Validate a window side: a positive int."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"{name} must be a positive int, got {window!r}")
    return window


def window_grid(grid: Grid, window: int) -> Grid:
    """The grid of windows: (ceil(H / window), ceil(W / window))."""
    height, width = grid
    return math.ceil(height / window), math.ceil(width / window)


def _padded_grid(grid: Grid, window: int) -> Grid:
    rows, cols = window_grid(grid, window)
    return rows * window, cols * window


def window_valid_mask(
    grid: Grid, window: int, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """Bool (num_windows, window * window), True at real tokens; None when nothing is padded.

    Returning None for grids that `window` divides lets callers skip masking entirely.
    """
    padded_height, padded_width = _padded_grid(grid, window)
    if (padded_height, padded_width) == tuple(grid):
        return None
    rows_valid = torch.arange(padded_height, device=device) < grid[0]
    cols_valid = torch.arange(padded_width, device=device) < grid[1]
    valid = (rows_valid[:, None] & cols_valid[None, :])[None, :, :, None]  # (1, H', W', 1)
    return partition_windows(valid.flatten(1, 2), (padded_height, padded_width), window)[0][0, :, :, 0]


def partition_windows(
    x: torch.Tensor, grid: Grid, window: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, H*W, C) -> windows (B, num_windows, window * window, C) and their validity mask.

    Padded slots are zeros; the mask is `window_valid_mask(grid, window)` (None when the
    grid needs no padding).
    """
    batch, _, channels = x.shape
    height, width = grid
    padded_height, padded_width = _padded_grid(grid, window)
    rows, cols = padded_height // window, padded_width // window
    x = x.reshape(batch, height, width, channels)
    valid = None
    if (padded_height, padded_width) != (height, width):
        x = F.pad(x, (0, 0, 0, padded_width - width, 0, padded_height - height))
        valid = window_valid_mask(grid, window, device=x.device)
    windows = (
        x.reshape(batch, rows, window, cols, window, channels)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch, rows * cols, window * window, channels)
    )
    return windows, valid


def merge_windows(windows: torch.Tensor, grid: Grid, window: int) -> torch.Tensor:
    """Inverse of `partition_windows`: (B, num_windows, window * window, C) -> (B, H*W, C).

    Padded slots are dropped.
    """
    batch, _, _, channels = windows.shape
    height, width = grid
    padded_height, padded_width = _padded_grid(grid, window)
    rows, cols = padded_height // window, padded_width // window
    x = (
        windows.reshape(batch, rows, cols, window, window, channels)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch, padded_height, padded_width, channels)
    )
    return x[:, :height, :width].reshape(batch, height * width, channels)
