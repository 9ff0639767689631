"""`VisionZip`: dominant and contextual tokens (Yang et al., "VisionZip: Longer is Better but
Not Necessary in Vision Language Models", CVPR 2025)."""

from __future__ import annotations

from typing import Any

import torch

from .registry import register_compressor
from .selection import (
    SelectingCompressor,
    check_budget,
    decision_dtype,
    gather_tokens,
    pairwise_cosine,
    top_indices,
)

__all__ = ["VisionZip", "visionzip_compress"]


def visionzip_compress(
    x: torch.Tensor, attention_scores: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, C) tokens and (B, N) scores -> tokens (B, dominant + contextual, C), positions.

    See `VisionZip`; the tokens are in x's dtype and in input order.
    """
    batch, count, width = x.shape
    dominant_positions = top_indices(attention_scores, dominant)  # ties: the lower index
    if contextual == 0:
        return gather_tokens(x, dominant_positions), dominant_positions

    # The other tokens, in input order.
    index = torch.arange(count, device=x.device).expand(batch, count)
    is_dominant = torch.zeros_like(index, dtype=torch.bool).scatter(1, dominant_positions, True)
    remaining = _unflagged(index, is_dominant, count - dominant)

    # Targets are picked by rank among the remaining tokens, so which ranks are targets
    # and which are members is the same for every sample.
    num_remaining = count - dominant
    step = num_remaining // contextual  # >= 1: the budget fits, so num_remaining >= contextual
    rank = torch.arange(num_remaining, device=x.device)
    target_ranks = rank[:contextual] * step
    is_target_rank = (rank % step == 0) & (rank < contextual * step)
    member_ranks = _unflagged(rank, is_target_rank, num_remaining - contextual)
    target_positions = remaining[:, target_ranks]  # (B, contextual)
    member_positions = remaining[:, member_ranks]  # (B, num_remaining - contextual)

    targets = gather_tokens(x, target_positions)
    members = gather_tokens(x, member_positions)
    # Each member joins its most similar target; argmax takes the first maximum, so ties
    # go to the lower target.
    assignment = pairwise_cosine(members, targets).argmax(dim=-1)  # (B, num_members)
    work = decision_dtype(x.dtype)
    sums = targets.to(work).scatter_add(
        1, assignment.unsqueeze(-1).expand(-1, -1, width), members.to(work)
    )
    counts = torch.ones(batch, contextual, dtype=work, device=x.device).scatter_add(
        1, assignment, torch.ones_like(assignment, dtype=work)
    )
    contextual_tokens = (sums / counts.unsqueeze(-1)).to(x.dtype)

    tokens = torch.cat([gather_tokens(x, dominant_positions), contextual_tokens], dim=1)
    positions = torch.cat([dominant_positions, target_positions], dim=1)
    positions, order = positions.sort(dim=1)  # distinct positions: any sort is exact
    return gather_tokens(tokens, order), positions


def _unflagged(index: torch.Tensor, flagged: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` entries of ascending `index` (..., N) that are not `flagged`, in order."""
    # Push flagged entries past every real index and sort; no data-dependent shapes, so
    # this also runs on the meta device (boolean-mask indexing would not).
    return index.masked_fill(flagged, index.shape[-1]).sort(dim=-1).values[..., :count]


@register_compressor("visionzip")
class VisionZip(SelectingCompressor):
    """Keep the `dominant` most-attended tokens and merge the rest into `contextual` tokens.

        D = the `dominant` tokens of highest attention_scores    (ties: the lower index)
        R = the other N - dominant tokens, in input order;  step = (N - dominant) // contextual
        targets t_j = R[j * step],  j = 0 .. contextual - 1      (evenly spaced by rank in R)
        every other token of R joins argmax_j cos(x_i, x_{t_j})  (ties: the lower j)
        c_j = mean(x_{t_j} and the tokens that joined t_j)       at the position of t_j

    Output: D and the c_j, `dominant + contextual` tokens in input order. No parameters.

    `needs_attention_scores` is True: `attention_scores` (B, N) is the attention each
    token receives, supplied by the graft from the vision layer the features come from:
    CLIP's CLS row (the CLS query's attention to each patch, averaged over heads) where
    the tower has a CLS token; SigLIP has none, so the attention received averaged over
    all queries and heads. (The release also uses the keys of that layer as the similarity
    metric and adds its target to the members' mean; here the metric is the features,
    and c_j is a plain mean so it keeps the scale of a token.) The paper keeps 54 + 10 of
    LLaVA-1.5's 576 tokens for a budget of 64.

    Args:
        dominant: number of most-attended tokens kept as they are, at least 1.
        contextual: number of merged tokens, at least 0.
    """

    needs_attention_scores = True

    def __init__(self, dominant: int, contextual: int) -> None:
        dominant = check_budget(dominant, "dominant")
        contextual = check_budget(contextual, "contextual", minimum=0)
        super().__init__(dominant + contextual)
        self.dominant = dominant
        self.contextual = contextual

    @classmethod
    def for_dim(cls, dim: int) -> "VisionZip":
        return cls(6, 2)  # 8 tokens: small enough for every grid of the contract tests but (1, 1)

    def get_config(self) -> dict[str, Any]:
        return {"dominant": self.dominant, "contextual": self.contextual}

    def select(
        self, x: torch.Tensor, attention_scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert attention_scores is not None  # checked by compress: needs_attention_scores
        return visionzip_compress(x, attention_scores, self.dominant, self.contextual)

    def extra_repr(self) -> str:
        return f"dominant={self.dominant}, contextual={self.contextual}"
