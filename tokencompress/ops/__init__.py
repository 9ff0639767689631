"""Attention kernels behind one dispatch point.

    from tokencompress import ops
    out = ops.attention(q, k, v, key_padding_mask=mask)          # (B, H, L, D) padded
    out = ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k)  # (total, H, D) packed
    with ops.use_backend("reference"):                             # force a path
        ...

Backends, best first: "flash" (flash-attn 2; CUDA, fp16/bf16), "xformers" (CUDA),
"sdpa" (`torch.nn.functional.scaled_dot_product_attention`), "reference" (plain
float32 matmul/softmax). Force one with `backend=`, `use_backend`, `set_backend` or the
environment variable TOKENCOMPRESS_ATTENTION. flash-attn and xformers are optional and
imported lazily, only when their backend runs.
"""

from .attention import attention, varlen_attention
from .dispatch import (
    BACKENDS,
    ENV_VAR,
    PREFERENCE,
    Backend,
    BackendUnavailableError,
    available_backends,
    get_backend,
    resolve_backend,
    set_backend,
    use_backend,
)
from .torch_backends import attention_weights

__all__ = [
    "attention",
    "varlen_attention",
    "attention_weights",
    "use_backend",
    "set_backend",
    "get_backend",
    "resolve_backend",
    "available_backends",
    "BackendUnavailableError",
    "Backend",
    "BACKENDS",
    "ENV_VAR",
    "PREFERENCE",
]
