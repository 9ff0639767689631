"""Per forward call, hand FastV's decoder layers a `FastVCall` for that call.

Hooks on the multimodal core and its language model do it, in order:
1. core pre-hook: note the call's `input_ids` (where the image tokens are: the language
   model itself only gets embeddings), its 2-D attention mask and the optional
   `fastv_query_index` keyword (taken out of the call);
2. language model pre-hook: decide what the call is (a prefill with image tokens, a
   decoding step on a cache FastV pruned, or neither), check it, and put a `FastVCall`
   into the language model's keyword arguments, which its decoder loop passes on to every
   layer; FastV's wrappers use it, the other layers ignore it;
3. core hook (also on errors): end the call.
The state between 1 and 3 lives on a per-thread stack only for the duration of the call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._fastv_call import CALL_KEY, PROMPT_END, QUERY_INDEX_KEY, FastVCall, kept_count, pruned_prompt_of
from ._fastv_call import set_pruned_prompt
from ._fastv_layers import FastVDecoderLayer, check_dynamic_cache

__all__ = ["FastVRouter", "SUPPORTED_ATTENTION"]

#: The attention implementations whose masks FastV indexes (4-D tensors, or None).
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class _CoreCall:
    """One call of the multimodal core, from its pre-hook to its hook."""

    input_ids: torch.Tensor | None
    attention_mask: Any
    query_index: Any


def _cache_of(kwargs: dict[str, Any]) -> Any:
    # transformers 5.24 renamed `past_key_values` to `cache`; a caller may use either.
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


class FastVRouter:
    """The hooks of one FastV graft; `enabled = False` makes them pass calls through."""

    def __init__(
        self,
        core: nn.Module,
        layers: nn.ModuleList,
        wrappers: dict[int, FastVDecoderLayer],
        first_layer: int,
        keep: int | float,
        image_token_id: int,
    ) -> None:
        self.core = core
        self.layers = layers
        self.wrappers = wrappers
        self.first_layer = first_layer
        self.keep = keep
        self.image_token_id = image_token_id
        self.enabled = True
        self._local = threading.local()  # the stack of core calls in flight, per thread

    def install(self, language_model: nn.Module) -> list[RemovableHandle]:
        core = self.core
        return [
            core.register_forward_pre_hook(self._on_core_call, with_kwargs=True),
            core.register_forward_hook(self._on_core_return, with_kwargs=True, always_call=True),
            language_model.register_forward_pre_hook(self._on_language_model_call, with_kwargs=True),
        ]

    def _calls(self) -> list[_CoreCall]:
        if not hasattr(self._local, "calls"):
            self._local.calls = []
        return self._local.calls

    # -- the hooks --------------------------------------------------------------------------
    def _on_core_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # Taken out even while lifted: the core's other modules do not know the keyword.
        query_index = kwargs.pop(QUERY_INDEX_KEY, None)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._calls().append(_CoreCall(input_ids, kwargs.get("attention_mask"), query_index))
        return args, kwargs

    def _on_core_return(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls = self._calls()
        if calls:
            calls.pop()

    def _on_language_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.enabled:
            return None
        calls = self._calls()
        if calls:
            core_call = calls[-1]
        else:  # the language model called on its own
            query_index = kwargs.pop(QUERY_INDEX_KEY, None)
            core_call = _CoreCall(kwargs.get("input_ids"), kwargs.get("attention_mask"), query_index)
        call = self._plan(core_call, kwargs)
        if call is None:
            return None
        kwargs[CALL_KEY] = call
        return args, kwargs

    # -- what the call is ---------------------------------------------------------------------
    def _plan(self, core_call: _CoreCall, kwargs: dict[str, Any]) -> FastVCall | None:
        """The call's `FastVCall`, or None where FastV leaves it alone."""
        input_ids, cache = core_call.input_ids, _cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past > 0:
            # A decoding step (one token) is never checked: that would stop the GPU at every token.
            if input_ids is not None and input_ids.shape[-1] > 1 and bool((input_ids == self.image_token_id).any()):
                raise ValueError(
                    "graft_fastv prunes image tokens when a prompt is first run (an empty cache); this call "
                    f"brings image tokens to a cache that already holds {past} tokens. Run each prompt with "
                    "its images from an empty cache"
                )
            pruned = pruned_prompt_of(cache)
            if pruned is None:
                return None
            self._check_cache(cache, pruned, past, kwargs)
            return FastVCall(pruned=pruned)

        if cache is not None:
            set_pruned_prompt(cache, None)  # an earlier prefill's, if the cache is reused
        if input_ids is None:
            raise ValueError(
                "graft_fastv finds the image tokens in input_ids, but this call passes inputs_embeds only; "
                "pass input_ids (remove() the graft to run on embeddings)"
            )
        image_mask = input_ids == self.image_token_id
        counts = image_mask.sum(dim=1).tolist()
        if max(counts, default=0) == 0:
            return None  # a prompt without images: nothing to prune
        if len(set(counts)) > 1:
            raise ValueError(
                f"graft_fastv keeps the same number of tokens in every prompt of a batch, so every prompt must "
                f"hold the same number of image tokens; this batch holds {counts}. Run them in separate batches"
            )
        keep = kept_count(self.keep, counts[0])
        if keep > counts[0]:
            raise ValueError(f"keep={self.keep!r} image tokens, but the prompts hold only {counts[0]} image tokens")
        if keep == counts[0]:
            return None  # every image token kept: the model as it is
        self._check_model(cache)
        query_index = _query_index(core_call.query_index, image_mask, core_call.attention_mask)
        return FastVCall(keep=keep, image_mask=image_mask, query_index=query_index)

    def _check_model(self, cache: Any) -> None:
        """Raise if the model has changed so that FastV's layers cannot do their part."""
        implementation = getattr(self.core.config.get_text_config(), "_attn_implementation", None) or "sdpa"
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"graft_fastv supports the {' and '.join(map(repr, SUPPORTED_ATTENTION))} attention implementations "
                f"(it indexes their masks); this model uses {implementation!r}"
            )
        check_dynamic_cache(cache, self.first_layer)
        for index, wrapper in self.wrappers.items():
            current = self.layers[index]
            if current is wrapper:
                continue
            # A graft made after FastV may wrap the layer that ranks (K-1) or the one that prunes (K):
            # both see every token. From K+1 on, a wrapper would see the pruned sequence.
            if index <= self.first_layer and _wraps(current, wrapper):
                continue
            raise ValueError(
                f"decoder layer {index + 1} is now a {type(current).__name__}, which graft_fastv did not expect: a "
                f"graft made after FastV wraps a layer after layer {self.first_layer + 1}, where the sequence is "
                "pruned. Graft it on an earlier layer, or remove it"
            )

    def _check_cache(self, cache: Any, pruned: Any, past: int, kwargs: dict[str, Any]) -> None:
        """Raise unless `cache` still holds what the prefill of `pruned` left in it."""
        embeddings = kwargs.get("inputs_embeds")
        batch = embeddings.shape[0] if isinstance(embeddings, torch.Tensor) else pruned.kept.shape[0]
        expected = past - pruned.num_dropped
        held = cache.get_seq_length(pruned.first_layer)
        if pruned.first_layer != self.first_layer or batch != pruned.kept.shape[0] or held != expected:
            raise ValueError(
                f"the cache does not hold what a FastV prefill (layer={self.first_layer}) left in it: layer "
                f"{pruned.first_layer} holds {held} tokens, expected {expected}, for {batch} rows (pruned for "
                f"{pruned.kept.shape[0]}). Was it cropped, or filled by another model?"
            )


def _wraps(module: nn.Module, target: nn.Module) -> bool:
    """Whether `target` is under `module`'s chain of wrappers."""
    while module is not target:
        module = getattr(module, "base_layer", None)
        if not isinstance(module, nn.Module):
            return False
    return True


def _query_index(given: Any, image_mask: torch.Tensor, attention_mask: Any) -> torch.Tensor:
    """(B,) each row's query token: `given` (an int or (B,) column, negative from the end), or
    the prompt's last column in `generate` (`PROMPT_END`), or the last column; it must be a
    real token and not an image token."""
    batch, length = image_mask.shape
    device = image_mask.device
    if given is None:
        given = PROMPT_END.get()
    if given is None:
        index = torch.full((batch,), length - 1, dtype=torch.long, device=device)
    elif isinstance(given, (int, torch.Tensor)) and not isinstance(given, bool):
        index = torch.as_tensor(given, device=device)
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.dim() > 1:
            raise ValueError(f"{QUERY_INDEX_KEY} must be an int or a (batch,) integer tensor, got {given!r}")
        index = index.long().expand(batch) if index.dim() == 0 else index.long()
        if index.shape != (batch,) or bool(((index < -length) | (index >= length)).any()):
            raise ValueError(f"{QUERY_INDEX_KEY} must be {batch} column(s) in -{length}..{length - 1}, got {given!r}")
        index = index % length
    else:
        raise ValueError(f"{QUERY_INDEX_KEY} must be an int or a (batch,) integer tensor, got {given!r}")
    rows = torch.arange(batch, device=device)
    if bool(image_mask[rows, index].any()):
        raise ValueError(
            f"FastV ranks image tokens by the attention of each prompt's last token, which must not be an image "
            f"token; got image tokens at {index.tolist()}. End the prompt with text, or pass {QUERY_INDEX_KEY}"
        )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == image_mask.shape:
        if bool((attention_mask.to(device)[rows, index] == 0).any()):
            raise ValueError(
                "FastV ranks image tokens by the attention of each prompt's last token, but the query column of "
                f"some row is padding ({index.tolist()}): pad batches on the left (tokenizer.padding_side='left'), "
                f"or pass {QUERY_INDEX_KEY}"
            )
    return index
