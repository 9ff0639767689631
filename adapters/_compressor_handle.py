"""The handle of a compressor graft that wraps one submodule and overrides some methods.

Qwen2-VL's and LLaVA-NeXT's compressor grafts change the model in two kinds of place: one
wrapped submodule (the module whose output the compressor takes) and a few instance-level
method overrides (on the model's core and its processor) that make the rest of the model
follow the compressed grid. This base class owns both, and undoes, lifts and saves them
in the one order that is safe: unwrap and un-override together, all or nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from tokencompress.base import TokenCompressor

from ._instance_override import InstanceOverride
from ._wrap import WrappedSubmodule, refuse_other_wrappers

__all__ = ["WrappingCompressorGraft"]


class WrappingCompressorGraft(ABC):
    """A compressor graft: `_wrapped` (the wrapper holding `compressor` and `projector`)
    plus instance overrides. Subclasses install both and say how to save themselves.

    Attributes:
        model: the grafted model.
        processor: the processor whose placeholder counts follow the graft, if given.
    """

    def __init__(self, model: nn.Module, processor: Any | None) -> None:
        self.model = model
        self.processor = processor
        self._wrapped: WrappedSubmodule | None = None
        self._overrides: list[InstanceOverride] = []

    # -- what is grafted --------------------------------------------------------------------
    @property
    def module(self) -> Any:
        """The wrapper in the place of the wrapped submodule (it holds the compressor)."""
        return self._wrapped.wrapper  # type: ignore[union-attr]

    @property
    def compressor(self) -> TokenCompressor:
        return self.module.compressor

    @property
    def projector(self) -> nn.Module | None:
        return self.module.projector

    @property
    def active(self) -> bool:
        return self._wrapped is not None and self._wrapped.active

    # -- for subclasses -----------------------------------------------------------------------
    def _override(self, owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Override `owner.<name>` with `make(current)`; one at a time, so `_undo()` takes
        back exactly those made."""
        self._overrides.append(InstanceOverride.install(owner, name, make))

    def _suspend(self) -> None:
        """While lifted: switch off what is neither the wrapper nor an override (a check)."""

    def _resume(self) -> None:
        """After lifting: switch it back on."""

    def _undo_more(self) -> None:
        """Undo what is neither the wrapper nor an override (a hook), last."""

    @abstractmethod
    def _save(self, folder: str | Path) -> None:
        """Write the graft's own files to `folder`."""

    # -- undo, lift -----------------------------------------------------------------------------
    def _remove_overrides(self) -> None:
        for override in self._overrides:  # all or none
            override.check_removable()
        for override in reversed(self._overrides):
            if override.active:
                override.remove()

    def _undo(self) -> None:
        """Undo whatever of the graft is in place (all of it, or what a failed graft did)."""
        for override in self._overrides:  # raise before anything changes
            override.check_removable()
        if self._wrapped is not None and self._wrapped.active:
            self._wrapped.remove()  # raises, before anything else changes, under a later wrapper
        self._remove_overrides()
        self._undo_more()

    def remove(self) -> None:
        """Put back the wrapped module and the overridden methods (bit-identical outputs)."""
        if not self.active:
            raise RuntimeError("this compressor graft was already removed")
        self._undo()

    @contextmanager
    def lifted(self) -> Iterator[None]:
        """Within the block the model and processor are ungrafted; e.g. to save them with
        their own `save_pretrained`."""
        if not self.active:
            raise RuntimeError("this compressor graft was removed")
        with self._wrapped.lifted():  # type: ignore[union-attr]
            self._remove_overrides()
            self._suspend()
            try:
                yield
            finally:
                self._resume()
                for override in self._overrides:
                    override.apply()

    # -- save -------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, *, save_base_model: bool = False) -> None:
        """Write the graft (settings JSON + safetensors weights) to `folder`.

        With `save_base_model=True`, also the ungrafted model and processor (their own
        `save_pretrained`), so that `from_pretrained` + `load_compressor_graft` on
        `folder` give this grafted model back. That refuses (RuntimeError) while another
        graft's wrapper is in the model, whose parameter names would be written.
        """
        if not save_base_model:
            self._save(folder)
            return
        with self.lifted():  # raises if the graft was removed
            refuse_other_wrappers(self.model)  # before any file is written
            self._save(folder)
            self.model.save_pretrained(folder)
            if self.processor is not None:
                self.processor.save_pretrained(folder)
