"""A compressor's settings as JSON for graft folders, checked when written.

The format is the registry's (`tokencompress.registry.compressor_to_config`). Writing a
graft also rebuilds the compressor from its config on the meta device and compares
parameter shapes and `out_grid`/`out_dim`, so a `get_config()` that forgets a setting
fails at save time, not when someone loads the folder.
"""

from __future__ import annotations

from typing import Any

import torch

from tokencompress import TokenCompressor
from tokencompress.base import Grid
from tokencompress.registry import compressor_from_config, compressor_to_config

__all__ = ["compressor_config", "compressor_from_config"]


def _signature(compressor: TokenCompressor, grid: Grid, dim: int) -> tuple[Any, ...]:
    shapes = {key: tuple(value.shape) for key, value in compressor.state_dict().items()}
    return shapes, compressor.out_grid(grid), compressor.out_dim(dim)


def compressor_config(compressor: TokenCompressor, grid: Grid, dim: int) -> dict[str, Any]:
    """The JSON-ready config of `compressor`, checked by rebuilding it for (`grid`, `dim`)."""
    config = compressor_to_config(compressor)
    with torch.device("meta"):  # shapes only: no memory, and the global RNG is left alone
        rebuilt = compressor_from_config(config)
    if _signature(rebuilt, grid, dim) != _signature(compressor, grid, dim):
        raise ValueError(
            f"the config {config} of {type(compressor).__qualname__} rebuilds a different "
            "compressor; its get_config() must return every __init__ argument"
        )
    return config
