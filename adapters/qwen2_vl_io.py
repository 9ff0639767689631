"""A Qwen2-VL compressor graft on disk, in the files a LLaVA compressor graft uses.

    folder/
      compressor_graft_config.json   format "tokencompress.qwen2_vl_compressor_graft"
      compressor_graft.safetensors   "compressor.*" (and "projector.*" for a new projector)
      config.json, model.safetensors, processor files ...   (optional: the ungrafted model)

`Qwen2VLCompressorGraft.save_pretrained(folder)` writes the two graft files;
`load_compressor_graft(model, folder, processor=...)` (which calls
`load_qwen2_vl_compressor_graft` for these models) grafts them back. The compressor has
no fixed grid here (every image has its own), so its settings are checked on a probe
grid when written. Only JSON and safetensors are read: no pickle, no code from the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tokencompress import TokenCompressor

from ._graft_io import check_format_version, read_record
from ._qwen2_vl_parts import merge_size, merged_dim, qwen2_vl_core
from .compressor_graft_io import CONFIG_NAME, _compressor_fields, _load_weights, _saved_compressor, _write_files
from .qwen2_vl import Qwen2VLCompressorGraft, graft_qwen2_vl_compressor

__all__ = ["save_qwen2_vl_compressor_graft", "load_qwen2_vl_compressor_graft"]

_FORMAT = "tokencompress.qwen2_vl_compressor_graft"
_FORMAT_VERSION = 1
#: A merged grid every shipped compressor accepts (12 is divisible by 2, 3, 4 and 6).
_PROBE_GRID = (12, 12)


def save_qwen2_vl_compressor_graft(graft: Qwen2VLCompressorGraft, folder: str | Path) -> None:
    """Write `graft`'s settings and weights to `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dim = graft.module.dim
    record = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "model_type": graft._core.config.model_type,
        **_compressor_fields(graft.compressor, _PROBE_GRID, dim),
        "new_projector": graft.projector is not None,
        "merge_size": graft.merge_size,
        "dim": dim,
    }
    _write_files(graft, folder, record)


def _read_record(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    record = read_record(path, f"no compressor graft in {folder}: {CONFIG_NAME} is missing")
    found = record.get("format") if isinstance(record, dict) else None
    if found != _FORMAT:
        raise ValueError(
            f"{path} is not a Qwen2-VL compressor graft (its format is {found!r}, not {_FORMAT!r}); "
            "a LLaVA compressor graft loads onto a LLaVA model"
        )
    return check_format_version(record, path, _FORMAT_VERSION)


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
    folder = Path(folder)
    record = _read_record(folder)
    core = qwen2_vl_core(model, "load_compressor_graft")
    here = (merge_size(core), merged_dim(core))
    if (record["merge_size"], record["dim"]) != here:
        raise ValueError(
            f"the graft in {folder} was made for merge size {record['merge_size']} and width {record['dim']}; "
            f"this model has {here[0]} and {here[1]}"
        )
    compressor = _saved_compressor(record, folder, compressor, projector)
    graft = graft_qwen2_vl_compressor(model, compressor, processor=processor, projector=projector)
    _load_weights(graft, folder)
    return graft
