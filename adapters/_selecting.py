"""Which grafts take selecting compressors (ToMe, DART, VisionZip), and the refusals.

A selecting compressor keeps `num_tokens` of a view's tokens (or merges into them), in
their original order, but not on a grid (`out_grid` is (1, num_tokens)). A family that
only counts image tokens and gives them 1-D positions (LLaVA, InternVL) takes it as it
is. A family that lays the tokens out on a grid (LLaVA-NeXT's unpadding and newline per
row) cannot, and one with 2-D/3-D rotary positions needs each kept token's original
position: Qwen2-VL's graft hands it over (`_kept_positions`), Qwen3-VL's, whose DeepStack
levels would need the same picks, does not yet. Those that cannot refuse, rather than
silently give the tokens a layout or positions they never had. Attention scores
(VisionZip) are computed by the LLaVA and Qwen2-VL / Qwen2.5-VL grafts.
"""

from __future__ import annotations

from tokencompress.base import TokenCompressor

__all__ = ["refuse_selection"]


def refuse_selection(compressor: TokenCompressor, family: str, *, selection: str | None, scores: bool) -> None:
    """Raise ValueError if `family`'s graft cannot take `compressor`.

    Args:
        selection: why the family cannot take a selecting compressor, or None if it can.
        scores: whether the family's graft computes attention scores for the compressor.
    """
    name = type(compressor).__name__
    if compressor.selects_tokens and selection is not None:
        raise ValueError(
            f"compressor={name} selects tokens without keeping a grid, but {family} {selection}; "
            "use a window compressor (AvgPool, SAP, PixelShuffle, LDP) here, or graft_fastv to prune "
            "image tokens inside the language model"
        )
    if compressor.needs_attention_scores and not scores:
        raise ValueError(
            f"compressor={name} needs the attention each vision token receives, which the {family} graft "
            "does not compute (the LLaVA and Qwen2-VL grafts do); use ToMe or DART, which need no scores"
        )
