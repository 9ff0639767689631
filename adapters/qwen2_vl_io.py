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

import json
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

from tokencompress import TokenCompressor

from ._compressor_config import compressor_config, compressor_from_config
from ._qwen2_vl_parts import merge_size, merged_dim, qwen2_vl_core
from .compressor_graft_io import CONFIG_NAME, WEIGHTS_NAME, _device_of, _weights_container
from .qwen2_vl import MERGER_PATH, Qwen2VLCompressorGraft, graft_qwen2_vl_compressor

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
    try:
        settings: dict[str, Any] | None = compressor_config(graft.compressor, _PROBE_GRID, dim)
    except ValueError as error:
        # Still worth saving the weights: loading then needs compressor=.
        warnings.warn(f"saving the compressor's weights only: {error}", UserWarning, stacklevel=3)
        settings = None
    record = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "model_type": graft._core.config.model_type,
        "compressor": settings,
        "compressor_class": f"{type(graft.compressor).__module__}.{type(graft.compressor).__qualname__}",
        "new_projector": graft.projector is not None,
        "merge_size": graft.merge_size,
        "dim": dim,
    }
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    save_model(_weights_container(graft.compressor, graft.projector), str(folder / WEIGHTS_NAME))


def _read_record(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no compressor graft in {folder}: {CONFIG_NAME} is missing")
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise ValueError(
            f"{path} is not a Qwen2-VL compressor graft (its format is {found!r}, not {_FORMAT!r}); "
            "a LLaVA compressor graft loads onto a LLaVA model"
        )
    if record.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {record.get('format_version')!r}; this version of "
            f"tokencompress reads {_FORMAT_VERSION}"
        )
    return record


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
    if compressor is None:
        if record["compressor"] is None:
            raise ValueError(
                f"the graft in {folder} holds only the weights of a {record['compressor_class']} "
                "(its settings could not be written); pass compressor=<a new instance>"
            )
        compressor = compressor_from_config(record["compressor"])
    if record["new_projector"] and projector is None:
        raise ValueError(
            f"the graft in {folder} has a new projector; pass projector=<a module of the same "
            "architecture> to receive its weights"
        )
    if not record["new_projector"] and projector is not None:
        raise ValueError(f"the graft in {folder} has no new projector, but projector= was given")
    graft = graft_qwen2_vl_compressor(model, compressor, processor=processor, projector=projector)
    try:
        # strict: a missing or unexpected key is an error, never a silently random weight.
        load_model(
            _weights_container(graft.compressor, graft.projector),
            str(folder / WEIGHTS_NAME),
            strict=True,
            device=str(_device_of(core.get_submodule(MERGER_PATH).base_layer)),
        )
    except Exception:
        graft.remove()
        raise
    return graft
