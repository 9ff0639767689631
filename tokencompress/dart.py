"""`DART`: duplication-aware token selection (Wen et al. 2025, "Stop Looking for Important
Tokens in Multimodal Language Models: Duplication Matters More")."""

from __future__ import annotations

from typing import Any

import torch

from .registry import register_compressor
from .selection import (
    SelectingCompressor,
    decision_dtype,
    gather_tokens,
    pairwise_cosine,
    top_indices,
)

__all__ = ["DART", "dart_select"]

#: The release's number of image pivots (`pivot_image_token=4` in its scripts).
DEFAULT_NUM_PIVOTS = 4


def dart_select(x: torch.Tensor, num_tokens: int, num_pivots: int) -> torch.Tensor:
    """Positions (B, num_tokens), ascending, of the tokens DART keeps from (B, N, C). See `DART`."""
    norms = x.to(decision_dtype(x.dtype)).norm(dim=-1)  # (B, N)
    pivots = top_indices(norms, num_pivots)  # ties: the lower index
    # How duplicated each token is: its highest cosine similarity to any pivot.
    duplication = pairwise_cosine(x, gather_tokens(x, pivots)).amax(dim=-1)  # (B, N)
    # Pivots rank first (-inf), then the least duplicated; the stable sort breaks ties by index.
    is_pivot = torch.zeros_like(norms, dtype=torch.bool).scatter(1, pivots, True)
    duplication = duplication.masked_fill(is_pivot, float("-inf"))
    return top_indices(duplication, num_tokens, largest=False)


@register_compressor("dart")
class DART(SelectingCompressor):
    """Keep `num_pivots` pivot tokens and the tokens least duplicated by them.

        pivots  = the num_pivots tokens of largest ||x_i||_2
        d_i     = max_{p in pivots} cos(x_i, x_p)                 (for every other token)
        keep    = pivots + the (num_tokens - num_pivots) tokens of lowest d_i, in input order

    Ties (equal norms, equal d_i) go to the lower index. A pure selection: the output
    tokens are `x` at the returned positions. No parameters.

    The release picks pivots by the L1 norm of a decoder layer's keys and takes an equal
    share of least-similar tokens per pivot; a compressor after the tower has neither
    keys nor text, so this ranks the features themselves, globally against all pivots
    (which never keeps a token twice and always meets the budget exactly).

    Args:
        num_tokens: the budget, the number of output tokens.
        num_pivots: 1..num_tokens; default `min(4, num_tokens)`, the release's 4 image
            pivots: a few anchors, so most of the budget goes to diverse tokens.
    """

    def __init__(self, num_tokens: int, num_pivots: int | None = None) -> None:
        super().__init__(num_tokens)
        if num_pivots is None:
            num_pivots = min(DEFAULT_NUM_PIVOTS, self.num_tokens)
        if (
            not isinstance(num_pivots, int)
            or isinstance(num_pivots, bool)
            or not 1 <= num_pivots <= self.num_tokens
        ):
            raise ValueError(
                f"num_pivots must be an int in 1..num_tokens={self.num_tokens}, got {num_pivots!r}"
            )
        self.num_pivots = num_pivots

    @classmethod
    def for_dim(cls, dim: int) -> "DART":
        return cls(8)  # small enough for every grid of the contract tests but (1, 1)

    def get_config(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens, "num_pivots": self.num_pivots}

    def select(
        self, x: torch.Tensor, attention_scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = dart_select(x, self.num_tokens, self.num_pivots)
        return gather_tokens(x, positions), positions

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, num_pivots={self.num_pivots}"
