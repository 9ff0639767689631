"""Measure one forward pass on the `meta` device: multiply-adds and peak activation bytes.

Nothing is computed on a `meta` tensor, only shapes, so a full-size model runs in seconds
and needs no weights. Two things are read off the pass:

- multiply-adds: `mac_count.MacCounter` counts matmuls, convolutions and attention by its
  own formulas, so the count does not depend on which kernels the installed torch picks.
  Element-wise work (norms, activations, softmax, residual adds) is not counted, as in the
  papers we compare with. Attention is counted over the full query x key square, causal
  or not: a dense kernel does that work, a causal flash kernel skips about half.
- peak activation bytes: the most bytes of tensors created during the pass that are alive
  at once (the pass's inputs included, weights excluded), tracked per storage so that views
  are not counted twice. On `meta`, PyTorch's SDPA falls back to the math path that
  materialises the (heads, L, L) score matrix; `FusedAttentionOnMeta` reroutes it to the
  fused CPU flash kernel's meta function, which allocates only the output, so the peak is
  what a fused kernel (flash-attn, PyTorch's flash/efficient SDPA) needs.

A model that computes index tensors on the CPU from real sizes (Qwen3-VL's vision tower,
from `grid_thw`) runs under `CpuOperandsOnMeta`, which moves such tensors to `meta` where
they meet meta activations.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from .mac_count import MacCounter

__all__ = ["Measurement", "LiveBytesTracker", "FusedAttentionOnMeta", "CpuOperandsOnMeta", "measure"]


@dataclass(frozen=True)
class Measurement:
    """What one pass cost: multiply-adds and the peak bytes of live activations."""

    macs: int
    peak_bytes: int


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """An id of the tensor's storage (shared by its views), with its size; None if it has none."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        # Layouts without one storage: torch raises NotImplementedError for sparse tensors
        # ("Cannot access storage of SparseTensorImpl") and RuntimeError for some wrapper
        # subclasses. They are not counted: no op on the profiled models returns them.
        return None
    # `_cdata` is the address of the StorageImpl, which views share: the identity that
    # torch's own `StorageWeakRef` uses (a meta storage's data_ptr is always 0).
    return storage._cdata, storage.nbytes()


class LiveBytesTracker(TorchDispatchMode):
    """Track the bytes of tensor storages created inside the mode; `peak` is their maximum.

    A storage is counted once, when an op first returns a tensor on it, and released when
    the last tracked tensor on it is garbage-collected. Storages that existed before (the
    weights, the inputs) are never counted, even when an op returns a view of them.
    """

    def __init__(self, baseline_bytes: int = 0) -> None:
        super().__init__()
        self.live = baseline_bytes
        self.peak = baseline_bytes
        self._refs: dict[int, list[int]] = {}  # storage id -> [nbytes, tracked tensors]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            key[0]
            for leaf in tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor) and (key := _storage_key(leaf)) is not None
        }
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf, inputs)
        return out

    def _track(self, tensor: torch.Tensor, input_storages: set[int]) -> None:
        key = _storage_key(tensor)
        if key is None:
            return
        storage_id, nbytes = key
        entry = self._refs.get(storage_id)
        if entry is None:
            if storage_id in input_storages:
                return  # a view of a storage made before the mode: a weight or an input
            entry = self._refs[storage_id] = [nbytes, 0]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(tensor, self._release, storage_id)

    def _release(self, storage_id: int) -> None:
        entry = self._refs[storage_id]
        entry[1] -= 1
        if entry[1] == 0:
            del self._refs[storage_id]
            self.live -= entry[0]


class FusedAttentionOnMeta(TorchFunctionMode):
    """Run `F.scaled_dot_product_attention` on `meta` as the fused flash kernel would.

    Only the shapes matter on `meta`: the flash kernel's meta function returns the output
    (and a small log-sum-exp) without the score matrix. Multiply-adds are counted at the
    attention call (`MacCounter`), whichever kernel runs. Other devices, and shapes the
    flash kernel does not take, are left alone.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _flash_supports(*args):
            return _flash_attention_meta(*args, **kwargs)
        return func(*args, **kwargs)


def _flash_supports(query: Any = None, key: Any = None, value: Any = None, *args: Any) -> bool:
    """Whether the flash kernel's meta function fits: meta tensors, values as wide as queries.

    Values wider than queries (EmbQ's visual attention) stay on the math path; the scores
    it materialises are small there (queries x keys, a few queries).
    """
    tensors = (query, key, value)
    return (
        all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors)
        and query.shape[-1] == value.shape[-1]
    )


def _flash_attention_meta(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    # The meta function broadcasts grouped key/value heads itself, so `enable_gqa` needs
    # no repeat here (a real GQA kernel does not copy them either).
    output, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return output


class CpuOperandsOnMeta(TorchDispatchMode):
    """Move CPU tensors to `meta` in any op that also takes a meta tensor.

    Some models compute small tensors from real sizes on the CPU (positions, interpolation
    weights), where indexing and `.tolist()` need values, and then combine them with the
    activations; with meta activations torch refuses the mix ("Tensor on device cpu is not
    on the expected device meta"). On meta only shapes matter, so the CPU operand can go
    there as it is. Ops on CPU tensors alone still run on the CPU, with real values.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        if any(t.device.type == "meta" for t in tensors) and any(t.device.type == "cpu" for t in tensors):
            args, kwargs = tree_map(_cpu_to_meta, (args, kwargs))
        return func(*args, **kwargs)


def _cpu_to_meta(leaf: Any) -> Any:
    # A 0-dim CPU tensor may meet any device (torch treats it as a scalar): left as it is.
    if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" and leaf.dim() > 0:
        return leaf.to("meta")
    return leaf


def _storage_bytes(tensors: tuple[Any, ...]) -> int:
    """Bytes of the distinct storages under `tensors` (views of one storage count once)."""
    storages = {
        key for leaf in tree_leaves(tensors) if isinstance(leaf, torch.Tensor) and (key := _storage_key(leaf))
    }
    return sum(nbytes for _, nbytes in storages)


def measure(fn: Callable[..., Any], *inputs: Any, **kwargs: Any) -> tuple[Any, Measurement]:
    """Run `fn(*inputs, **kwargs)` under `no_grad` and return its output and cost.

    `peak_bytes` includes the storages of the tensors passed in (they are alive for the
    whole pass) and every tensor the pass creates; weights reached through `fn` are not.
    """
    tracker = LiveBytesTracker(baseline_bytes=_storage_bytes((inputs, kwargs)))
    # The counter goes in after the rerouting mode, so it sees each attention call first.
    with torch.no_grad(), FusedAttentionOnMeta(), MacCounter() as counter, tracker:
        out = fn(*inputs, **kwargs)
    return out, Measurement(macs=counter.macs, peak_bytes=tracker.peak)
