"""The decoder-layer wrapper of the FastV graft; it keeps the layer it wraps as `base_layer`.

FastV wraps layers K-1 .. N-1 (0-based) of the language model, each with a role:

- "score" (layer K-1): on a prefill, ranks the image tokens from this layer's input
  (`image_token_scores`) and writes the kept positions into the call; runs the layer on
  every token;
- "prune" (layer K): on a prefill, keeps only those positions of its input hidden
  states, and leaves them on the cache for the decoding steps; then as "follow";
- "follow" (layers K..): runs the layer with the mask, positions and rotary embeddings
  of the kept tokens (prefill), or with the mask columns of the pruned prompt tokens
  dropped (decoding: the cache of these layers holds only the kept tokens).

Without a `fastv_call` in its keyword arguments (prompts without image tokens, or a
graft lifted out) a wrapper is its `base_layer`. The wrapper is not checkpointed: the
wrapped layer checkpoints itself as before, with the shortened inputs.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from tokencompress.hf_compat import CACHE_ARGUMENT

from ._fastv_call import CALL_KEY, FastVCall, gather_sequence, set_pruned_prompt
from ._fastv_scores import image_token_scores
from ._wrap import BaseLayerWrapper

__all__ = ["FastVDecoderLayer", "Role", "check_dynamic_cache"]

Role = Literal["score", "prune", "follow"]


def check_dynamic_cache(cache: Any, first_layer: int) -> None:
    """Raise ValueError unless `cache` can hold fewer tokens from layer `first_layer` on."""
    if cache is None:
        return
    if not isinstance(cache, DynamicCache) or any(layer.is_compileable for layer in cache.layers):
        raise ValueError(
            f"graft_fastv needs a DynamicCache (layers from K on cache fewer tokens than the layers before), "
            f"got {type(cache).__name__}; do not ask generate for a static or quantized cache"
        )
    sliding = [type(layer).__name__ for layer in cache.layers[first_layer:] if getattr(layer, "is_sliding", False)]
    if sliding:
        raise ValueError(f"graft_fastv does not support sliding-window cache layers ({sliding[0]})")


class FastVDecoderLayer(BaseLayerWrapper):
    """A decoder layer as FastV runs it (see the module docstring for the roles).

    Attributes:
        role: "score", "prune" or "follow".
        first_layer: 0-based index of the first layer that sees only the kept tokens (K).
    """

    def __init__(self, base_layer: nn.Module, role: Role, first_layer: int) -> None:
        super().__init__(base_layer)
        self.role = role
        self.first_layer = first_layer

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        call: FastVCall | None = kwargs.pop(CALL_KEY, None)
        if call is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        if args:
            # transformers' decoder loops pass everything but the hidden states by name.
            raise TypeError(
                f"FastV's decoder layers take their arguments after hidden_states by keyword; got {len(args)} "
                "positional ones"
            )
        if self.role == "score":
            if call.prefill and call.pruned is None:
                scores = image_token_scores(
                    self.base_layer,
                    hidden_states,
                    kwargs.get("attention_mask"),
                    kwargs["position_embeddings"],
                    call.query_index,
                    call.image_mask,
                )
                call.select(scores, self.first_layer)
            return self.base_layer(hidden_states, **kwargs)
        if call.pruned is None:
            raise RuntimeError(
                f"FastV's layer {self.first_layer} found no image token ranking in this call: was the layer "
                "before it replaced after grafting?"
            )
        if self.role == "prune" and call.prefill:
            hidden_states = gather_sequence(hidden_states, call.pruned.kept, dim=1, batch_dim=0)
            cache = kwargs.get(CACHE_ARGUMENT)
            if cache is not None:
                check_dynamic_cache(cache, self.first_layer)
                set_pruned_prompt(cache, call.pruned)
        return self.base_layer(hidden_states, **call.layer_kwargs(kwargs))

    def extra_repr(self) -> str:
        return f"role={self.role!r}, first_layer={self.first_layer}"
