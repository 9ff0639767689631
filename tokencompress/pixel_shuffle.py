"""`PixelShuffle`: InternVL's space-to-depth of visual tokens, and its exact inverse.

InternVL-Chat's `pixel_shuffle(x, scale_factor=0.5)` (ps_version "v2", as called from
`extract_feature` on row-major (n, h, w, c) tokens) maps, for ratio r,

    out[i, j, (a * r + b) * C + c] = x[i * r + a, j * r + b, c]

with a the row offset and b the column offset inside each r x r block. Note the names:
torch's `nn.PixelUnshuffle` is the same space-to-depth but orders channels (c, a, b),
so it does not give InternVL's layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Grid, TokenCompressor, as_grid
from .registry import register_compressor
from .windows import check_window

__all__ = ["PixelShuffle", "pixel_shuffle_tokens", "pixel_unshuffle_tokens"]


def pixel_shuffle_tokens(x: torch.Tensor, grid: Grid, ratio: int) -> torch.Tensor:
    """Space-to-depth in InternVL's order: (B, H*W, C) -> (B, (H/r)*(W/r), r*r*C).

    `ratio` must divide both sides of `grid`.
    """
    batch, _, channels = x.shape
    height, width = grid
    return (
        x.reshape(batch, height // ratio, ratio, width // ratio, ratio, channels)
        .permute(0, 1, 3, 2, 4, 5)  # (B, H/r, W/r, row offset, column offset, C)
        .reshape(batch, (height // ratio) * (width // ratio), ratio * ratio * channels)
    )


def pixel_unshuffle_tokens(x: torch.Tensor, grid: Grid, ratio: int) -> torch.Tensor:
    """Inverse of `pixel_shuffle_tokens`: (B, H'*W', r*r*C) on grid (H', W') -> (B, (H'r)*(W'r), C)."""
    batch, _, shuffled_channels = x.shape
    height, width = grid
    channels = shuffled_channels // (ratio * ratio)
    return (
        x.reshape(batch, height, width, ratio, ratio, channels)
        .permute(0, 1, 3, 2, 4, 5)  # (B, H', row offset, W', column offset, C)
        .reshape(batch, height * ratio * width * ratio, channels)
    )


@register_compressor("pixel_shuffle")
class PixelShuffle(TokenCompressor):
    """Fold each r x r block of tokens into one token of width r*r*C (no parameters).

        y[i, j] = concat_{a, b < r} x[i*r + a, j*r + b]   (row offset a outermost)
        (H, W, C) -> (H / r, W / r, r*r*C)

    Args:
        ratio: block side r (InternVL's downsample_ratio 0.5 is r = 2).
        pad: a grid that `ratio` does not divide is a ValueError unless `pad=True`; then
            it is zero-padded at the bottom/right to a multiple of `ratio`, so edge blocks
            carry zero channels where they had no token: (ceil(H/r), ceil(W/r), r*r*C).
    """

    def __init__(self, ratio: int = 2, pad: bool = False) -> None:
        super().__init__()
        self.ratio = check_window(ratio, name="ratio")
        self.pad = bool(pad)

    @classmethod
    def for_dim(cls, dim: int) -> "PixelShuffle":
        return cls(pad=True)  # every grid is accepted

    def get_config(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "pad": self.pad}

    def out_grid(self, grid: Grid) -> Grid:
        height, width = as_grid(grid)
        ratio = self.ratio
        if not self.pad and (height % ratio or width % ratio):
            raise ValueError(
                f"grid={(height, width)} is not divisible by ratio={ratio}; expected H and W "
                f"to be multiples of {ratio}, or PixelShuffle({ratio}, pad=True) to zero-pad"
            )
        return -(-height // ratio), -(-width // ratio)

    def out_dim(self, dim: int) -> int:
        return dim * self.ratio * self.ratio

    def compress(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        padded_grid = self._padded_grid(grid)
        if padded_grid != tuple(grid):
            x = _pad_grid(x, grid, padded_grid)
        return pixel_shuffle_tokens(x, padded_grid, self.ratio)

    def inverse(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Undo `forward`: `grid` is the grid given to `forward`; padding is cropped off."""
        height, width = as_grid(grid)
        padded_height, padded_width = self._padded_grid((height, width))
        num_tokens, block = self.num_out_tokens((height, width)), self.ratio * self.ratio
        if x.dim() != 3 or x.shape[1] != num_tokens or x.shape[-1] % block:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; expected (B, {num_tokens}, C') with C' a "
                f"multiple of ratio**2={block} for grid={(height, width)}"
            )
        tokens = pixel_unshuffle_tokens(x, self.out_grid((height, width)), self.ratio)
        if (padded_height, padded_width) == (height, width):
            return tokens
        tokens = tokens.reshape(x.shape[0], padded_height, padded_width, -1)[:, :height, :width]
        return tokens.reshape(x.shape[0], height * width, -1)

    def _padded_grid(self, grid: Grid) -> Grid:
        height, width = self.out_grid(grid)
        return height * self.ratio, width * self.ratio

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, pad={self.pad}"


def _pad_grid(x: torch.Tensor, grid: Grid, padded_grid: Grid) -> torch.Tensor:
    """Zero-pad (B, H*W, C) tokens at the bottom/right to `padded_grid`."""
    batch, _, channels = x.shape
    (height, width), (padded_height, padded_width) = grid, padded_grid
    padding = (0, 0, 0, padded_width - width, 0, padded_height - height)  # (C, W, H) sides
    x = F.pad(x.reshape(batch, height, width, channels), padding)
    return x.reshape(batch, padded_height * padded_width, channels)
