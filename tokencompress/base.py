"""The compressor contract: every visual-token compressor is a `TokenCompressor`.

Visual tokens are (B, N, C), row-major over a grid (H, W) with N = H * W. A compressor
answers `out_grid`, `out_dim` and `num_out_tokens` without running, so adapters can size
placeholder tokens before any image is seen; `forward` checks that its output agrees.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from typing import Any

import torch
from torch import nn

from ._autocast import autocast_active

Grid = tuple[int, int]

__all__ = ["Grid", "TokenCompressor", "as_grid", "resolve_grid", "check_tokens"]


def as_grid(grid: Any, name: str = "grid") -> Grid:
    """Validate and normalise a grid to a tuple of two positive ints."""
    if isinstance(grid, torch.Tensor):
        grid = grid.tolist()
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(side, int) and not isinstance(side, bool) for side in grid)
        or min(grid) < 1
    ):
        raise ValueError(f"{name} must be a pair of positive ints (H, W), got {grid!r}")
    return int(grid[0]), int(grid[1])


def resolve_grid(num_tokens: int, grid: Grid | None) -> Grid:
    """The grid of `num_tokens` tokens: the given one (checked) or the square one."""
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"x has N={num_tokens} tokens, which is not a perfect square; "
                "pass grid=(H, W) with H * W == N"
            )
        return side, side
    grid = as_grid(grid)
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(
            f"grid={grid} holds {grid[0] * grid[1]} tokens but x has N={num_tokens} tokens; "
            "expected H * W == N"
        )
    return grid


def check_tokens(x: Any, name: str = "x", dim: int | None = None) -> None:
    """Check that `x` is a non-empty floating (B, N, C) tensor, of width `dim` if given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, C), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have rank 3 (B, N, C), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (B=0); expected at least one sample")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no tokens (N=0); expected at least one token")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} has width C={x.shape[-1]}, expected C={dim}")


class TokenCompressor(nn.Module, metaclass=ABCMeta):
    """Base class of visual-token compressors.

    Subclasses implement `out_grid`, `out_dim` and `compress(x, grid, **kwargs)`, and
    set `in_dim` when they only accept one input width. `forward(x, grid=None)` validates
    the input, runs `compress` and checks the output against `out_grid`/`out_dim`.
    `compress` may return a tuple whose first element is the tokens (extra outputs
    that the caller asked for, such as SAP's weights). Keyword arguments of `forward`
    pass through to `compress`.

    Two class attributes tell adapters how to drive a compressor without knowing it:
    `selects_tokens` and `needs_attention_scores` (see `tokencompress.selection`).
    """

    #: the only input width accepted, or None when any width works
    in_dim: int | None = None
    #: True for compressors that keep (or merge into) a fixed budget of input tokens
    #: instead of mapping a grid to a grid: their output is a row `(1, num_tokens)` in
    #: input order, and `forward(..., return_positions=True)` also returns each output
    #: token's index in the input grid, for families with 2-D/3-D rotary positions.
    selects_tokens: bool = False
    #: True for compressors whose forward needs `attention_scores=` (B, N): the attention
    #: each token receives in the vision layer the features come from. The graft
    #: computes them for that one layer; compressors with False refuse them.
    needs_attention_scores: bool = False

    # -- answered without running ------------------------------------------------------
    @abstractmethod
    def out_grid(self, grid: Grid) -> Grid:
        """The output grid (H', W') for an input grid (H, W); ValueError if unsupported."""

    @abstractmethod
    def out_dim(self, dim: int) -> int:
        """The output width C' for an input width C."""

    def num_out_tokens(self, grid: Grid) -> int:
        """The number of output tokens H' * W' for an input grid (H, W)."""
        height, width = self.out_grid(as_grid(grid))
        return height * width

    def check_dim(self, dim: int) -> None:
        """Raise ValueError if this compressor does not accept input width `dim`."""
        if self.in_dim is not None and dim != self.in_dim:
            raise ValueError(f"x has width C={dim}, expected C={self.in_dim}")

    @classmethod
    @abstractmethod
    def for_dim(cls, dim: int) -> "TokenCompressor":
        """This compressor with its default settings for input width `dim`.

        The registry's contract tests build every registered compressor this way.
        """

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """The `__init__` keyword arguments, as JSON values, that rebuild this compressor."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TokenCompressor":
        """A fresh compressor (new weights) from the output of `get_config`."""
        return cls(**config)

    # -- running -----------------------------------------------------------------------
    @abstractmethod
    def compress(self, x: torch.Tensor, grid: Grid, **kwargs: Any) -> Any:
        """The maths: `x` is validated (B, N, C) and `grid` is (H, W) with H * W == N."""

    def forward(self, x: torch.Tensor, grid: Grid | None = None, **kwargs: Any) -> Any:
        check_tokens(x)
        grid = resolve_grid(x.shape[1], grid)
        self.check_dim(x.shape[-1])
        expected_grid = self.out_grid(grid)  # raises for grids the compressor rejects
        self._check_dtype(x)
        out = self.compress(x, grid, **kwargs)
        tokens = out[0] if isinstance(out, tuple) else out
        expected = (x.shape[0], expected_grid[0] * expected_grid[1], self.out_dim(x.shape[-1]))
        if tuple(tokens.shape) != expected:
            raise RuntimeError(
                f"{type(self).__name__} returned shape {tuple(tokens.shape)} but its contract "
                f"says {expected} for grid={grid}; this is a bug in the compressor"
            )
        return out

    def _check_dtype(self, x: torch.Tensor) -> None:
        # Under autocast the parameters legitimately differ from the input's dtype.
        if autocast_active(x.device.type):
            return
        param = next(self.parameters(), None)
        if param is not None and param.is_floating_point() and param.dtype != x.dtype:
            raise ValueError(
                f"x has dtype {x.dtype} but {type(self).__name__}'s parameters are "
                f"{param.dtype}; expected x.dtype == {param.dtype} (cast one or use autocast)"
            )
