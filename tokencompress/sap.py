"""`SAP`: FlashSloth's spatial attention pooling (paper Sec. 3.2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Grid, TokenCompressor, as_grid
from .registry import register_compressor
from .windows import check_window, merge_windows, partition_windows, window_grid

__all__ = ["SAP"]


@register_compressor("sap")
class SAP(TokenCompressor):
    """Attention pooling over non-overlapping `window x window` tiles, stride `window`.

        a_i = softmax_{i in w}(score(x_i)),   score = Linear -> ReLU -> Dropout -> Linear(., 1)
        y_w = sum_{i in w} a_i * x_i,         (H, W, C) -> (ceil(H / window), ceil(W / window), C)

    Edge windows of a grid that `window` does not divide take the softmax over the tokens
    they hold, as the release does. `score` is an `nn.Sequential` whose indices match the
    release's `mlp` (0: Linear, 1: ReLU, 2: Dropout, 3: Linear), so its checkpoint keys
    map by renaming the prefix `mlp.` -> `score.`.

    Args:
        dim: token width C (SigLIP so400m: 1152).
        window: window side (the paper's s = 3: 27x27 -> 9x9 tokens).
        hidden_dim: width of the score MLP's hidden layer; defaults to `dim`.
        dropout: dropout after the ReLU, active in training mode only.
    """

    def __init__(
        self, dim: int, window: int = 3, hidden_dim: int | None = None, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        hidden_dim = dim if hidden_dim is None else hidden_dim
        if not isinstance(hidden_dim, int) or isinstance(hidden_dim, bool) or hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int or None, got {hidden_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_dim = dim
        self.window = check_window(window)
        self.score = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
        )

    @classmethod
    def for_dim(cls, dim: int) -> "SAP":
        return cls(dim)

    def get_config(self) -> dict[str, Any]:
        return {
            "dim": self.in_dim,
            "window": self.window,
            "hidden_dim": self.score[0].out_features,
            "dropout": self.score[2].p,
        }

    def out_grid(self, grid: Grid) -> Grid:
        return window_grid(as_grid(grid), self.window)

    def out_dim(self, dim: int) -> int:
        return dim

    def forward(  # type: ignore[override]  # narrows the base signature to SAP's options
        self, x: torch.Tensor, grid: Grid | None = None, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, H*W, C) -> (B, H'*W', C); with `return_weights`, also the (B, H*W) weights.

        The weights are each input token's softmax weight within its window, in the
        input's token order (they sum to 1 over every window).
        """
        return super().forward(x, grid, return_weights=return_weights)

    def compress(
        self, x: torch.Tensor, grid: Grid, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # Score the real tokens before windowing, so the MLP never runs on padding.
        scores, valid = partition_windows(self.score(x), grid, self.window)
        scores = scores.squeeze(-1)  # (B, num_windows, window * window)
        # bf16 keeps 8 significant bits (fp16 11): exp() and the normalising sum would
        # each round there, so take the softmax in float32 and round the weights once.
        # (float64 stays float64.)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))  # every window has a real token
        weights = scores.softmax(dim=-1).to(x.dtype)

        windows, _ = partition_windows(x, grid, self.window)  # (B, num_windows, window * window, C)
        tokens = (weights.unsqueeze(-2) @ windows).squeeze(-2)
        if not return_weights:
            return tokens
        token_weights = merge_windows(weights.unsqueeze(-1), grid, self.window).squeeze(-1)
        return tokens, token_weights

    def extra_repr(self) -> str:
        return f"window={self.window}"
