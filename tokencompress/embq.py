"""`EmbQ`: FlashSloth's embedded query module (paper Sec. 3.2.2, eqs. 1, 5, 6)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from . import ops
from ._autocast import autocast_active
from .base import check_tokens
from .ops.padding import segment_positions

__all__ = ["EmbQ", "QKVProjections"]


class QKVProjections(nn.Module):
    """The query, key and value projections of one cross-attention (with bias).

    q_proj and k_proj map `qk_dim -> qk_dim`, v_proj maps `v_dim -> v_dim`. There is no
    output projection: EmbQ has none.
    """

    def __init__(self, qk_dim: int, v_dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(qk_dim, qk_dim)
        self.k_proj = nn.Linear(qk_dim, qk_dim)
        self.v_proj = nn.Linear(v_dim, v_dim)


class EmbQ(nn.Module):
    """Instruction-aware visual querying of FlashSloth's learnable query tokens.

    Given the query tokens' hidden states F_q (n per block), the instruction's hidden
    states F_t and the raw vision features F_v, returns the update that the caller adds
    to F_q (paper eq. 1: F_q <- F_q + EmbQ(F_v, F_t, F_q))::

        Q_t  = norm_query(down_text(F_q))                      # (n, inner)
        T    = norm_text(down_text(F_t))                       # down_text is shared
        F_qt = Attn(text_attn.q_proj(Q_t), text_attn.k_proj(T), text_attn.v_proj(T))
        K_v  = norm_vision(down_vision(F_v))
        F_qv = Attn(vision_attn.q_proj(F_qt), vision_attn.k_proj(K_v), vision_attn.v_proj(F_v))
        return up(F_qv)                                        # (n, text_dim)

    Attn is `num_heads`-head attention with scale 1/sqrt(inner_dim / num_heads) in both
    steps; in the visual one, query/key heads are inner_dim / num_heads wide and value
    heads vision_dim / num_heads wide (FlashSloth: 18 and 36), and the values are the raw,
    full-width vision features. The softmax is taken in float32. There is no dropout, no
    FFN and no output projection. Paper sizes: ``EmbQ(2560, 1152)`` (phi-2 hidden size,
    SigLIP width), 8,084,416 parameters.

    Empty inputs are defined, never NaN:
    - an instruction with no tokens (text fully masked, T = 0 or an empty packed segment):
      the text attention returns zeros, so the visual attention is queried by
      ``vision_attn.q_proj.bias`` alone (the same for every query token);
    - a sample with no vision tokens: the visual attention returns zeros, so the update
      is ``up.bias``.

    Submodule names, and the authors' release (``LQFormer`` with one layer, in
    ``flashsloth/model/lqformer.py``) they correspond to::

        down_text                 <- down_projector_learnable_text
        down_vision               <- down_projector_image
        norm_query                <- layers.0.ln_q
        norm_text                 <- layers.0.ln_text
        norm_vision               <- layers.0.ln_kv
        text_attn.{q,k,v}_proj    <- layers.0.t2q_attn.{q,k,v}_proj
        vision_attn.{q,k,v}_proj  <- layers.0.i2q_attn.{q,k,v}_proj
        up                        <- up_projector

    The release's module returns ``F_q + update``; this one returns the update. Where
    the release differs numerically: with every text token masked it averages the
    padding tokens (additive -1e4 mask) where this module returns zeros; and it rounds
    the attention weights to the value dtype before the value product, where this
    module keeps float32.

    Args:
        text_dim: the LLM's hidden size (width of F_q and F_t).
        vision_dim: the vision features' width (F_v); divisible by `num_heads`.
        inner_dim: the width queries, text and vision keys are projected down to;
            divisible by `num_heads`.
        num_heads: attention heads of both cross-attentions.
    """

    def __init__(self, text_dim: int, vision_dim: int, inner_dim: int = 576, num_heads: int = 32) -> None:
        super().__init__()
        for name, value in (("text_dim", text_dim), ("vision_dim", vision_dim),
                            ("inner_dim", inner_dim), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("inner_dim", inner_dim), ("vision_dim", vision_dim)):
            if value % num_heads:
                raise ValueError(f"{name}={value} is not divisible by num_heads={num_heads}")
        self.text_dim = text_dim
        self.vision_dim = vision_dim
        self.inner_dim = inner_dim
        self.num_heads = num_heads
        self.head_dim = inner_dim // num_heads  # queries and keys, both attentions
        self.vision_head_dim = vision_dim // num_heads  # values of the visual attention
        self.scale = self.head_dim ** -0.5

        self.down_text = nn.Linear(text_dim, inner_dim)
        self.down_vision = nn.Linear(vision_dim, inner_dim)
        self.norm_query = nn.LayerNorm(inner_dim)
        self.norm_text = nn.LayerNorm(inner_dim)
        self.norm_vision = nn.LayerNorm(inner_dim)
        self.text_attn = QKVProjections(inner_dim, inner_dim)
        self.vision_attn = QKVProjections(inner_dim, vision_dim)
        self.up = nn.Linear(vision_dim, text_dim)

    def extra_repr(self) -> str:
        return (
            f"text_dim={self.text_dim}, vision_dim={self.vision_dim}, "
            f"inner_dim={self.inner_dim}, num_heads={self.num_heads}"
        )

    # -- the maths, shared by both entry points (token axis second to last) --------------
    def _text_qkv(self, queries: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        text = self.norm_text(self.down_text(text))
        query = self.text_attn.q_proj(self.norm_query(self.down_text(queries)))
        return query, self.text_attn.k_proj(text), self.text_attn.v_proj(text)

    def _vision_qkv(self, text_queries: torch.Tensor, vision: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keys = self.norm_vision(self.down_vision(vision))
        query = self.vision_attn.q_proj(text_queries)
        # The values are the raw vision features, not their down-projection.
        return query, self.vision_attn.k_proj(keys), self.vision_attn.v_proj(vision)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(..., L, H * d) -> (..., L, H, d)."""
        return x.unflatten(-1, (self.num_heads, -1))

    # -- padded batches ------------------------------------------------------------------
    def forward(
        self,
        queries: torch.Tensor,
        text: torch.Tensor,
        vision: torch.Tensor,
        text_mask: Optional[torch.Tensor] = None,
        vision_mask: Optional[torch.Tensor] = None,
        return_attention: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The update for the query tokens of a padded batch.

        Args:
            queries: (B, n, text_dim) hidden states of the query tokens.
            text: (B, T, text_dim) hidden states of each sample's instruction (T may be 0).
            vision: (B, V, vision_dim) raw vision features (V may be 0).
            text_mask: (B, T) bool, True = real instruction token; None: all real.
            vision_mask: (B, V) bool, True = real vision token; None: all real.
            return_attention: also return the visual attention weights.

        Returns:
            The update (B, n, text_dim), which the caller adds to `queries`; with
            `return_attention`, also the visual attention weights averaged over heads,
            (B, n, V) in float32 (float64 for float64 inputs); rows sum to 1, or are all
            zero for a sample without vision tokens.
        """
        self._check_padded(queries, text, vision, text_mask, vision_mask)

        def heads_first(x: torch.Tensor) -> torch.Tensor:  # (B, L, H*d) -> (B, H, L, d)
            return self._split_heads(x).transpose(1, 2)

        def heads_last(x: torch.Tensor) -> torch.Tensor:  # (B, H, L, d) -> (B, L, H*d)
            return x.transpose(1, 2).flatten(2)

        q, k, v = map(heads_first, self._text_qkv(queries, text))
        text_queries = heads_last(ops.attention(q, k, v, key_padding_mask=text_mask, scale=self.scale))
        q, k, v = map(heads_first, self._vision_qkv(text_queries, vision))
        visual = ops.attention(q, k, v, key_padding_mask=vision_mask, scale=self.scale)
        update = self.up(heads_last(visual))
        if not return_attention:
            return update
        # Fused kernels do not expose the weights; recompute them (n x V per head: cheap).
        weights = ops.attention_weights(q, k, key_padding_mask=vision_mask, scale=self.scale)
        return update, weights.mean(dim=1)

    # -- packed batches ------------------------------------------------------------------
    def forward_packed(
        self,
        queries: torch.Tensor,
        text: torch.Tensor,
        vision: torch.Tensor,
        cu_seqlens_queries: torch.Tensor,
        cu_seqlens_text: torch.Tensor,
        cu_seqlens_vision: torch.Tensor,
        vision_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The update for query blocks packed without padding (flash-attn varlen layout).

        Block i is rows ``cu_seqlens_queries[i]:cu_seqlens_queries[i+1]`` of `queries`; it
        reads instruction span i of `text` and vision segment ``vision_index[i]`` of
        `vision` (default: segment i). So a multi-turn sample is one query block per
        user turn, each with its own instruction span, all pointing at the sample's
        vision segment (its images' features concatenated); the vision features are
        projected once however many blocks read them.

        Args:
            queries: (total_queries, text_dim).
            text: (total_text, text_dim); a span may be empty (an instruction without
                tokens, see the class docstring).
            vision: (total_vision, vision_dim); a segment may be empty.
            cu_seqlens_queries: (S + 1,) integer cumulative lengths of the query blocks.
            cu_seqlens_text: (S + 1,) cumulative lengths of the instruction spans.
            cu_seqlens_vision: (S_v + 1,) cumulative lengths of the vision segments;
                S_v == S when `vision_index` is None.
            vision_index: (S,) integer, the vision segment each block reads.

        Returns:
            The update (total_queries, text_dim), which the caller adds to `queries`.

        Reading the sequence lengths costs a few device synchronisations.
        """
        q_lengths, t_lengths, v_lengths, vision_index = self._check_packed(
            queries, text, vision, cu_seqlens_queries, cu_seqlens_text, cu_seqlens_vision, vision_index
        )
        q, k, v = map(self._split_heads, self._text_qkv(queries, text))
        text_queries = ops.varlen_attention(
            q, k, v, cu_seqlens_queries, cu_seqlens_text, max(q_lengths), max(t_lengths), scale=self.scale
        ).flatten(1)
        q, k, v = map(self._split_heads, self._vision_qkv(text_queries, vision))
        if vision_index is not None:
            # Give each block its own copy of the keys/values it reads: the varlen kernel
            # wants one contiguous key segment per query block. Rows are copied, the
            # projections above ran once.
            rows, cu_seqlens_vision, v_lengths = _rows_of_segments(cu_seqlens_vision, v_lengths, vision_index)
            k, v = k[rows], v[rows]
        visual = ops.varlen_attention(
            q, k, v, cu_seqlens_queries, cu_seqlens_vision, max(q_lengths), max(v_lengths),
            scale=self.scale,
        )
        return self.up(visual.flatten(1))

    # -- validation ----------------------------------------------------------------------
    def _check_dtype(self, **tensors: torch.Tensor) -> None:
        param = self.down_text.weight
        if autocast_active(param.device.type):
            return  # under autocast the inputs legitimately differ from the parameters
        for name, x in tensors.items():
            if x.dtype != param.dtype:
                raise ValueError(
                    f"{name} has dtype {x.dtype} but EmbQ's parameters are {param.dtype}; "
                    f"expected {name}.dtype == {param.dtype} (cast one or use autocast)"
                )

    def _check_padded(
        self,
        queries: Any,
        text: Any,
        vision: Any,
        text_mask: Any,
        vision_mask: Any,
    ) -> None:
        check_tokens(queries, "queries", dim=self.text_dim)
        _check_features(text, "text", "(B, T, text_dim)", 3, self.text_dim)
        _check_features(vision, "vision", "(B, V, vision_dim)", 3, self.vision_dim)
        batch = queries.shape[0]
        for name, x in (("text", text), ("vision", vision)):
            if x.shape[0] != batch:
                raise ValueError(
                    f"{name} has batch size {x.shape[0]}, expected {batch} (the batch size of queries)"
                )
        masks = (("text_mask", text_mask, text, "T"), ("vision_mask", vision_mask, vision, "V"))
        for name, mask, x, axis in masks:
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise ValueError(f"{name} must be a bool tensor (True = real token), got {_describe(mask)}")
            if mask.shape != x.shape[:2]:
                raise ValueError(
                    f"{name} has shape {tuple(mask.shape)}, expected (B, {axis}) = {tuple(x.shape[:2])}"
                )
        self._check_dtype(queries=queries, text=text, vision=vision)

    def _check_packed(
        self,
        queries: Any,
        text: Any,
        vision: Any,
        cu_seqlens_queries: Any,
        cu_seqlens_text: Any,
        cu_seqlens_vision: Any,
        vision_index: Any,
    ) -> tuple[list[int], list[int], list[int], Optional[torch.Tensor]]:
        """Validate; return the segment lengths (host lists) and the vision index."""
        _check_features(queries, "queries", "(total_queries, text_dim)", 2, self.text_dim)
        _check_features(text, "text", "(total_text, text_dim)", 2, self.text_dim)
        _check_features(vision, "vision", "(total_vision, vision_dim)", 2, self.vision_dim)
        if queries.shape[0] == 0:
            raise ValueError("queries has no tokens (total_queries=0); expected at least one query token")
        q_lengths = _segment_lengths(cu_seqlens_queries, "cu_seqlens_queries", queries.shape[0])
        t_lengths = _segment_lengths(cu_seqlens_text, "cu_seqlens_text", text.shape[0])
        v_lengths = _segment_lengths(cu_seqlens_vision, "cu_seqlens_vision", vision.shape[0])
        if len(t_lengths) != len(q_lengths):
            raise ValueError(
                f"cu_seqlens_text has {len(t_lengths)} segments, expected {len(q_lengths)} "
                "(one instruction span per query block, as in cu_seqlens_queries)"
            )
        if vision_index is None:
            if len(v_lengths) != len(q_lengths):
                raise ValueError(
                    f"cu_seqlens_vision has {len(v_lengths)} segments, expected {len(q_lengths)} "
                    "(one per query block), or pass vision_index"
                )
        else:
            if (
                not isinstance(vision_index, torch.Tensor)
                or vision_index.shape != (len(q_lengths),)
                or vision_index.is_floating_point()
                or vision_index.dtype == torch.bool
            ):
                raise ValueError(
                    f"vision_index must be an integer tensor of shape (S,) = ({len(q_lengths)},), "
                    f"got {_describe(vision_index)}"
                )
            bad = [i for i in vision_index.tolist() if not 0 <= i < len(v_lengths)]
            if bad:
                raise ValueError(
                    f"vision_index holds {bad}, expected indices in [0, {len(v_lengths)}) "
                    "(the vision segments of cu_seqlens_vision)"
                )
        self._check_dtype(queries=queries, text=text, vision=vision)
        return q_lengths, t_lengths, v_lengths, vision_index


def _rows_of_segments(
    cu_seqlens: torch.Tensor, lengths: list[int], index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The packed rows of segments `index` (in that order), their cu_seqlens and lengths."""
    picked = [lengths[i] for i in index.tolist()]
    device = cu_seqlens.device
    cu_picked = torch.tensor([0, *picked], device=device).cumsum(0)
    segment, position = segment_positions(cu_picked, sum(picked))
    starts = cu_seqlens.long()[index.to(device).long()]
    return starts[segment] + position, cu_picked, picked


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def _check_features(x: Any, name: str, layout: str, rank: int, width: int) -> None:
    """A floating tensor of the given rank and last-dim width (any number of tokens)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[-1] != width:
        raise ValueError(f"{name} has width {x.shape[-1]}, expected {layout} with width {width}")
    if rank == 3 and x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (B=0); expected at least one sample")


def _segment_lengths(cu: Any, name: str, total: int) -> list[int]:
    """The segment lengths of cumulative lengths `cu`, checked against the packed `total`."""
    if (
        not isinstance(cu, torch.Tensor)
        or cu.dim() != 1
        or cu.is_floating_point()
        or cu.dtype == torch.bool
    ):
        raise ValueError(f"{name} must be a 1-D integer tensor (S + 1,), got {_describe(cu)}")
    bounds = cu.tolist()
    if len(bounds) < 2:
        raise ValueError(f"{name}={bounds} describes no segment (an empty batch); expected S >= 1 segments")
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total or min(lengths) < 0:
        raise ValueError(
            f"{name}={bounds} must start at 0, never decrease and end at {total} (the packed length)"
        )
    return lengths
