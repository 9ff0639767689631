"""The two files of a compressor graft, for every family: settings JSON and safetensors.

    folder/
      compressor_graft_config.json   what to rebuild and how it was grafted (a family's format)
      compressor_graft.safetensors   "compressor.*" (and "projector.*" for a new projector)

Each family's graft module writes its record with `write_files`; its loader reads it back
with `read_record` and the weights with `load_weights`. Only JSON and safetensors are
read: no pickle, no code from the folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from tokencompress import Grid, TokenCompressor

from ._compressor_config import compressor_config, compressor_from_config
from ._graft_io import check_format_version, read_record as read_json_record, write_record

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "compressor_fields", "write_files", "read_record", "saved_compressor",
           "load_weights"]

CONFIG_NAME = "compressor_graft_config.json"
WEIGHTS_NAME = "compressor_graft.safetensors"


def _weights_container(compressor: nn.Module, projector: nn.Module | None) -> nn.ModuleDict:
    # One file, two prefixes; the ModuleDict only references the modules, it copies nothing.
    parts = {"compressor": compressor}
    if projector is not None:
        parts["projector"] = projector
    return nn.ModuleDict(parts)


def compressor_fields(compressor: TokenCompressor, grid: Grid, dim: int) -> dict[str, Any]:
    """The record's "compressor" (its settings, checked on `grid` at width `dim`) and "compressor_class"."""
    try:
        settings: dict[str, Any] | None = compressor_config(compressor, grid, dim)
    except ValueError as error:
        # Still worth saving the weights: load_compressor_graft then needs compressor=.
        # stacklevel: this, the family's save function, the graft's save_pretrained, its caller.
        warnings.warn(f"saving the compressor's weights only: {error}", UserWarning, stacklevel=4)
        settings = None
    compressor_class = f"{type(compressor).__module__}.{type(compressor).__qualname__}"
    return {"compressor": settings, "compressor_class": compressor_class}


def write_files(graft: Any, folder: str | Path, record: dict[str, Any]) -> None:
    """Write `record` and the weights of `graft`'s compressor and new projector to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_record(folder / CONFIG_NAME, record)
    # save_model handles tensors that share memory, which safetensors' save_file refuses.
    save_model(_weights_container(graft.compressor, graft.projector), str(folder / WEIGHTS_NAME))


def read_record(folder: Path, expected_format: str, version: int, kind: str, hint: str) -> dict[str, Any]:
    """The record in `folder`, checked to be a `kind` record (format `expected_format`) at
    a version this code reads; `hint` ends the message for a record of another format."""
    path = folder / CONFIG_NAME
    record = read_json_record(path, f"no compressor graft in {folder}: {CONFIG_NAME} is missing")
    found = record.get("format") if isinstance(record, dict) else None
    if found != expected_format:
        raise ValueError(
            f"{path} is not a {kind} config (its format is {found!r}, not {expected_format!r}); {hint}"
        )
    return check_format_version(record, path, version)


def saved_compressor(
    record: dict[str, Any], folder: Path, compressor: TokenCompressor | None, projector: nn.Module | None
) -> TokenCompressor:
    """The compressor to graft (`compressor`, else rebuilt from `record`); checks that
    `projector` is given exactly when the graft was saved with a new projector."""
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
    return compressor


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def load_weights(graft: Any, folder: Path) -> None:
    """Load the saved weights into the graft just made (removed again if that fails)."""
    try:
        # strict: a missing or unexpected key is an error, never a silently random weight.
        load_model(
            _weights_container(graft.compressor, graft.projector),
            str(folder / WEIGHTS_NAME),
            strict=True,
            device=str(_device_of(graft.module.base_layer)),
        )
    except Exception:
        graft.remove()
        raise
