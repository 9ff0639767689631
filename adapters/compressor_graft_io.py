"""A compressor graft on disk: settings as JSON, weights as safetensors, beside the model.

    folder/
      compressor_graft_config.json   what to rebuild and how it was grafted
      compressor_graft.safetensors   "compressor.*" (and "projector.*" for a new projector)
      config.json, model.safetensors, processor files ...   (optional: the ungrafted model)

`CompressorGraft.save_pretrained(folder)` writes the two graft files;
`load_compressor_graft(model, folder, processor=...)` grafts them onto a model, typically
one just loaded from the same folder with `from_pretrained`. Only JSON and safetensors are
read: no pickle, no code from the folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import LlavaProcessor

from tokencompress import Grid, TokenCompressor

from ._compressor_config import compressor_config, compressor_from_config
from ._graft_io import check_format_version, read_record, write_record
from .compressor_graft import CompressorGraft, _llava_parts, _projector_widths, _vision_grid, graft_compressor

if TYPE_CHECKING:
    from .qwen2_vl import Qwen2VLCompressorGraft

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_compressor_graft", "load_compressor_graft"]

CONFIG_NAME = "compressor_graft_config.json"
WEIGHTS_NAME = "compressor_graft.safetensors"
_FORMAT = "tokencompress.compressor_graft"
_FORMAT_VERSION = 1


def _weights_container(compressor: nn.Module, projector: nn.Module | None) -> nn.ModuleDict:
    # One file, two prefixes; the ModuleDict only references the modules, it copies nothing.
    parts = {"compressor": compressor}
    if projector is not None:
        parts["projector"] = projector
    return nn.ModuleDict(parts)


def _compressor_fields(compressor: TokenCompressor, grid: Grid, dim: int) -> dict[str, Any]:
    """The record's "compressor" (its settings, checked on `grid` at width `dim`) and "compressor_class"."""
    try:
        settings: dict[str, Any] | None = compressor_config(compressor, grid, dim)
    except ValueError as error:
        # Still worth saving the weights: load_compressor_graft then needs compressor=.
        # stacklevel: this, save_*_compressor_graft, the graft's save_pretrained, its caller.
        warnings.warn(f"saving the compressor's weights only: {error}", UserWarning, stacklevel=4)
        settings = None
    compressor_class = f"{type(compressor).__module__}.{type(compressor).__qualname__}"
    return {"compressor": settings, "compressor_class": compressor_class}


def _write_files(graft: CompressorGraft | Qwen2VLCompressorGraft, folder: Path, record: dict[str, Any]) -> None:
    """Write `record` and the weights of `graft`'s compressor and new projector to `folder`."""
    write_record(folder / CONFIG_NAME, record)
    # save_model handles tensors that share memory, which safetensors' save_file refuses.
    save_model(_weights_container(graft.compressor, graft.projector), str(folder / WEIGHTS_NAME))


def save_compressor_graft(graft: CompressorGraft, folder: str | Path) -> None:
    """Write `graft`'s settings and weights to `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vision_dim, text_dim = _projector_widths(graft._config)
    record = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        **_compressor_fields(graft.compressor, graft.grid, vision_dim),
        "placement": graft.placement,
        "new_projector": graft.projector is not None,
        "grid": list(graft.grid),
        "vision_dim": vision_dim,
        "text_dim": text_dim,
        "num_image_tokens": graft.num_image_tokens,
    }
    _write_files(graft, folder, record)


def _read_record(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    record = read_record(path, f"no compressor graft in {folder}: {CONFIG_NAME} is missing")
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a compressor graft config (no 'format': {_FORMAT!r})")
    return check_format_version(record, path, _FORMAT_VERSION)


def _saved_compressor(
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


def _load_weights(graft: CompressorGraft | Qwen2VLCompressorGraft, folder: Path) -> None:
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


def load_compressor_graft(
    model: nn.Module,
    folder: str | Path,
    *,
    processor: LlavaProcessor | None = None,
    compressor: TokenCompressor | None = None,
    projector: nn.Module | None = None,
) -> CompressorGraft:
    """Graft the compressor saved in `folder` onto `model` (and `processor`), with its weights.

    The compressor is rebuilt from the saved settings, unless `compressor` is given (needed
    when it was saved without settings, e.g. an unregistered class). A graft saved with a
    new projector needs `projector=`, a module of the same architecture; its weights are
    loaded from the folder. Qwen2-VL / Qwen2.5-VL models: `load_qwen2_vl_compressor_graft`.
    """
    from ._qwen2_vl_parts import is_qwen2_vl

    if is_qwen2_vl(model):
        from .qwen2_vl_io import load_qwen2_vl_compressor_graft  # imported here: qwen2_vl_io imports this module

        return load_qwen2_vl_compressor_graft(
            model, folder, processor=processor, compressor=compressor, projector=projector
        )
    folder = Path(folder)
    record = _read_record(folder)
    llava, _ = _llava_parts(model)
    grid, (vision_dim, text_dim) = _vision_grid(llava.config), _projector_widths(llava.config)
    saved = (tuple(record["grid"]), record["vision_dim"], record["text_dim"])
    if saved != (grid, vision_dim, text_dim):
        raise ValueError(
            f"the graft in {folder} was made for vision grid {saved[0]}, vision width {saved[1]} "
            f"and text width {saved[2]}; this model has {grid}, {vision_dim} and {text_dim}"
        )
    compressor = _saved_compressor(record, folder, compressor, projector)
    graft = graft_compressor(
        model, compressor, processor=processor, placement=record["placement"], projector=projector
    )
    _load_weights(graft, folder)
    return graft
