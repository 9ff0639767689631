"""An EmbQ graft on disk: settings as JSON, weights as safetensors, beside the model.

    folder/
      embq_graft_config.json     layer, query tokens and ids, "." id, EmbQ's sizes
      embq_graft.safetensors     "embq.*" (EmbQ's weights) and "query_vectors"
      config.json, model.safetensors, tokenizer files ...   (optional: the ungrafted model)

`EmbQGraft.save_pretrained(folder)` writes the two graft files; `load_embq_graft(model,
folder, tokenizer=...)` grafts them onto a model, typically one just loaded from the same
folder with `from_pretrained` (its vocabulary already covers the query tokens). Only JSON
and safetensors are read: no pickle, no code from the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from tokencompress import EmbQ

from ._embq_files import EMBQ_CONFIG_NAME, EMBQ_SIZES, EMBQ_WEIGHTS_NAME, read_record
from .embq import EmbQGraft
from .families import embq_family_of

__all__ = ["EMBQ_CONFIG_NAME", "EMBQ_WEIGHTS_NAME", "load_embq_graft"]


def load_embq_graft(
    model: nn.Module, folder: str | Path, *, tokenizer: Any, embq: nn.Module | None = None
) -> EmbQGraft:
    """Graft the EmbQ saved in `folder` onto `model`, with its weights.

    `tokenizer` should be the one saved with the graft (it holds the query tokens with the
    saved ids); a tokenizer that gives them other ids is an error. `embq` is needed only
    for a module class other than `tokencompress.EmbQ` (its weights are loaded into it).
    """
    folder = Path(folder)
    graft_embq = embq_family_of(model, "load_embq_graft").graft_embq
    record = read_record(folder)
    if embq is None:
        if record["embq"] is None:
            raise ValueError(
                f"the graft in {folder} holds a {record['embq_class']}, which only the caller can "
                "rebuild; pass embq=<a new instance>"
            )
        embq = EmbQ(**{name: int(record["embq"][name]) for name in EMBQ_SIZES})
    graft = graft_embq(
        model,
        embq,
        layer=int(record["layer"]),
        tokenizer=tokenizer,
        num_queries=int(record["num_queries"]),
        query_tokens=record["query_tokens"],
        dot_token_id=int(record["dot_token_id"]),
    )
    try:
        if list(graft.token_ids) != list(record["query_token_ids"]):
            raise ValueError(
                f"the tokenizer gives the query tokens the ids {list(graft.token_ids)}, but the graft "
                f"was saved with {record['query_token_ids']}; load the tokenizer saved with the graft"
            )
        tensors = load_file(str(folder / EMBQ_WEIGHTS_NAME), device=str(graft.query_vectors.device))
        vectors = tensors.pop("query_vectors", None)
        if vectors is None or vectors.shape != graft.query_vectors.shape:
            raise ValueError(
                f"{EMBQ_WEIGHTS_NAME} has no query_vectors of shape {tuple(graft.query_vectors.shape)}"
            )
        strays = [name for name in tensors if not name.startswith("embq.")]
        if strays:
            raise ValueError(f"{EMBQ_WEIGHTS_NAME} holds keys other than embq.* and query_vectors: {strays}")
        state = {name.removeprefix("embq."): value for name, value in tensors.items()}
        # strict: a missing or unexpected key is an error, never a silently random weight.
        graft.embq.load_state_dict(state, strict=True)
        with torch.no_grad():
            graft.query_vectors.copy_(vectors)
    except Exception:
        graft.remove()
        raise
    return graft
