"""Grafts of tokencompress compressors and EmbQ onto Hugging Face models.

The supported model families are the rows of `families.FAMILIES`; `graft_compressor`,
`graft_embq` and the loaders find the model's row and call its family's graft.

The names below load on first use (as transformers' own package does), so importing one
module of the package imports only what that module needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs: the names, from where they are defined
    from .grafting import graft_compressor, graft_embq, load_compressor_graft  # noqa: F401
    from .embq_io import load_embq_graft  # noqa: F401
    from .families import FAMILIES, Family, supported_model_types  # noqa: F401
    from .prompt import EncodedPrompt, QueryBlock, build_prompt, chat_template, pad_prompts, vicuna_v1  # noqa: F401
    from .grafts_io import load_grafted, save_grafted  # noqa: F401
    from .compressor_graft import CompressedProjector, CompressorGraft, graft_llava_compressor  # noqa: F401
    from .embq import EmbQGraft, graft_llava_embq  # noqa: F401
    from .qwen2_vl import Qwen2VLCompressorGraft, graft_qwen2_vl_compressor  # noqa: F401
    from .qwen2_vl_embq import Qwen2VLEmbQGraft, graft_qwen2_vl_embq  # noqa: F401
    from .llava_next import LlavaNextCompressorGraft, graft_llava_next_compressor  # noqa: F401
    from .fastv import FastVGraft, graft_fastv  # noqa: F401

#: Public name -> the module of this package that defines it.
_EXPORTS: dict[str, str] = {
    # the entry points, for every family
    "graft_compressor": "grafting",
    "graft_embq": "grafting",
    "load_compressor_graft": "grafting",
    "load_embq_graft": "embq_io",
    # the family table
    "FAMILIES": "families",
    "Family": "families",
    "supported_model_types": "families",
    # prompts with FlashSloth's query blocks
    "EncodedPrompt": "prompt",
    "QueryBlock": "prompt",
    "build_prompt": "prompt",
    "chat_template": "prompt",
    "pad_prompts": "prompt",
    "vicuna_v1": "prompt",
    # several grafts on one model, saved and loaded together
    "load_grafted": "grafts_io",
    "save_grafted": "grafts_io",
    # the families' graft handles and their own entry points
    "CompressedProjector": "compressor_graft",
    "CompressorGraft": "compressor_graft",
    "graft_llava_compressor": "compressor_graft",
    "EmbQGraft": "embq",
    "graft_llava_embq": "embq",
    "Qwen2VLCompressorGraft": "qwen2_vl",
    "graft_qwen2_vl_compressor": "qwen2_vl",
    "Qwen2VLEmbQGraft": "qwen2_vl_embq",
    "graft_qwen2_vl_embq": "qwen2_vl_embq",
    "LlavaNextCompressorGraft": "llava_next",
    "graft_llava_next_compressor": "llava_next",
    # FastV: image tokens pruned inside the LLM, for every family whose layers it can follow
    "FastVGraft": "fastv",
    "graft_fastv": "fastv",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # found once; later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
