"""Which attention backend runs: the registry, the forcing switches and automatic choice.

A backend is chosen per call, in this order of authority:

1. the call's `backend=` argument (None or "auto": no opinion, ask the next level);
2. the innermost `use_backend(name)` block, per thread / asyncio task; inside
   `use_backend("auto")` the choice is automatic whatever the levels below say;
3. `set_backend(name)`, a process-wide default (None or "auto" clears it);
4. the environment variable `TOKENCOMPRESS_ATTENTION`, read at call time (unset, empty
   or "auto": automatic);
5. otherwise automatic: the first of `PREFERENCE` that can run the inputs.

A backend that was *asked for* but cannot run the inputs raises
`BackendUnavailableError` naming the reason; automatic choice skips it silently (with a
debug log line).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import cuda_backends, torch_backends

__all__ = [
    "ENV_VAR",
    "PREFERENCE",
    "Backend",
    "BACKENDS",
    "BackendUnavailableError",
    "use_backend",
    "set_backend",
    "get_backend",
    "resolve_backend",
    "available_backends",
]

logger = logging.getLogger(__name__)

#: environment variable that forces a backend ("flash", "xformers", "sdpa", "reference", "auto")
ENV_VAR = "TOKENCOMPRESS_ATTENTION"

#: automatic choice takes the first of these that can run the inputs
PREFERENCE: tuple[str, ...] = ("flash", "xformers", "sdpa", "reference")

_AUTO = "auto"

# (q, k, v, key_padding_mask or None, scale) -> out
PaddedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], float], torch.Tensor]
# (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale) -> out
VarlenFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, float], torch.Tensor
]


class BackendUnavailableError(RuntimeError):
    """An attention backend was asked for explicitly but cannot run these inputs here."""


@dataclass(frozen=True)
class Backend:
    """One attention implementation.

    `unsupported_reason(q, k, v)` returns None when the backend can run these inputs,
    else a short human-readable reason. `padded` never sees a sample whose keys are all
    masked (the dispatcher handles those). `varlen` is optional: without it, packed
    inputs are padded (vectorized), run through `padded` and unpadded.
    """

    name: str
    unsupported_reason: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Optional[str]]
    padded: PaddedFn
    varlen: Optional[VarlenFn] = None


#: name -> backend; looked up at call time, so tests may swap an entry (monkeypatch)
BACKENDS: dict[str, Backend] = {
    "flash": Backend(
        name="flash",
        unsupported_reason=cuda_backends.flash_unsupported_reason,
        padded=cuda_backends.flash_attention,
        varlen=cuda_backends.flash_varlen_attention,
    ),
    "xformers": Backend(
        name="xformers",
        unsupported_reason=cuda_backends.xformers_unsupported_reason,
        padded=cuda_backends.xformers_attention,
    ),
    "sdpa": Backend(
        name="sdpa",
        unsupported_reason=torch_backends.always_supported,
        padded=torch_backends.sdpa_attention,
    ),
    "reference": Backend(
        name="reference",
        unsupported_reason=torch_backends.always_supported,
        padded=torch_backends.reference_attention,
    ),
}

_context_choice: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "tokencompress_attention_backend", default=None
)
_global_choice: Optional[str] = None


def _normalize(name: Optional[str], source: str) -> Optional[str]:
    """`name` checked against the known backends; None for "no opinion"."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise ValueError(f"{source} must be a backend name (str) or None, got {name!r}")
    key = name.strip().lower()
    if key in ("", _AUTO):
        return None
    if key not in BACKENDS:
        known = ", ".join(repr(n) for n in (*PREFERENCE, _AUTO))
        raise ValueError(f"{source}={name!r} is not an attention backend; expected one of {known}")
    return key


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force attention backend `name` inside a `with` block ("auto"/None: automatic)."""
    token = _context_choice.set(_normalize(name, "use_backend(name)") or _AUTO)
    try:
        yield
    finally:
        _context_choice.reset(token)


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend; "auto" or None restores automatic choice."""
    global _global_choice
    _global_choice = _normalize(name, "set_backend(name)")


def _forced_choice() -> tuple[Optional[str], str]:
    """The backend forced by levels 2-4 and the level that forced it; None: automatic."""
    context = _context_choice.get()
    if context is not None:
        return (None if context == _AUTO else context), "use_backend"
    if _global_choice is not None:
        return _global_choice, "set_backend"
    return _normalize(os.environ.get(ENV_VAR), ENV_VAR), ENV_VAR


def get_backend() -> Optional[str]:
    """The backend forced by `use_backend`/`set_backend`/the environment, or None (automatic)."""
    return _forced_choice()[0]


def resolve_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None
) -> str:
    """The name of the backend that will run attention on `q`, `k`, `v`.

    Raises `BackendUnavailableError` if a forced backend cannot run them.
    """
    forced, origin = _normalize(backend, "backend"), "backend="
    if forced is None:
        forced, origin = _forced_choice()
    if forced is not None:
        reason = BACKENDS[forced].unsupported_reason(q, k, v)
        if reason is not None:
            raise BackendUnavailableError(
                f"attention backend {forced!r} was requested (via {origin}) but cannot run "
                f"these inputs: {reason}"
            )
        return forced
    for name in PREFERENCE:
        reason = BACKENDS[name].unsupported_reason(q, k, v)
        if reason is None:
            return name
        logger.debug("attention backend %r skipped: %s", name, reason)
    raise AssertionError("the reference backend runs everywhere")  # pragma: no cover


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run 64-wide heads of `dtype` on `device`, in order of preference."""
    probe = torch.empty(1, 1, 1, 64, device=device, dtype=dtype)
    return [name for name in PREFERENCE if BACKENDS[name].unsupported_reason(probe, probe, probe) is None]
