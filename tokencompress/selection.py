"""Training-free *selecting* compressors: keep or merge tokens down to a fixed budget.

`SelectingCompressor` is the base class of `ToMe`, `DART` and `VisionZip`. Unlike the
grid-to-grid compressors, its output is a budget of `num_tokens` tokens that no longer
form a grid, so `out_grid` answers the row `(1, num_tokens)`: adapters size placeholders
with `num_out_tokens`, and families that need a 2-D layout of the compressed tokens
(a 2-D rotary grid built from `out_grid`) refuse selecting compressors.

Conventions shared by every selecting compressor:

- The output keeps the input order: output token j comes from an input token at
  `positions[:, j]`, an index into the row-major input grid, strictly ascending per sample.
  A selected token keeps its own position; a merged token takes the position of the token
  that the others were merged into.
- Ties are broken by the lower index: every ranking is a stable sort and every
  "most similar" is the first maximum, so equal scores favour the earlier token.
- Decisions (similarities, norms) are taken in float32 or wider, with autocast off, so a
  bf16 model picks the tokens an fp32 one would, up to the rounding of its inputs.

This module also holds the maths they share, as plain functions on (B, N, C) tensors.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F

from ._autocast import autocast_active
from .base import Grid, TokenCompressor, as_grid

__all__ = [
    "SelectingCompressor",
    "check_budget",
    "check_attention_scores",
    "decision_dtype",
    "pairwise_cosine",
    "top_indices",
    "gather_tokens",
]


def check_budget(value: Any, name: str, minimum: int = 1) -> int:
    """Return `value` if it is an int (not a bool) of at least `minimum`; else ValueError."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def check_attention_scores(scores: Any, x: torch.Tensor) -> None:
    """Check that `scores` is a floating (B, N) tensor matching tokens `x` (B, N, C)."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(
            f"attention_scores must be a torch.Tensor of shape (B, N), got {type(scores).__name__}"
        )
    expected = tuple(x.shape[:2])
    if tuple(scores.shape) != expected:
        raise ValueError(
            f"attention_scores must have shape (B, N) = {expected} to match x, "
            f"got shape {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise ValueError(f"attention_scores must be a floating-point tensor, got dtype {scores.dtype}")
    if scores.device != x.device:
        raise ValueError(
            f"attention_scores is on {scores.device} but x is on {x.device}; expected one device"
        )


def decision_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which to compare tokens: float32, or float64 for float64 inputs."""
    # bf16 keeps 8 significant bits: cosines of nearby tokens would tie or swap at random.
    return torch.promote_types(dtype, torch.float32)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    # Autocast would run the similarity matmul in half precision and undo decision_dtype.
    if autocast_active(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def pairwise_cosine(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, M, C), (B, K, C) -> (B, M, K) cosines, in `decision_dtype` with autocast off.

    A zero token has cosine 0 with everything (F.normalize divides by max(norm, eps)).
    """
    dtype = decision_dtype(queries.dtype)
    with _autocast_off(queries.device.type):
        queries = F.normalize(queries.to(dtype), dim=-1)
        keys = F.normalize(keys.to(dtype), dim=-1)
        return queries @ keys.transpose(-2, -1)


def top_indices(scores: torch.Tensor, count: int, largest: bool = True) -> torch.Tensor:
    """Indices (B, count) of the `count` largest (or smallest) scores per row, ascending.

    Ties go to the lower index: the ranking is a stable sort, so among equal scores the
    earlier token ranks first.
    """
    order = torch.sort(scores, dim=-1, descending=largest, stable=True).indices
    return order[:, :count].sort(dim=-1).values


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Tokens `x[b, indices[b, j]]`: (B, N, C), (B, K) int64 -> (B, K, C)."""
    return x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class SelectingCompressor(TokenCompressor):
    """A compressor that keeps (or merges into) a fixed budget of `num_tokens` tokens.

    `out_grid(grid)` is `(1, num_tokens)` for any grid of at least `num_tokens` tokens
    (ValueError otherwise), `out_dim(dim) == dim`, and `selects_tokens` is True.
    Subclasses implement `select(x, attention_scores)`, returning the tokens and their
    positions (see the module docstring for the conventions), and set
    `needs_attention_scores` when they rank tokens by the attention they receive.

    Args:
        num_tokens: the budget, the number of output tokens.
    """

    selects_tokens = True

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = check_budget(num_tokens, "num_tokens")

    def out_grid(self, grid: Grid) -> Grid:
        """`(1, num_tokens)`: the kept tokens form a row, not a grid."""
        height, width = as_grid(grid)
        if self.num_tokens > height * width:
            raise ValueError(
                f"num_tokens={self.num_tokens} exceeds the {height * width} tokens of "
                f"grid={(height, width)} (H*W={height * width}); expected num_tokens <= H*W"
            )
        return 1, self.num_tokens

    def out_dim(self, dim: int) -> int:
        return dim

    def forward(  # type: ignore[override]  # narrows the base signature to these options
        self,
        x: torch.Tensor,
        grid: Grid | None = None,
        *,
        return_positions: bool = False,
        attention_scores: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, H*W, C) -> (B, num_tokens, C); with `return_positions`, also the positions.

        Args:
            x: visual tokens, row-major over `grid`.
            grid: (H, W) with H * W == N; None for a square grid.
            return_positions: also return the int64 (B, num_tokens) indices into the
                input grid of the output tokens, strictly ascending per sample.
            attention_scores: (B, N), the attention each token receives. Required when
                `needs_attention_scores` (the graft provides it); refused otherwise, so a
                caller never believes scores were used when they were not.
        """
        return super().forward(
            x, grid, return_positions=return_positions, attention_scores=attention_scores
        )

    def compress(
        self,
        x: torch.Tensor,
        grid: Grid,
        return_positions: bool = False,
        attention_scores: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        name = type(self).__name__
        if self.needs_attention_scores:
            if attention_scores is None:
                raise ValueError(
                    f"{name} needs attention_scores: a (B, N) tensor of the attention each "
                    "token receives, which the graft provides (needs_attention_scores=True); "
                    "got attention_scores=None"
                )
            check_attention_scores(attention_scores, x)
        elif attention_scores is not None:
            raise ValueError(
                f"{name} does not use attention_scores (needs_attention_scores=False); "
                f"got a {type(attention_scores).__name__}, expected None"
            )
        tokens, positions = self.select(x, attention_scores)
        return (tokens, positions) if return_positions else tokens

    @abstractmethod
    def select(
        self, x: torch.Tensor, attention_scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The maths: validated tokens (B, N, C) with N >= num_tokens (and scores (B, N)
        when needed) -> tokens (B, num_tokens, C) in x's dtype, positions (B, num_tokens)."""

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}"
