"""`ToMe`: bipartite soft matching (Bolya et al., "Token Merging", ICLR 2023) to a budget."""

from __future__ import annotations

from typing import Any

import torch

from .registry import register_compressor
from .selection import SelectingCompressor, decision_dtype, pairwise_cosine

__all__ = ["ToMe", "tome_merge"]


def tome_merge(x: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (B, N, C) tokens down to `num_tokens` by rounds of bipartite soft matching.

    Returns the merged tokens (B, num_tokens, C) in x's dtype and their positions
    (B, num_tokens): each survivor's index in the input, ascending. See `ToMe`.
    """
    batch, count, width = x.shape
    # Each current token is the mean of the `sizes` original tokens it stands for; keep
    # their sum instead (mean = sum / size). Cosine similarity is scale-invariant, so the
    # sums also serve as the matching metric, and a merge is just an addition.
    sums = x.to(decision_dtype(x.dtype))
    sizes = torch.ones(batch, count, dtype=sums.dtype, device=x.device)
    positions = torch.arange(count, device=x.device).expand(batch, count)
    while count > num_tokens:
        # Set A = even slots, set B = odd slots; merging all of A is the most one round can do.
        num_a, num_b = (count + 1) // 2, count // 2
        num_merges = min(count - num_tokens, num_a)
        similarity = pairwise_cosine(sums[:, 0::2], sums[:, 1::2])  # (B, num_a, num_b)
        best_similarity, best_match = similarity.max(dim=-1)  # first maximum: lower B slot
        # Stable: among A tokens equally similar to their match, the earlier merges first.
        order = torch.sort(best_similarity, dim=-1, descending=True, stable=True).indices
        merged_a, kept_a = order[:, :num_merges], order[:, num_merges:]

        # In slot terms, A token i sits at slot 2i and B token j at slot 2j + 1.
        sources = 2 * merged_a
        targets = 2 * best_match.gather(1, merged_a) + 1
        source_sums = sums.gather(1, sources.unsqueeze(-1).expand(-1, -1, width))
        sums = sums.scatter_add(1, targets.unsqueeze(-1).expand(-1, -1, width), source_sums)
        sizes = sizes.scatter_add(1, targets, sizes.gather(1, sources))

        # Survivors, back in slot order (= input order): unmerged A tokens and all of B.
        odd_slots = 2 * torch.arange(num_b, device=x.device) + 1
        kept = torch.cat([2 * kept_a, odd_slots.expand(batch, num_b)], dim=1).sort(dim=1).values
        sums = sums.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))
        sizes = sizes.gather(1, kept)
        positions = positions.gather(1, kept)
        count -= num_merges
    tokens = sums / sizes.unsqueeze(-1)
    return tokens.to(x.dtype), positions


@register_compressor("tome")
class ToMe(SelectingCompressor):
    """ToMe's bipartite soft matching, applied in rounds until `num_tokens` remain.

    Each round, with T tokens left (in input order):

        A = tokens at even slots, B = tokens at odd slots      (|A| = ceil(T/2), |B| = floor(T/2))
        m(a) = argmax_{b in B} cos(a, b)                      (first maximum: the lower B slot)
        r = min(T - num_tokens, |A|) A tokens of highest cos(a, m(a)) merge into m(a):
        y_b = (s_b x_b + sum_{a -> b} s_a x_a) / (s_b + sum_{a -> b} s_a),   s_b += sum s_a

    where s counts the original tokens a token stands for (ToMe's proportional sizes).
    Survivors keep their order; a merged token keeps B's position. The tokens themselves
    are the similarity metric (the paper matches attention keys, which a compressor
    after the tower does not have). Ties among A tokens go to the lower slot. No
    parameters; a budget of N returns x unchanged.

    Args:
        num_tokens: the budget, the number of output tokens.
    """

    @classmethod
    def for_dim(cls, dim: int) -> "ToMe":
        return cls(8)  # small enough for every grid of the contract tests but (1, 1)

    def get_config(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens}

    def select(
        self, x: torch.Tensor, attention_scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return tome_merge(x, self.num_tokens)
