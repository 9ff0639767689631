"""Backends that need nothing but PyTorch: "sdpa" and the plain "reference"."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from .._autocast import autocast_active

__all__ = [
    "compute_dtype",
    "no_autocast",
    "attention_weights",
    "reference_attention",
    "sdpa_attention",
    "always_supported",
]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype attention is computed in: at least float32 (float64 stays float64)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off on x's device: it would recast the float32 maths to fp16/bf16."""
    if autocast_active(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) over the keys, (B, H, Lq, Lk), in at least float32.

    `key_padding_mask` is (B, Lk) bool with True = real key. Masked keys get weight 0; a
    sample with no real key gets an all-zero row (not NaN), so that its attention output
    is zero. `scale` defaults to 1 / sqrt(q.shape[-1]).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dtype = compute_dtype(q, k)
    with no_autocast(q):
        scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-2, -1)) * scale
        if key_padding_mask is None:
            return torch.softmax(scores, dim=-1)
        has_keys = key_padding_mask.any(dim=-1)
        # A row with every key masked would be softmax(-inf, ..., -inf) = NaN, and the NaN
        # would reach q's and k's gradients even if the row were zeroed afterwards. Unmask
        # such rows for the softmax (finite everywhere), then zero them.
        keep = key_padding_mask | ~has_keys[:, None]
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.where(has_keys[:, None, None, None], weights, weights.new_zeros(()))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Plain matmul / softmax / matmul in at least float32; output in v's dtype."""
    weights = attention_weights(q, k, key_padding_mask=key_padding_mask, scale=scale)
    dtype = compute_dtype(weights, v)
    with no_autocast(v):
        out = torch.matmul(weights.to(dtype), v.to(dtype))
    return out.to(v.dtype)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on inputs upcast to at least float32.

    Why upcast: which SDPA kernel runs depends on device, dtype, mask and head sizes, and
    its math fallback takes the softmax in the input dtype; upcasting is the only way to
    keep the float32-softmax contract on every device. EmbQ's attentions are small (9
    queries), so the copies are cheap; the low-precision fused paths are "flash" and
    "xformers", whose kernels keep the softmax statistics in float32 themselves.
    """
    out_dtype, dtype = v.dtype, compute_dtype(q, k, v)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    with no_autocast(q):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.to(out_dtype)


def always_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Availability check of the PyTorch backends: they run anywhere PyTorch does."""
    return None

