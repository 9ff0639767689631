"""Loading a Qwen2-VL compressor graft, from the files a LLaVA compressor graft uses.

    folder/
      compressor_graft_config.json   format "tokencompress.qwen2_vl_compressor_graft"
      compressor_graft.safetensors   "compressor.*" (and "projector.*" for a new projector)
      config.json, model.safetensors, processor files ...   (optional: the ungrafted model)

`Qwen2VLCompressorGraft.save_pretrained(folder)` writes the two graft files;
`load_compressor_graft(model, folder, processor=...)` (which calls
`load_qwen2_vl_compressor_graft` for these models) grafts them back. Only JSON and
safetensors are read: no pickle, no code from the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from tokencompress import TokenCompressor

from ._compressor_files import load_weights, read_record, saved_compressor
from ._qwen2_vl_parts import merge_size, merged_dim, qwen2_vl_core
from .qwen2_vl import RECORD_VERSION, Qwen2VLCompressorGraft, graft_merger_compressor

__all__ = ["load_qwen2_vl_compressor_graft", "load_merger_compressor_graft"]

_MergerGraft = TypeVar("_MergerGraft", bound=Qwen2VLCompressorGraft)


def load_qwen2_vl_compressor_graft(
    model: nn.Module,
    folder: str | Path,
    *,
    processor: Any | None = None,
    compressor: TokenCompressor | None = None,
    projector: nn.Module | None = None,
) -> Qwen2VLCompressorGraft:
    """Graft the compressor saved in `folder` onto a Qwen2-VL / Qwen2.5-VL `model`, with its weights.

    As `load_compressor_graft`: the compressor is rebuilt from the saved settings unless
    `compressor` is given; a graft saved with a new projector needs `projector=`, a module
    of the same architecture, which receives the saved weights.
    """
    return load_merger_compressor_graft(
        Qwen2VLCompressorGraft, qwen2_vl_core(model, "load_compressor_graft"), model, folder,
        processor=processor, compressor=compressor, projector=projector,
    )


def load_merger_compressor_graft(
    graft_class: type[_MergerGraft],
    core: nn.Module,
    model: nn.Module,
    folder: str | Path,
    *,
    processor: Any | None,
    compressor: TokenCompressor | None,
    projector: nn.Module | None,
) -> _MergerGraft:
    """`load_qwen2_vl_compressor_graft` for a family grafted by `graft_merger_compressor`
    with the handle `graft_class` (whose `record_format` the folder must hold)."""
    folder = Path(folder)
    record = read_record(folder, graft_class.record_format, RECORD_VERSION,
                         f"{graft_class.family_name} compressor graft",
                         "a compressor graft loads onto a model of the family it was saved from")
    here = (merge_size(core), merged_dim(core))
    if (record["merge_size"], record["dim"]) != here:
        raise ValueError(
            f"the graft in {folder} was made for merge size {record['merge_size']} and width {record['dim']}; "
            f"this model has {here[0]} and {here[1]}"
        )
    compressor = saved_compressor(record, folder, compressor, projector)
    graft = graft_merger_compressor(
        graft_class, core, model, compressor, processor=processor, projector=projector, placement="auto"
    )
    load_weights(graft, folder)
    return graft
