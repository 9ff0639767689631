"""A LLaVA compressor graft on disk: settings as JSON, weights as safetensors, beside the model.

    folder/
      compressor_graft_config.json   what to rebuild and how it was grafted
      compressor_graft.safetensors   "compressor.*" (and "projector.*" for a new projector)
      config.json, model.safetensors, processor files ...   (optional: the ungrafted model)

`CompressorGraft.save_pretrained(folder)` writes the two graft files;
`load_compressor_graft(model, folder, processor=...)` (which calls
`load_llava_compressor_graft` for LLaVA models) grafts them onto a model, typically one
just loaded from the same folder with `from_pretrained`. Only JSON and safetensors are
read: no pickle, no code from the folder.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import LlavaProcessor

from tokencompress import TokenCompressor

from ._compressor_files import CONFIG_NAME, WEIGHTS_NAME, load_weights, read_record, saved_compressor
from ._llava_parts import llava_core
from .compressor_graft import RECORD_FORMAT, RECORD_VERSION, CompressorGraft, check_projector_graft_record
from .compressor_graft import graft_llava_compressor

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_llava_compressor_graft"]


def load_llava_compressor_graft(
    model: nn.Module,
    folder: str | Path,
    *,
    processor: LlavaProcessor | None = None,
    compressor: TokenCompressor | None = None,
    projector: nn.Module | None = None,
) -> CompressorGraft:
    """`load_compressor_graft` for LLaVA: graft the compressor saved in `folder` onto
    `model` (and `processor`), with its weights.

    The compressor is rebuilt from the saved settings, unless `compressor` is given (needed
    when it was saved without settings, e.g. an unregistered class). A graft saved with a
    new projector needs `projector=`, a module of the same architecture; its weights are
    loaded from the folder.
    """
    folder = Path(folder)
    record = read_record(folder, RECORD_FORMAT, RECORD_VERSION, "compressor graft",
                         "a LLaVA model loads a LLaVA compressor graft")
    check_projector_graft_record(record, folder, llava_core(model, "load_compressor_graft").config)
    compressor = saved_compressor(record, folder, compressor, projector)
    graft = graft_llava_compressor(
        model, compressor, processor=processor, placement=record["placement"], projector=projector
    )
    load_weights(graft, folder)
    return graft
