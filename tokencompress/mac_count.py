"""Count the multiply-adds of a forward pass by rules of our own, the same on every torch.

`torch.utils.flop_counter.FlopCounterMode` counts what its table of aten ops knows, and
which aten ops a call reaches depends on the torch version, the device and the backend:
`F.scaled_dot_product_attention` reaches a fused kernel on CPU/CUDA (in the table on some
versions, not on others) or its math decomposition into `bmm` (on `meta`, on some
versions). The same model then gets different counts. `MacCounter` does not use that
table:

- attention is counted where it is called, at `F.scaled_dot_product_attention`, from the
  shapes of query, key and value (`attention_macs`); whatever that call runs below (a
  fused kernel, the math path's `bmm`s, a meta function) is not counted again. The fused
  aten attention ops, when called directly, are counted by the same formula;
- matrix products (`mm`, `addmm`, `bmm`, `baddbmm`, `addbmm`, `mv`, `addmv`) and
  convolutions by the textbook formulas in this module; `nn.Linear`, `matmul` and
  `einsum` reach these.

Element-wise work (norms, activations, softmax, residual adds, biases) is not counted, as
in the papers we compare with. Attention is counted over the full query x key square,
masked or causal: a dense kernel does that work (a causal flash kernel skips about half).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MacCounter", "attention_macs", "matmul_macs", "convolution_macs", "count_macs"]

aten = torch.ops.aten
Shape = Sequence[int]


# -- formulas -----------------------------------------------------------------------------
def attention_macs(query: Shape, key: Shape, value: Shape) -> int:
    """Multiply-adds of softmax(q k^T) v over the full square: lead * Lq * Lk * (E + Ev).

    Shapes are (..., L, E), as `F.scaled_dot_product_attention` takes them ((B, H, L, E)
    or (B, L, E)). Leading axes broadcast; keys and values may have fewer heads than the
    queries (grouped-query attention), and every query head still scores every key, so
    each leading axis counts at its largest size.
    """
    *query_lead, query_len, qk_dim = query
    *key_lead, key_len, _ = key
    *value_lead, _, value_dim = value
    rank = max(len(query_lead), len(key_lead), len(value_lead))
    padded = [(1,) * (rank - len(lead)) + tuple(lead) for lead in (query_lead, key_lead, value_lead)]
    lead = math.prod(max(sizes) for sizes in zip(*padded))
    return lead * query_len * key_len * (qk_dim + value_dim)


def matmul_macs(left: Shape, right: Shape) -> int:
    """Multiply-adds of a (batched) matrix product: batch * n * k * m for (.., n, k) @ (.., k, m)."""
    *batch, rows, inner = left
    *_, columns = right
    return math.prod(batch) * rows * inner * columns


def convolution_macs(input: Shape, weight: Shape, output: Shape, transposed: bool = False) -> int:
    """Multiply-adds of a convolution: every weight meets every output (input) position.

    `weight` is (C_out, C_in / groups, *kernel), or (C_in, C_out / groups, *kernel) when
    `transposed`; a transposed convolution scatters each input position through the kernel.
    """
    batch = input[0]
    positions = math.prod(input[2:] if transposed else output[2:])
    return batch * math.prod(weight) * positions


# -- aten ops -----------------------------------------------------------------------------
def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _fused_attention(args: tuple, kwargs: dict, out: Any) -> int:
    query, key, value = args[:3]
    return attention_macs(_shape(query), _shape(key), _shape(value))


def _convolution(args: tuple, kwargs: dict, out: Any) -> int:
    transposed = args[6] if len(args) > 6 else kwargs.get("transposed", False)
    return convolution_macs(_shape(args[0]), _shape(args[1]), _shape(out), bool(transposed))


def _packet(name: str) -> Any:
    """The aten overload packet `name`, or None on a torch that has no such op."""
    return getattr(aten, name, None)


# Each rule reads the op's (args, kwargs, output) and returns its multiply-adds.
_RULES: dict[Any, Callable[[tuple, dict, Any], int]] = {
    aten.mm: lambda args, kwargs, out: matmul_macs(_shape(args[0]), _shape(args[1])),
    aten.bmm: lambda args, kwargs, out: matmul_macs(_shape(args[0]), _shape(args[1])),
    aten.addmm: lambda args, kwargs, out: matmul_macs(_shape(args[1]), _shape(args[2])),
    aten.baddbmm: lambda args, kwargs, out: matmul_macs(_shape(args[1]), _shape(args[2])),
    aten.addbmm: lambda args, kwargs, out: matmul_macs(_shape(args[1]), _shape(args[2])),
    aten.mv: lambda args, kwargs, out: matmul_macs(_shape(args[0]), (*_shape(args[1]), 1)),
    aten.addmv: lambda args, kwargs, out: matmul_macs(_shape(args[1]), (*_shape(args[2]), 1)),
    aten.convolution: _convolution,
    aten._convolution: _convolution,
}
for _name in (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
):
    if (_op := _packet(_name)) is not None:
        _RULES[_op] = _fused_attention


# -- the counter ----------------------------------------------------------------------------
class _AttentionCalls(TorchFunctionMode):
    """Counts each `F.scaled_dot_product_attention` call and marks the ops it runs."""

    def __init__(self, counter: "MacCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value = _sdpa_tensors(args, kwargs)
        self.counter.macs += attention_macs(_shape(query), _shape(key), _shape(value))
        self.counter._inside_attention += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.counter._inside_attention -= 1


def _sdpa_tensors(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    names = ("query", "key", "value")
    given = dict(zip(names, args))
    given.update({name: kwargs[name] for name in names if name in kwargs})
    return given["query"], given["key"], given["value"]


def _is_composite(func: Any) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


class _AtenOps(TorchDispatchMode):
    """Counts the matrix products, convolutions and fused attention ops that reach aten."""

    def __init__(self, counter: "MacCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        # Under `torch.inference_mode` the autograd keys are off, so composite ops (linear,
        # matmul, conv2d, einsum, ...) reach this mode whole instead of as the mm / bmm /
        # convolution they are made of: run their decomposition, whose ops come back here.
        if _is_composite(func):
            with self:  # the mode is off inside its own handler: back on for the parts
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        rule = _RULES.get(func.overloadpacket)
        if rule is not None and not self.counter._inside_attention:
            self.counter.macs += rule(args, kwargs, out)
        return out


class MacCounter:
    """Context manager: the multiply-adds of everything run inside it, in `macs`.

        with MacCounter() as counter:
            model(inputs)
        counter.macs

    Works on any device, `meta` included, and under any attention backend; see the module
    docstring for what is counted. It is meant for forward passes: a backward run inside
    it adds its matrix products but not its attention.
    """

    def __init__(self) -> None:
        self.macs = 0
        self._inside_attention = 0
        self._modes: tuple[Any, Any] | None = None

    def __enter__(self) -> "MacCounter":
        if self._modes is not None:
            raise RuntimeError("a MacCounter is already active; use a new one for a nested count")
        # The function mode goes in last, so it sees an attention call before any other
        # function mode (e.g. profile_meter.FusedAttentionOnMeta) reroutes it.
        self._modes = (_AtenOps(self), _AttentionCalls(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._modes is not None
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = None


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run `fn(*args, **kwargs)` under `no_grad` and return its output and multiply-adds."""
    with torch.no_grad(), MacCounter() as counter:
        out = fn(*args, **kwargs)
    return out, counter.macs
