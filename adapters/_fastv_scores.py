"""FastV's ranking: the attention one query token pays each image token in one decoder layer.

FastV (Chen et al., ECCV 2024) ranks the image tokens by the attention they receive in the
layer before pruning. Only one query row is needed (each prompt's last token), so it is
recomputed here from the layer's own modules: its input norm, q/k projections, q/k norms
(where the family has them), rotary embedding (the attention module's own
`apply_rotary_pos_emb`), grouped-query heads, scaling and attention mask, then a softmax
over all keys. The model keeps its attention implementation (SDPA stays on): nothing asks
it for attention weights.

The softmax is taken in float32 and the probabilities are kept in float32 or the model's
dtype if wider, as transformers' eager attention (which FastV's reference code reads)
computes them, but without rounding them to a half-precision dtype, which would tie many
of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._fastv_call import gather_sequence

__all__ = ["check_scorable", "image_token_scores", "innermost"]

RotaryFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def innermost(module: nn.Module) -> nn.Module:
    """The module under every wrapper of `module` (following `base_layer`)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _rotary_function(attention: nn.Module) -> RotaryFunction | None:
    """The `apply_rotary_pos_emb` of the module that defines the attention's class."""
    return getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)


def check_scorable(layer: nn.Module, caller: str) -> None:
    """Raise ValueError unless FastV can recompute `layer`'s attention for one query row.

    FastV needs a pre-norm decoder layer (`input_layernorm`, `self_attn`) whose attention
    has separate `q_proj` / `k_proj`, a `head_dim`, a `scaling` and a rotary function
    of the transformers form `apply_rotary_pos_emb(q, k, cos, sin)`, and no logit softcapping.
    """
    layer = innermost(layer)
    attention = getattr(layer, "self_attn", None)
    missing = [
        name for name in ("input_layernorm", "self_attn") if not isinstance(getattr(layer, name, None), nn.Module)
    ]
    if attention is not None:
        missing += [name for name in ("q_proj", "k_proj") if not isinstance(getattr(attention, name, None), nn.Module)]
        missing += [name for name in ("head_dim", "scaling") if getattr(attention, name, None) is None]
        if _rotary_function(attention) is None:
            missing.append("apply_rotary_pos_emb (in its module)")
    if missing:
        raise ValueError(
            f"{caller} cannot recompute the attention of {type(layer).__name__}: it lacks {', '.join(missing)}. "
            "FastV supports pre-norm decoder layers with separate q/k projections and rotary positions "
            "(Llama, Qwen2, Qwen3, Phi and the Qwen-VL text models)"
        )
    config = getattr(attention, "config", None)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"{caller} does not support attention logit softcapping ({type(attention).__name__})")


def _rotate(rotary: RotaryFunction, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`states` (B, heads, S, head_dim) rotated as the layer rotates its queries and keys.

    The rotary function rotates a query and a key of the same positions; called with
    `states` for both, its first output is what the layer computes. Partial rotary
    embeddings (Phi) rotate the first `cos.shape[-1]` channels and pass the rest.
    """
    width = cos.shape[-1]
    if width == states.shape[-1]:
        return rotary(states, states, cos, sin)[0]
    rotated = rotary(states[..., :width], states[..., :width], cos, sin)[0]
    return torch.cat([rotated, states[..., width:]], dim=-1)


def _project(projection: nn.Module, norm: nn.Module | None, states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`projection(states)` as (B, heads, S, head_dim), normed where the family norms it.

    A q/k norm over one head's channels (Qwen3) acts on the last dimension, whichever
    way the heads are laid out; one over all heads' channels is applied before the split.
    """
    flat = projection(states)
    if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape[-1] == flat.shape[-1]:
        flat, norm = norm(flat), None
    heads = flat.view(*states.shape[:2], -1, head_dim)
    if norm is not None:
        heads = norm(heads)
    return heads.transpose(1, 2)


def _qk_norms(attention: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The attention's q and k norms, if its family has them (Qwen3: q_norm; Phi: q_layernorm)."""
    if isinstance(getattr(attention, "q_norm", None), nn.Module):
        return attention.q_norm, attention.k_norm
    if getattr(attention, "qk_layernorm", False):
        return attention.q_layernorm, attention.k_layernorm
    return None, None


def _mask_row(mask: Any, query_index: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """`logits` (B, H, 1, L) masked as the layer masks the query rows `query_index` (B,)."""
    length = logits.shape[-1]
    if mask is None:
        # SDPA's causal shortcut (no padding): a query sees itself and every key before it.
        visible = torch.arange(length, device=logits.device) <= query_index[:, None]
        return logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != length:
        raise ValueError(
            f"FastV expected the decoder layer's attention mask as None or a (batch, heads, query, {length}) "
            f"tensor, got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}"
        )
    batch = query_index.shape[0]
    mask = mask.expand(batch, -1, -1, -1)
    row = mask.gather(2, query_index[:, None, None, None].expand(batch, mask.shape[1], 1, length))
    if row.dtype == torch.bool:  # SDPA's boolean mask: True where a key is seen
        return logits.masked_fill(~row, float("-inf"))
    return logits + row  # eager's additive mask


def image_token_scores(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: Any,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    image_mask: torch.Tensor,
) -> torch.Tensor:
    """The attention each row's query token pays its image tokens in `layer`, mean over heads.

    Args:
        layer: the decoder layer (wrappers around it are looked through).
        hidden_states: (B, L, D) the layer's input.
        attention_mask: the layer's mask, as the decoder loop passes it: None (causal,
            no padding), a boolean (SDPA) or additive float (eager) (B or 1, 1, L, L) tensor.
        position_embeddings: the (cos, sin) pair the layer gets, each (B or 1, L, rotary dim).
        query_index: (B,) the query token of each row (its last prompt token).
        image_mask: (B, L) True at image tokens; every row holds the same number c of them.

    Returns:
        (B, c) float32 (float64 for a float64 model): row b's scores, in sequence order.
    """
    layer = innermost(layer)
    attention = layer.self_attn
    batch, length, _ = hidden_states.shape
    head_dim = attention.head_dim
    rotary = _rotary_function(attention)
    cos, sin = position_embeddings
    if cos.dim() != 3:
        raise ValueError(
            f"FastV expected rotary embeddings of shape (batch, length, dim), got {tuple(cos.shape)} "
            f"from {type(attention).__name__}"
        )

    def at_query(values: torch.Tensor) -> torch.Tensor:  # (B or 1, L, dim) -> (B, 1, dim), at each row's query
        return gather_sequence(values, query_index[:, None], dim=1, batch_dim=0)

    # Only the query rows are projected; the keys are all of them (one extra k projection).
    normed = layer.input_layernorm(hidden_states)
    q_norm, k_norm = _qk_norms(attention)
    query = _project(attention.q_proj, q_norm, at_query(normed), head_dim)  # (B, H, 1, hd)
    key = _project(attention.k_proj, k_norm, normed, head_dim)  # (B, Hkv, L, hd)
    query = _rotate(rotary, query, at_query(cos), at_query(sin))
    key = _rotate(rotary, key, cos, sin)

    # Grouped-query attention: query head h reads key head h // (H / Hkv), as repeat_kv lays them out.
    heads, kv_heads = query.shape[1], key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, 1, head_dim)
    logits = (grouped @ key[:, :, None].transpose(-1, -2)) * attention.scaling
    logits = _mask_row(attention_mask, query_index, logits.reshape(batch, heads, 1, length))
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
    probabilities = probabilities.to(torch.promote_types(hidden_states.dtype, torch.float32))
    scores = probabilities[:, :, 0].mean(dim=1)  # (B, L)
    return scores[image_mask].view(batch, -1)
