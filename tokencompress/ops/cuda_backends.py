"""CUDA-only backends: "flash" (flash-attn 2) and "xformers" (memory_efficient_attention).

Both packages are optional extras (`pip install tokencompress[flash-attn]` /
`[xformers]`), imported inside the functions only: importing tokencompress never needs
them. Their kernels accumulate the softmax in float32, so they keep the float32-softmax
contract while reading fp16/bf16 inputs directly.

Neither kernel is asked to handle unequal query/key and value head sizes (EmbQ's visual
attention: 18 vs 36): the narrower side is zero-padded to the wider one. Zero columns
add nothing to q . k, and the padded output columns are sliced off, so this is exact as
long as the scale is passed explicitly (it always is).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "flash_unsupported_reason",
    "flash_attention",
    "flash_varlen_attention",
    "xformers_unsupported_reason",
    "xformers_attention",
]

FLASH_MAX_HEAD_DIM = 256
FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    devices = {t.device for t in (q, k, v)}
    if any(device.type != "cuda" for device in devices):
        return f"needs CUDA tensors, got device(s) {sorted(str(d) for d in devices)}"
    return None


def flash_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    if not _installed("flash_attn"):
        return "flash-attn is not installed (pip install 'tokencompress[flash-attn]')"
    reason = _cuda_reason(q, k, v)
    if reason is not None:
        return reason
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return f"flash-attn 2 needs an Ampere or newer GPU, got {torch.cuda.get_device_name(q.device)}"
    dtypes = {q.dtype, k.dtype, v.dtype}
    if len(dtypes) != 1 or q.dtype not in FLASH_DTYPES:
        return f"needs q, k, v all float16 or all bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}"
    head_dim = max(q.shape[-1], v.shape[-1])
    if head_dim > FLASH_MAX_HEAD_DIM:
        return f"head dim {head_dim} exceeds flash-attn's maximum {FLASH_MAX_HEAD_DIM}"
    return None


def xformers_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    if not _installed("xformers"):
        return "xformers is not installed (pip install 'tokencompress[xformers]')"
    reason = _cuda_reason(q, k, v)
    if reason is not None:
        return reason
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        return f"needs q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    return None


def _equal_head_dims(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """q, k, v zero-padded on the last dim to one head size, and v's original size."""
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    if qk_dim < v_dim:
        q = F.pad(q, (0, v_dim - qk_dim))
        k = F.pad(k, (0, v_dim - qk_dim))
    elif v_dim < qk_dim:
        v = F.pad(v, (0, qk_dim - v_dim))
    return q, k, v, v_dim


def flash_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
) -> torch.Tensor:
    """Packed (total, H, D) inputs straight into `flash_attn_varlen_func`."""
    from flash_attn import flash_attn_varlen_func

    q, k, v, v_dim = _equal_head_dims(q, k, v)
    out = flash_attn_varlen_func(
        q, k, v,
        cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
        max_seqlen_q, max_seqlen_k,
        dropout_p=0.0, softmax_scale=scale, causal=False,
    )
    return out[..., :v_dim]


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Padded (B, H, L, D) inputs; a key mask is applied by packing the real keys (varlen)."""
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    if key_padding_mask is None:
        from flash_attn import flash_attn_func

        q, k, v, v_dim = _equal_head_dims(q, k, v)
        # flash-attn reads (B, L, H, D); transposing keeps the last dim contiguous.
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=0.0, softmax_scale=scale, causal=False,
        )
        return out.transpose(1, 2)[..., :v_dim]
    # Attention is invariant to the order of the keys, so any mask pattern (not only
    # right padding) is handled by gathering each sample's real keys into one segment.
    real_keys = key_padding_mask.reshape(-1).nonzero().squeeze(1)
    k_packed = k.transpose(1, 2).reshape(batch * k_len, heads, -1)[real_keys]
    v_packed = v.transpose(1, 2).reshape(batch * k_len, heads, -1)[real_keys]
    cu_seqlens_k = F.pad(key_padding_mask.sum(dim=1).cumsum(dim=0), (1, 0))
    q_packed = q.transpose(1, 2).reshape(batch * q_len, heads, -1)
    cu_seqlens_q = torch.arange(0, (batch + 1) * q_len, q_len, device=q.device)
    out = flash_varlen_attention(
        q_packed, k_packed, v_packed, cu_seqlens_q, cu_seqlens_k, q_len, k_len, scale
    )
    return out.reshape(batch, q_len, heads, -1).transpose(1, 2)


def xformers_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Padded (B, H, L, D) inputs into `xformers.ops.memory_efficient_attention`."""
    from xformers.ops import memory_efficient_attention

    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    q, k, v, v_dim = _equal_head_dims(q, k, v)
    bias = None
    if key_padding_mask is not None:
        # xformers wants an additive bias whose rows start on 8-element boundaries:
        # allocate a wider buffer and slice it, as its error message recommends.
        aligned_len = -(-k_len // 8) * 8
        bias = q.new_zeros(batch, heads, q_len, aligned_len)[..., :k_len]
        bias.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    out = memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=0.0, scale=scale
    )
    return out.transpose(1, 2)[..., :v_dim]
