"""`Compose`: chain compressors, threading the grid and the width through them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Grid, TokenCompressor
from .registry import compressor_from_config, compressor_to_config, register_compressor

__all__ = ["Compose"]


@register_compressor("compose")
class Compose(TokenCompressor):
    """Apply compressors in order: `Compose(PixelShuffle(2), SAP(4 * 1152))`.

    Each stage sees the grid and width that the previous one produced. Keyword
    arguments of `forward` (such as `return_weights`) go to the last stage only.
    """

    def __init__(self, *compressors: TokenCompressor) -> None:
        super().__init__()
        if not compressors:
            raise ValueError("Compose needs at least one compressor, got none")
        for index, compressor in enumerate(compressors):
            if not isinstance(compressor, TokenCompressor):
                raise TypeError(
                    f"Compose argument {index} must be a TokenCompressor, got {type(compressor).__name__}"
                )
            # A selection's kept positions and attention scores refer to the input grid of
            # its own stage: a chain could not hand them on, so it would silently lose them.
            if compressor.selects_tokens or compressor.needs_attention_scores:
                raise ValueError(
                    f"Compose argument {index} is {type(compressor).__name__}, a selecting compressor; "
                    "expected grid compressors only (use a selecting compressor on its own)"
                )
        self.stages = nn.ModuleList(compressors)
        self.in_dim = compressors[0].in_dim

    @classmethod
    def for_dim(cls, dim: int) -> "Compose":
        from .pixel_shuffle import PixelShuffle
        from .sap import SAP

        return cls(PixelShuffle(2, pad=True), SAP(4 * dim, window=2))

    def get_config(self) -> dict[str, Any]:
        return {"stages": [compressor_to_config(stage) for stage in self.stages]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Compose":
        stages = config.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ValueError(f"a Compose config needs a non-empty list 'stages', got {stages!r}")
        return cls(*(compressor_from_config(stage) for stage in stages))

    def out_grid(self, grid: Grid) -> Grid:
        for stage in self.stages:
            grid = stage.out_grid(grid)
        return grid

    def out_dim(self, dim: int) -> int:
        for stage in self.stages:
            dim = stage.out_dim(dim)
        return dim

    def check_dim(self, dim: int) -> None:
        for stage in self.stages:
            stage.check_dim(dim)
            dim = stage.out_dim(dim)

    def _check_dtype(self, x: torch.Tensor) -> None:
        return  # each stage checks its own input

    def compress(self, x: torch.Tensor, grid: Grid, **kwargs: Any) -> Any:
        last = len(self.stages) - 1
        out: Any = x
        for index, stage in enumerate(self.stages):
            out = stage(x, grid, **(kwargs if index == last else {}))
            x = out[0] if isinstance(out, tuple) else out
            grid = stage.out_grid(grid)
        return out
