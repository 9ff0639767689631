"""The attention each vision token receives in one ViT encoder layer, for VisionZip.

VisionZip keeps the tokens that receive the most attention in the vision layer its
features come from. Switching the whole tower to eager attention to read those weights
would lose SDPA/flash for every layer; instead the graft recomputes them for that one
layer from the layer's own input: layer norm, q and k projections, one QK^T per head.

Which attention counts (`received_attention`):
- a tower with a CLS token (CLIP, under LLaVA's "default" strategy, which drops CLS from
  the features): the CLS row, i.e. the attention the CLS query pays each patch token,
  averaged over heads, as VisionZip does for CLIP;
- a tower without one (SigLIP): the attention each token receives, averaged over all
  queries and heads.

The scores travel with the call: `scores_for_call(layer, score)` hooks the scoring layer
for one `get_image_features` call, fills a `ScoreSlot` that belongs to that call with
`score(layer, args, kwargs)`, and `current_scores()` reads it from a context variable set
only for that call; nothing is left in module state afterwards. `encoder_layer_scorer`
is LLaVA's `score`; Qwen2-VL's is in `_qwen2_vl_scores`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ScoreFunction", "ScoreSlot", "received_attention", "encoder_layer_scorer", "scores_for_call",
           "current_scores", "feature_layer_index"]

#: What the scoring layer's forward pre-hook runs: (layer, args, kwargs) of that forward -> the scores.
ScoreFunction = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], torch.Tensor]


def received_attention(layer: nn.Module, hidden_states: torch.Tensor, *, has_cls: bool) -> torch.Tensor:
    """(B, N) attention received by each patch token in the CLIP/SigLIP encoder `layer`,
    whose input is `hidden_states` (B, L, C); N = L - 1 with a CLS token (first), else L.

    Softmax in at least float32 (as transformers' eager attention), averaged over heads
    (and over queries without a CLS token)."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_states)
    batch, length, _ = normed.shape
    shape = (batch, length, -1, attention.head_dim)
    keys = attention.k_proj(normed).view(shape).transpose(1, 2)  # (B, heads, L, d)
    # Only the query rows that count: CLS's, or all of them.
    rows = normed[:, :1] if has_cls else normed
    queries = attention.q_proj(rows).view(batch, rows.shape[1], -1, attention.head_dim).transpose(1, 2)
    logits = torch.matmul(queries, keys.transpose(-1, -2)) * attention.scale
    weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    received = weights.mean(dim=(1, 2))  # over heads and query rows: (B, L)
    return (received[:, 1:] if has_cls else received).to(hidden_states.dtype)


def encoder_layer_scorer(*, has_cls: bool) -> ScoreFunction:
    """The `score` of a CLIP/SigLIP encoder layer: `received_attention` of its input."""

    def score(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return received_attention(layer, hidden_states, has_cls=has_cls)

    return score


def feature_layer_index(vision_feature_layer: Any, num_layers: int) -> int:
    """The encoder layer (0-based) whose output is `hidden_states[vision_feature_layer]`.

    Raises:
        ValueError: for several feature layers, or the embeddings (index 0).
    """
    if not isinstance(vision_feature_layer, int) or isinstance(vision_feature_layer, bool):
        raise ValueError(
            f"attention scores need one vision feature layer, got vision_feature_layer={vision_feature_layer!r}"
        )
    count = num_layers + 1  # hidden_states: the embeddings, then each layer's output
    if not -count <= vision_feature_layer < count:
        raise ValueError(f"vision_feature_layer={vision_feature_layer} is outside the tower's {count} hidden states")
    index = vision_feature_layer % count
    if index == 0:
        raise ValueError("vision_feature_layer selects the embeddings, which no attention layer produced")
    return index - 1


@dataclass
class ScoreSlot:
    """The scores of one `get_image_features` call (None until the scoring layer ran)."""

    scores: torch.Tensor | None = None


_CURRENT: ContextVar[ScoreSlot | None] = ContextVar("tokencompress_vision_scores", default=None)


@contextmanager
def scores_for_call(layer: nn.Module, score: ScoreFunction) -> Iterator[ScoreSlot]:
    """Within the block, each run of `layer` puts `score(layer, args, kwargs)` of its
    forward's arguments into the yielded slot, which `current_scores()` returns; the hook
    and the slot are gone afterwards."""
    slot = ScoreSlot()

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with torch.no_grad():  # selection scores are not differentiated (top-k picks)
            slot.scores = score(module, args, kwargs)

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    token = _CURRENT.set(slot)
    try:
        yield slot
    finally:
        _CURRENT.reset(token)
        handle.remove()


def current_scores() -> torch.Tensor | None:
    """The scores of the `get_image_features` call now running, if it computes them."""
    slot = _CURRENT.get()
    return None if slot is None else slot.scores
