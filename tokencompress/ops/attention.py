"""`attention` (padded batches) and `varlen_attention` (packed batches): one entry point.

Semantics shared by every backend:
- softmax(q k^T * scale) v, non-causal, no dropout; `scale` defaults to 1/sqrt(Dqk);
- the softmax is taken in float32 (float64 inputs stay float64); the output has v's dtype;
- value heads may be wider or narrower than query/key heads (Dv != Dqk);
- masked keys get weight exactly 0; a sample (or packed segment) with no key at all
  gets an all-zero output, finite in value and gradient. EmbQ relies on this for an
  instruction without tokens and an image slot without features.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import dispatch, torch_backends
from .padding import pad_packed, segment_positions, unpad_padded

__all__ = ["attention", "varlen_attention"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Multi-head attention on padded batches.

    Args:
        q: (B, H, Lq, Dqk) queries.
        k: (B, H, Lk, Dqk) keys.
        v: (B, H, Lk, Dv) values.
        key_padding_mask: (B, Lk) bool, True = real key (flash-attn's convention; the
            opposite of `nn.MultiheadAttention`'s). None: every key is real.
        scale: multiplies q k^T; default 1 / sqrt(Dqk).
        backend: "flash", "xformers", "sdpa", "reference" or "auto"/None (see
            `tokencompress.ops.dispatch` for the switches and the automatic order).

    Returns:
        (B, H, Lq, Dv) in v's dtype; zeros for a sample whose keys are all masked.
    """
    _check_padded(q, k, v, key_padding_mask)
    scale = _check_scale(scale, q.shape[-1])
    name = dispatch.resolve_backend(q, k, v, backend)
    return _run_padded(dispatch.BACKENDS[name], q, k, v, key_padding_mask, scale)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Multi-head attention on packed variable-length batches (flash-attn's varlen layout).

    Segment i's queries q[cu_seqlens_q[i]:cu_seqlens_q[i+1]] attend to its keys
    k[cu_seqlens_k[i]:cu_seqlens_k[i+1]] only.

    Args:
        q: (total_q, H, Dqk); k: (total_k, H, Dqk); v: (total_k, H, Dv).
        cu_seqlens_q, cu_seqlens_k: (S + 1,) integer cumulative lengths, starting at 0
            and ending at total_q / total_k. Empty segments are allowed.
        max_seqlen_q, max_seqlen_k: the longest segment (an upper bound is fine).
        scale, backend: as in `attention`.

    Returns:
        (total_q, H, Dv) in v's dtype; zeros for the queries of a segment without keys.

    The cumulative lengths are checked against the totals and maxima, which costs one
    device synchronisation.
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = _check_scale(scale, q.shape[-1])
    impl = dispatch.BACKENDS[dispatch.resolve_backend(q, k, v, backend)]
    if impl.varlen is None or q.shape[0] == 0 or k.shape[0] == 0:
        # Pad, run the padded kernel with a key mask, unpad (all vectorized).
        q_padded, _ = pad_packed(q, cu_seqlens_q, max_seqlen_q)
        k_padded, key_mask = pad_packed(k, cu_seqlens_k, max_seqlen_k)
        v_padded, _ = pad_packed(v, cu_seqlens_k, max_seqlen_k)
        q_padded, k_padded, v_padded = (x.transpose(1, 2) for x in (q_padded, k_padded, v_padded))
        out = _run_padded(impl, q_padded, k_padded, v_padded, key_mask, scale)
        return unpad_padded(out.transpose(1, 2), cu_seqlens_q, q.shape[0])
    out = impl.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    # Kernels are expected to write zeros for segments without keys; make it a
    # guarantee (and scrub a NaN, should a kernel produce one).
    has_keys = cu_seqlens_k[1:] > cu_seqlens_k[:-1]
    segment, _ = segment_positions(cu_seqlens_q, q.shape[0])
    return torch.where(has_keys[segment][:, None, None], out, out.new_zeros(()))


def _run_padded(
    impl: dispatch.Backend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Run a padded backend with the all-masked rule applied the same way for every one."""
    if q.numel() == 0 or k.shape[2] == 0:
        # Nothing to attend to (or nobody asking). The reference's matmuls over an empty
        # key axis give zeros that stay in the autograd graph, so every projection
        # upstream still receives a (zero) gradient, as DDP expects.
        return torch_backends.reference_attention(q, k, v, None, scale)
    if key_padding_mask is None:
        return impl.padded(q, k, v, None, scale)
    has_keys = key_padding_mask.any(dim=-1)
    # Kernels differ on a row of all-masked keys (NaN, zeros or a uniform average), and
    # a NaN would also poison the gradients. So no kernel sees one: such samples are run
    # unmasked, and their output is replaced by zeros (zero gradient flows back).
    safe_mask = key_padding_mask | ~has_keys[:, None]
    out = impl.padded(q, k, v, safe_mask, scale)
    return torch.where(has_keys[:, None, None, None], out, out.new_zeros(()))


# -- validation ------------------------------------------------------------------------


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def _check_float_tensor(x: Any, name: str, rank: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {_describe(x)}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"q, k, v and masks must share one device, got {devices}")


def _check_scale(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {_describe(scale)}")
    return float(scale)


def _check_padded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor]
) -> None:
    _check_float_tensor(q, "q", 4, "(B, H, Lq, Dqk)")
    _check_float_tensor(k, "k", 4, "(B, H, Lk, Dqk)")
    _check_float_tensor(v, "v", 4, "(B, H, Lk, Dv)")
    batch, heads, _, qk_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != qk_dim:
        raise ValueError(
            f"k has shape {tuple(k.shape)}, expected (B, H, Lk, Dqk) = ({batch}, {heads}, Lk, {qk_dim}) "
            f"to match q's shape {tuple(q.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v has shape {tuple(v.shape)}, expected (B, H, Lk, Dv) with (B, H, Lk) = "
            f"{tuple(k.shape[:3])} as in k"
        )
    tensors = {"q": q, "k": k, "v": v}
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be a bool tensor (True = real key), got {_describe(key_padding_mask)}"
            )
        if tuple(key_padding_mask.shape) != (batch, k.shape[2]):
            raise ValueError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, "
                f"expected (B, Lk) = {(batch, k.shape[2])}"
            )
        tensors["key_padding_mask"] = key_padding_mask
    _check_same_device(**tensors)


def _check_cu_seqlens(cu: Any, name: str, total: int, max_seqlen: Any, max_name: str) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D integer tensor (S + 1,), got {_describe(cu)}")
    if cu.is_floating_point() or cu.is_complex() or cu.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {cu.dtype}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{max_name} must be a non-negative int, got {_describe(max_seqlen)}")
    lengths = cu[1:] - cu[:-1]
    longest = lengths.max() if lengths.numel() else cu.new_zeros(())
    valid = (cu[0] == 0) & (cu[-1] == total) & (lengths >= 0).all() & (longest <= max_seqlen)
    if not bool(valid):  # the one device sync
        raise ValueError(
            f"{name}={cu.tolist()} must start at 0, never decrease and end at the packed length "
            f"{total}, with no segment longer than {max_name}={max_seqlen}"
        )


def _check_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> None:
    _check_float_tensor(q, "q", 3, "(total_q, H, Dqk)")
    _check_float_tensor(k, "k", 3, "(total_k, H, Dqk)")
    _check_float_tensor(v, "v", 3, "(total_k, H, Dv)")
    if k.shape[1:] != q.shape[1:]:
        raise ValueError(
            f"k has shape {tuple(k.shape)}, expected (total_k, H, Dqk) = (total_k, {q.shape[1]}, {q.shape[2]})"
        )
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"v has shape {tuple(v.shape)}, expected (total_k, H, Dv) with (total_k, H) = {tuple(k.shape[:2])}"
        )
    _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} segments but cu_seqlens_k has "
            f"{cu_seqlens_k.numel() - 1}; expected the same number"
        )
    _check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
