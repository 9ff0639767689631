"""The attention each merged token of Qwen2-VL / Qwen2.5-VL receives, for VisionZip.

The scoring layer is the last vision block, whose output the patch merger takes. As for
LLaVA (`_vision_attention`), its attention weights are recomputed from the block's own
input rather than by switching the tower to eager attention: `norm1`, the `attn.qkv`
projection, the vision rotary embedding as the block applies it (`position_embeddings`
(cos, sin), or an older release's `rotary_pos_emb` angles, through the modeling module's
own `apply_rotary_pos_emb_vision`), and softmax(q k^T * scale) in at least float32
within each segment of the block's `cu_seqlens`: a frame in a full-attention block, a
window in a Qwen2.5-VL window-attention block, i.e. exactly what the block attends within.
A patch's score is the attention it receives, averaged over heads and over its segment's
queries (so each segment's scores sum to one).

A merged token's score is the sum over its `spatial_merge_size**2` patches, which are
consecutive in the tower's order. Qwen2.5-VL's tower runs on merged tokens in window
order and puts them back in row-major order after the merger (`argsort(window_index)`);
the scores are put back the same way, so they are in the merged tokens' order.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._vision_attention import ScoreFunction, ScoreSlot, scores_for_call

__all__ = ["scoring_block", "patch_received_attention", "merged_scores_for_call"]

#: Query rows x keys x heads of one softmax chunk: bounds the memory of a large frame.
_CHUNK_ELEMENTS = 1 << 24


def scoring_block(visual: nn.Module) -> nn.Module:
    """The last vision block of the tower `visual`.

    Raises:
        ValueError: for a tower without Qwen2-VL's blocks (`norm1`, `attn.qkv`).
    """
    blocks = getattr(visual, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"a compressor that needs attention scores needs the vision blocks of {type(visual).__name__}")
    block = blocks[-1]
    attention = getattr(block, "attn", None)
    if not hasattr(block, "norm1") or not isinstance(getattr(attention, "qkv", None), nn.Linear):
        raise ValueError(
            f"a compressor that needs attention scores needs Qwen2-VL's vision block (norm1, attn.qkv), "
            f"got {type(block).__name__}"
        )
    return block


def _rotation(attention: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The `apply_rotary_pos_emb_vision` that the attention module's own module applies."""
    function = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb_vision", None)
    if not callable(function):
        raise TypeError(f"cannot find the vision rotary embedding that {type(attention).__name__} applies")
    return function


def patch_received_attention(
    block: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """(L,) attention each patch receives in `block`, whose input is `hidden_states` (L, C):
    averaged over heads and over the queries of its `cu_seqlens` segment."""
    attention = block.attn
    normed = block.norm1(hidden_states)
    length = normed.shape[0]
    queries, keys, _ = attention.qkv(normed).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    queries, keys = _rotation(attention)(queries, keys, cos, sin)
    queries, keys = queries.transpose(0, 1), keys.transpose(0, 1)  # (heads, L, d)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    received = []
    for segment_queries, segment_keys in zip(queries.split(lengths, dim=1), keys.split(lengths, dim=1)):
        size = segment_keys.shape[1]
        total = None
        rows = max(1, _CHUNK_ELEMENTS // (attention.num_heads * size))
        for chunk in segment_queries.split(rows, dim=1):
            logits = torch.matmul(chunk, segment_keys.transpose(-1, -2)) * attention.scaling
            weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
            part = weights.sum(dim=(0, 1))
            total = part if total is None else total + part
        received.append(total / (attention.num_heads * size))  # type: ignore[operator]
    return torch.cat(received)


def _block_arguments(block: nn.Module) -> Callable[[tuple[Any, ...], dict[str, Any]], dict[str, Any]]:
    """(args, kwargs) of a call of `block` -> its arguments by name (extra kwargs included)."""
    signature = inspect.signature(block.forward)

    def arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = signature.bind(*args, **kwargs).arguments
        named = {name: value for name, value in bound.items() if name != "kwargs"}
        named.update(bound.get("kwargs", {}))
        return named

    return arguments


def _merged_scorer(block: nn.Module, merge_unit: int, order: torch.Tensor | None) -> ScoreFunction:
    """The `score` of the last block: each merged token's summed patch scores, in `order`."""
    arguments = _block_arguments(block)

    def score(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        named = arguments(args, kwargs)
        position_embeddings = named.get("position_embeddings")
        if position_embeddings is None:  # releases that pass the rotary angles instead
            angles = torch.cat((named["rotary_pos_emb"], named["rotary_pos_emb"]), dim=-1)
            position_embeddings = (angles.cos(), angles.sin())
        patches = patch_received_attention(layer, named["hidden_states"], named["cu_seqlens"], position_embeddings)
        merged = patches.reshape(-1, merge_unit).sum(dim=-1)
        return merged if order is None else merged[order.to(merged.device)]

    return score


def _window_order(visual: nn.Module, image_grid_thw: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Where each merged token (row-major per image) is in the tower's order: the inverse
    of Qwen2.5-VL's window permutation, None for a tower without one."""
    if getattr(visual, "window_size", None) is None:
        return None
    window_index = kwargs.get("window_index")  # the caller may have precomputed it
    if window_index is None:
        get_window_index = getattr(sys.modules.get(type(visual).__module__), "get_vision_window_index", None)
        if callable(get_window_index):
            window_index, _ = get_window_index(
                image_grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size,
            )
        elif callable(getattr(visual, "get_window_index", None)):  # releases with the tower's own method
            window_index, _ = visual.get_window_index(image_grid_thw)
        else:
            raise TypeError(f"cannot find the window permutation of {type(visual).__name__}")
    return torch.argsort(window_index)


@contextmanager
def merged_scores_for_call(
    visual: nn.Module, image_grid_thw: torch.Tensor, kwargs: dict[str, Any]
) -> Iterator[ScoreSlot]:
    """While one run of the tower `visual` on images of `image_grid_thw` (with the tower's
    `kwargs`) encodes them, score its merged tokens: the yielded slot (and
    `_vision_attention.current_scores()`) then holds every image's merged tokens' scores,
    concatenated in the order of the tower's merged output."""
    block = scoring_block(visual)
    order = _window_order(visual, image_grid_thw, kwargs)
    with scores_for_call(block, _merged_scorer(block, visual.spatial_merge_size**2, order)) as slot:
        yield slot
