"""The two wrappers of the EmbQ graft; each keeps the module it wraps as `base_layer`.

`QueryEmbedding` wraps the LLM's input embedding: a query token's embedding is its own
learnable vector plus the current word embedding of ".". `EmbQDecoderLayer` wraps one
decoder layer: it adds EmbQ's update to the query tokens' hidden states, then runs the
layer. Both fall back to the wrapped module for attributes they do not have (as peft's
wrappers do), so code that reads `layer.self_attn` or `embed_tokens.weight` still works.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokencompress._autocast import autocast_active

from ._embq_call import EmbQCall
from ._wrap import BaseLayerWrapper

__all__ = ["QueryEmbedding", "EmbQDecoderLayer", "CALL_KEY"]

#: The keyword argument that carries an `EmbQCall` from the language model to the layer.
CALL_KEY = "embq_call"


class QueryEmbedding(BaseLayerWrapper):
    """`base_layer(ids)`, except that query token i embeds as `query_vectors[i] + E["."]`.

    The vectors are a parameter of their own, so the "." embedding they add to is the
    LLM's embedding as it trains (FlashSloth's "dot init" keeps that dependence). With
    zero vectors, as grafted, every query token starts as the "." token.
    """

    def __init__(self, base_layer: nn.Module, query_token_ids: list[int], dot_token_id: int) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        self.dot_token_id = int(dot_token_id)
        # Not persistent: the ids belong to the graft's JSON config, not to the weights.
        ids = torch.tensor(query_token_ids, dtype=torch.long, device=weight.device)
        self.register_buffer("query_token_ids", ids, persistent=False)
        self.query_vectors = nn.Parameter(
            torch.zeros(len(query_token_ids), weight.shape[1], dtype=weight.dtype, device=weight.device)
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_query = torch.isin(input_ids, self.query_token_ids)
        embeddings = self.base_layer(torch.where(is_query, self.dot_token_id, input_ids))
        slot = (input_ids.unsqueeze(-1) == self.query_token_ids).int().argmax(dim=-1)
        vectors = self.query_vectors.to(embeddings.dtype)[slot]
        return torch.where(is_query.unsqueeze(-1), embeddings + vectors, embeddings)

    def extra_repr(self) -> str:
        return f"num_queries={self.query_vectors.shape[0]}, dot_token_id={self.dot_token_id}"


class EmbQDecoderLayer(BaseLayerWrapper):
    """Adds EmbQ's update to the query tokens' hidden states, then runs `base_layer`.

    The update comes from the `embq_call` keyword argument (an `EmbQCall`) that the
    graft puts into this forward call; without it (decoding steps, prompts without query
    blocks) the layer is `base_layer` itself. The wrapper is not checkpointed: the
    wrapped layer checkpoints itself as before, and EmbQ runs once per forward.
    """

    def __init__(self, base_layer: nn.Module, embq: nn.Module) -> None:
        super().__init__(base_layer)
        self.embq = embq

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        call: EmbQCall | None = kwargs.pop(CALL_KEY, None)
        if call is not None:
            hidden_states = self.add_update(hidden_states, call)
        return self.base_layer(hidden_states, *args, **kwargs)

    def add_update(self, hidden_states: torch.Tensor, call: EmbQCall) -> torch.Tensor:
        """`hidden_states` with EmbQ's update added at the query positions (out of place)."""
        plan = call.plan
        queries = hidden_states[plan.query_rows, plan.query_positions].flatten(0, 1)  # (S * n, D)
        text = hidden_states[plan.text_rows, plan.text_positions]
        dtype = _compute_dtype(self.embq, hidden_states)
        num_queries = plan.query_rows.shape[1]
        cu_queries = torch.arange(plan.num_blocks + 1, device=queries.device) * num_queries
        update = self.embq.forward_packed(
            queries.to(dtype),
            text.to(dtype),
            call.vision.to(device=queries.device, dtype=dtype),
            cu_queries,
            plan.cu_seqlens_text,
            call.cu_seqlens_vision,
            vision_index=plan.query_rows[:, 0],
        )
        indices = (plan.query_rows.flatten(), plan.query_positions.flatten())
        return hidden_states.index_put(indices, queries + update.to(hidden_states.dtype))


def _compute_dtype(module: nn.Module, like: torch.Tensor) -> torch.dtype:
    """EmbQ's parameter dtype (it checks its inputs against it); under autocast, `like`'s."""
    parameter = next(module.parameters(), None)
    if parameter is None or autocast_active(like.device.type):
        return like.dtype
    return parameter.dtype
