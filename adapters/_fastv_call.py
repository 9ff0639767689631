"""What FastV needs for one forward call of the language model, and what it leaves in the cache.

A `FastVCall` is made per call of the language model (by `_fastv_hooks`) and handed to
the decoder layers as a keyword argument of that call. On a prefill the wrapped layer
K-1 ranks the image tokens and writes the kept positions into it (`select`); the
wrapped layers K.. read them to shorten their inputs. The object lives only as long as
the call's arguments, so nothing carries over to another call, and a gradient-
checkpointing re-run of a layer gets the very same arguments.

Decoding goes on from the cache, whose layers from K on hold only the kept prompt
tokens: the prefill leaves a `PrunedPrompt` on the cache object itself (it lives and dies
with that cache, and follows it through `copy.deepcopy`), and each decoding call reads
it back to drop the mask columns of the pruned tokens in layers K...

Everything is vectorised over the batch: no Python loop over samples.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "CALL_KEY",
    "QUERY_INDEX_KEY",
    "PROMPT_END",
    "FastVCall",
    "PrunedPrompt",
    "kept_count",
    "select_kept",
    "pruned_prompt_of",
    "set_pruned_prompt",
    "gather_sequence",
]

#: The keyword argument that carries a `FastVCall` from the language model to its layers.
CALL_KEY = "fastv_call"
#: The keyword argument of a model call naming each row's query token (default: the last).
QUERY_INDEX_KEY = "fastv_query_index"
#: The last prompt column of the grafted model's `generate` call now running, if any: a
#: generation without the cache re-runs prompt and answer at every step, and FastV must
#: still rank by the prompt's last token. Set only for the duration of that call.
PROMPT_END: ContextVar[int | None] = ContextVar("tokencompress_fastv_prompt_end", default=None)
#: The attribute of a cache that holds the `PrunedPrompt` of the prefill that filled it.
_CACHE_ATTRIBUTE = "_tokencompress_fastv_prompt"


@dataclass(frozen=True)
class PrunedPrompt:
    """What a FastV prefill kept of its prompt, as the cache of layers >= `first_layer` holds it.

    kept: (B, n) the kept positions of each row's prompt, increasing.
    prompt_length: L, the prompt's length (the cache of layers < `first_layer` holds it all).
    first_layer: 0-based index of the first layer that holds only the kept tokens.
    """

    kept: torch.Tensor
    prompt_length: int
    first_layer: int

    @property
    def num_dropped(self) -> int:
        return self.prompt_length - self.kept.shape[1]


def pruned_prompt_of(cache: Any) -> PrunedPrompt | None:
    """The `PrunedPrompt` a FastV prefill left on `cache`, if any."""
    return getattr(cache, _CACHE_ATTRIBUTE, None) if cache is not None else None


def set_pruned_prompt(cache: Any, prompt: PrunedPrompt | None) -> None:
    """Leave `prompt` on `cache` (None: forget what an earlier prefill left there)."""
    if prompt is not None:
        setattr(cache, _CACHE_ATTRIBUTE, prompt)
    elif hasattr(cache, _CACHE_ATTRIBUTE):
        delattr(cache, _CACHE_ATTRIBUTE)


def kept_count(keep: int | float, num_image_tokens: int) -> int:
    """How many of a prompt's `num_image_tokens` image tokens FastV keeps.

    An int `keep` is the count itself; a float is a ratio of the image tokens, rounded
    half up (`floor(keep * n + 0.5)`), and at least 1.
    """
    if isinstance(keep, float):
        return max(1, math.floor(keep * num_image_tokens + 0.5))
    return keep


def select_kept(scores: torch.Tensor, image_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The positions each row keeps: every non-image token and its `keep` best image tokens.

    Args:
        scores: (B, c) each row's image tokens' scores, in sequence order.
        image_mask: (B, L) True at image tokens (c per row).
        keep: image tokens kept per row.

    Returns:
        (B, L - c + keep) increasing positions. Equal scores: the lower position first.
    """
    batch = scores.shape[0]
    # A stable descending sort keeps equal scores in sequence order: lower positions win ties.
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    image_positions = image_mask.nonzero()[:, 1].view(batch, -1)
    kept_mask = (~image_mask).scatter(1, image_positions.gather(1, best), True)
    return kept_mask.nonzero()[:, 1].view(batch, -1)


def gather_sequence(values: torch.Tensor, index: torch.Tensor, dim: int, batch_dim: int) -> torch.Tensor:
    """`values` at the sequence positions `index` (B, n) along `dim`, row b of the batch
    (dimension `batch_dim`, of size B, or 1 to broadcast) at `index[b]`."""
    dim, batch_dim = dim % values.dim(), batch_dim % values.dim()
    batch, count = index.shape
    shape = list(values.shape)
    shape[batch_dim] = batch
    values = values.expand(shape)
    view = [1] * values.dim()
    view[batch_dim], view[dim] = batch, count
    shape[dim] = count
    # The index may come from another device than `values` (a model split across devices).
    return values.gather(dim, index.to(values.device).view(view).expand(shape))


@dataclass
class _Substitute:
    """One keyword argument of the layers, as the pruned layers get it (computed once a call)."""

    source: Any
    value: Any


@dataclass
class FastVCall:
    """One forward call of the language model, as FastV's decoder layers see it.

    A prefill (`image_mask` given): layer K-1 `select`s, layers K.. run on `pruned.kept`.
    A decoding step (`pruned` from the cache): layers K.. drop the pruned mask columns.

    Attributes:
        keep: image tokens each row keeps (prefill).
        image_mask: (B, L) True at image tokens (prefill), None when decoding.
        query_index: (B,) each row's query token (prefill).
        pruned: the kept positions: set by layer K-1 on a prefill, from the cache when decoding.
    """

    keep: int = 0
    image_mask: torch.Tensor | None = None
    query_index: torch.Tensor | None = None
    pruned: PrunedPrompt | None = None
    _substitutes: dict[str, _Substitute] = field(default_factory=dict)

    @property
    def prefill(self) -> bool:
        return self.image_mask is not None

    def select(self, scores: torch.Tensor, first_layer: int) -> None:
        """Keep each row's best `keep` image tokens by `scores` (B, c) and every other token."""
        kept = select_kept(scores, self.image_mask, self.keep)
        self.pruned = PrunedPrompt(kept, self.image_mask.shape[1], first_layer)

    def layer_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of a layer >= K: mask, positions and rotary embeddings of the
        kept tokens (prefill) or the mask without the pruned columns (decoding)."""
        kwargs = dict(kwargs)
        names = ("attention_mask", "position_embeddings", "position_ids") if self.prefill else ("attention_mask",)
        for name in names:
            if kwargs.get(name) is not None:
                kwargs[name] = self._substitute(name, kwargs[name])
        return kwargs

    def _substitute(self, name: str, source: Any) -> Any:
        # Every layer gets the same objects from the decoder loop: index them once per call.
        known = self._substitutes.get(name)
        if known is None or known.source is not source:
            known = _Substitute(source, self._index(name, source))
            self._substitutes[name] = known
        return known.value

    def _index(self, name: str, value: Any) -> Any:
        kept = self.pruned.kept
        if name == "position_embeddings":  # (cos, sin), each (..., B, L, dim)
            return tuple(gather_sequence(part, kept, dim=-2, batch_dim=-3) for part in value)
        if name == "position_ids":  # (B, L) or (sections, B, L)
            return gather_sequence(value, kept, dim=-1, batch_dim=-2)
        return self._index_mask(value)

    def _index_mask(self, mask: Any) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise ValueError(
                "FastV expected the decoder layers' attention mask as None or a 4-D tensor (the SDPA and "
                f"eager attention implementations), got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}"
            )
        kept, length = self.pruned.kept, self.pruned.prompt_length
        if self.prefill:  # the kept queries and the kept keys
            if mask.shape[-1] != length or mask.shape[-2] != length:
                raise ValueError(f"FastV expected a ({length}, {length}) prefill mask, got {tuple(mask.shape)}")
            rows = gather_sequence(mask, kept, dim=2, batch_dim=0)
            return gather_sequence(rows, kept, dim=3, batch_dim=0)
        # Decoding: the keys are the prompt's (all of them in the mask, the kept ones in the
        # cache of layers >= K), then the generated tokens, which are all kept.
        later = torch.arange(length, mask.shape[-1], device=kept.device).expand(kept.shape[0], -1)
        return gather_sequence(mask, torch.cat([kept, later], dim=1), dim=3, batch_dim=0)
