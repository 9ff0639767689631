"""`AvgPool`: the mean of each non-overlapping window (the paper's "Avg.Pool" ablation)."""

from __future__ import annotations

from typing import Any

import torch

from .base import Grid, TokenCompressor, as_grid
from .registry import register_compressor
from .windows import check_window, partition_windows, window_grid

__all__ = ["AvgPool"]


@register_compressor("avgpool")
class AvgPool(TokenCompressor):
    """Mean of each `window x window` tile, stride `window`; parameter-free.

        y_w = (1 / |w|) * sum_{i in w} x_i,   w = a window's real tokens
        (H, W, C) -> (ceil(H / window), ceil(W / window), C)

    Edge windows of a grid that `window` does not divide average only the tokens they
    hold. (The release's `AveragePooling` floors instead and drops them; both agree
    whenever `window` divides the grid, as at the paper's 27x27 with window 3.)
    """

    def __init__(self, window: int = 3) -> None:
        super().__init__()
        self.window = check_window(window)

    @classmethod
    def for_dim(cls, dim: int) -> "AvgPool":
        return cls()

    def get_config(self) -> dict[str, Any]:
        return {"window": self.window}

    def out_grid(self, grid: Grid) -> Grid:
        return window_grid(as_grid(grid), self.window)

    def out_dim(self, dim: int) -> int:
        return dim

    def compress(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        windows, valid = partition_windows(x, grid, self.window)
        if valid is None:
            return windows.mean(dim=2)
        # Padded slots are zeros, so the sum is over real tokens; divide by their count.
        counts = valid.sum(dim=-1, keepdim=True).to(x.dtype)  # (num_windows, 1)
        return windows.sum(dim=2) / counts

    def extra_repr(self) -> str:
        return f"window={self.window}"
