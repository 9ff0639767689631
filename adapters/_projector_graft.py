"""A compressor graft around a LLaVA-style projector, for the families that have one.

LLaVA-NeXT, LLaVA-OneVision and InternVL hand each view's (tile's) vision features, on one
grid, to a `multi_modal_projector`; their compressor grafts wrap it with
`CompressedProjector` (the compressor runs on each view, then the model's projector or a
new one) and differ only in what else follows the compressed grid: the layout of the
tiles, the processor's counts. `ProjectorCompressorGraft` is their handle;
a family subclasses it with its sizes, its checks and its overrides (`_install`), and
grafts and loads through `graft_projector_compressor` / `load_projector_compressor_graft`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from tokencompress.base import Grid, TokenCompressor

from ._compressor_files import load_weights, read_record, saved_compressor, write_files
from ._compressor_handle import WrappingCompressorGraft
from ._llava_parts import PROJECTOR_PATH, projector_widths, vision_grid
from ._selecting import refuse_selection
from ._wrap import WrappedSubmodule, match_wrapped
from .compressor_graft import CompressedProjector, Placement, check_projector_graft_record, projector_graft_record
from .compressor_graft import resolve_placement

__all__ = ["ProjectorCompressorGraft", "graft_projector_compressor", "load_projector_compressor_graft"]


class ProjectorCompressorGraft(WrappingCompressorGraft):
    """A compressor graft around `multi_modal_projector`; a family's subclass sets the class
    attributes and `_install`s what follows the compressed grid.

    Attributes:
        model: the grafted model.
        processor: the processor whose placeholder counts follow the graft, if given.
        module: the `CompressedProjector` in place of `multi_modal_projector`.
        grid, out_grid: a view's grid before and after the compressor.
    """

    #: The family's name, in messages, and its record format (`_compressor_files`).
    family = "LLaVA-style"
    record_format = ""
    record_version = 1
    #: Why the family cannot take a selecting compressor (`_selecting`), or None if it can.
    refuses_selection: str | None = None

    def __init__(self, model: nn.Module, core: nn.Module, processor: Any | None, grid: Grid, out_grid: Grid) -> None:
        super().__init__(model, processor)
        self.grid = grid
        self.out_grid = out_grid
        self._core = core

    @property
    def module(self) -> CompressedProjector:
        return self._wrapped.wrapper  # type: ignore[union-attr,return-value]

    @property
    def placement(self) -> str:
        return self.module.placement

    @classmethod
    def sizes(cls, core: nn.Module) -> tuple[Grid, int, int]:
        """A view's grid and the projector's (input, output) widths; LLaVA's by default,
        where a CLS token must be dropped (the "default" strategy)."""
        config = core.config
        if config.vision_feature_select_strategy != "default" and _has_cls(core):
            raise ValueError(
                "this vision tower has a CLS token and vision_feature_select_strategy is "
                f"{config.vision_feature_select_strategy!r}; the compressor needs the grid's tokens only "
                "(use 'default', which drops it)"
            )
        return (vision_grid(config), *projector_widths(config))

    @classmethod
    def check_fit(cls, core: nn.Module, processor: Any | None, grid: Grid, out_grid: Grid) -> None:
        """Raise unless the family can lay out views of `out_grid` and `processor` counts
        the uncompressed layout (a ValueError or TypeError saying why)."""

    def _save(self, folder: str | Path) -> None:
        _, *widths = self.sizes(self._core)
        record = projector_graft_record(self, self._core.config, self.record_format, self.record_version,
                                        widths=tuple(widths))
        write_files(self, folder, record)

    def __repr__(self) -> str:
        name = type(self).__name__
        if self._wrapped is None:
            return f"{name}(not installed)"
        return (
            f"{name}({type(self.compressor).__name__}, placement={self.placement!r}, "
            f"grid {self.grid} -> {self.out_grid}, active={self.active})"
        )


_Graft = TypeVar("_Graft", bound=ProjectorCompressorGraft)


def graft_projector_compressor(
    graft_class: type[_Graft],
    core: nn.Module,
    model: nn.Module,
    compressor: TokenCompressor,
    *,
    processor: Any | None,
    placement: Placement,
    projector: nn.Module | None,
) -> _Graft:
    """Graft `compressor` around the projector of `core` (a LLaVA-style core inside
    `model`); `graft_class` gives the family's sizes and installs what follows the grid."""
    if isinstance(core.get_submodule(PROJECTOR_PATH), CompressedProjector):
        raise ValueError("this model already has a grafted compressor; remove() that graft first")
    if not isinstance(compressor, TokenCompressor):
        raise TypeError(f"compressor must be a TokenCompressor, got {type(compressor).__name__}")
    grid, vision_dim, text_dim = graft_class.sizes(core)
    try:
        compressor.check_dim(vision_dim)
        compressed_dim = compressor.out_dim(vision_dim)
        out_grid = tuple(compressor.out_grid(grid))
    except ValueError as error:
        raise ValueError(
            f"{type(compressor).__name__} cannot take this model's tiles "
            f"(grid {grid[0]}x{grid[1]}, width {vision_dim}): {error}"
        ) from error
    resolved = resolve_placement(placement, compressed_dim, vision_dim, text_dim, projector is not None)
    refuse_selection(compressor, graft_class.family, selection=graft_class.refuses_selection, scores=False)
    graft_class.check_fit(core, processor, grid, out_grid)

    base_projector = core.get_submodule(PROJECTOR_PATH)
    match_wrapped(compressor, base_projector)
    match_wrapped(projector, base_projector)
    graft = graft_class(model, core, processor, grid, out_grid)
    try:
        graft._wrapped = WrappedSubmodule.install(
            core, PROJECTOR_PATH,
            lambda original: CompressedProjector(original, compressor, grid, resolved, text_dim, projector),
        )
        graft._install()
    except Exception:
        graft._undo()  # all or nothing: no half-grafted model
        raise
    return graft


def _has_cls(core: nn.Module) -> bool:
    embeddings = getattr(core.vision_tower, "vision_model", core.vision_tower).embeddings
    return getattr(embeddings, "num_positions", 0) > getattr(embeddings, "num_patches", 0)


def load_projector_compressor_graft(
    graft_class: type[_Graft],
    core: nn.Module,
    model: nn.Module,
    folder: str | Path,
    *,
    processor: Any | None,
    compressor: TokenCompressor | None,
    projector: nn.Module | None,
) -> _Graft:
    """Graft the compressor saved in `folder` (a `graft_class` record) onto `core` in `model`."""
    folder = Path(folder)
    family = graft_class.family
    record = read_record(folder, graft_class.record_format, graft_class.record_version,
                         f"{family} compressor graft", f"a {family} model loads a {family} compressor graft")
    grid, *widths = graft_class.sizes(core)
    check_projector_graft_record(record, folder, core.config, grid=grid, widths=tuple(widths))
    compressor = saved_compressor(record, folder, compressor, projector)
    graft = graft_projector_compressor(
        graft_class, core, model, compressor, processor=processor, placement=record["placement"], projector=projector
    )
    load_weights(graft, folder)
    return graft
