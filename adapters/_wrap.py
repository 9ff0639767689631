"""Removable wrappers: swap a submodule, found by its dotted path, for a wrapper of it.

The peft pattern without class swapping: the wrapper is a new `nn.Module` that keeps the
original as `base_layer`; it is put in the original's place on its parent, and
`remove()` puts the very same original object back, so the model's parameters and
outputs are exactly what they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["BaseLayerWrapper", "WrappedSubmodule", "match_wrapped", "refuse_other_wrappers"]


class BaseLayerWrapper(nn.Module):
    """A wrapper that keeps the module it wraps as `base_layer` and, as peft's wrappers do,
    falls back to it for attributes it does not have: code that reads the wrapped
    module's attributes (`layer.self_attn`, `merger.ln_q`) still finds them."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":  # not set yet: do not recurse
                raise
            return getattr(self.base_layer, name)


def _split_path(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


class WrappedSubmodule:
    """Record of one submodule of `root` at `path` replaced by `wrapper`.

    Build it with `WrappedSubmodule.install(root, path, make_wrapper)`, where
    `make_wrapper(original)` returns an `nn.Module` whose `base_layer` is `original`.
    """

    def __init__(self, root: nn.Module, path: str, wrapper: nn.Module) -> None:
        self.root = root
        self.path = path
        self.wrapper = wrapper
        self.active = True

    @classmethod
    def install(
        cls, root: nn.Module, path: str, make_wrapper: Callable[[nn.Module], nn.Module]
    ) -> "WrappedSubmodule":
        """Replace `root.get_submodule(path)` by `make_wrapper(original)`."""
        original = root.get_submodule(path)  # AttributeError names the missing part
        wrapper = make_wrapper(original)
        if getattr(wrapper, "base_layer", None) is not original:
            raise TypeError(
                f"the wrapper of {path!r} must keep the original module as `base_layer`; "
                f"{type(wrapper).__name__}.base_layer is not it"
            )
        parent_path, name = _split_path(path)
        # setattr on the parent keeps the child's slot (and its order in _modules); it also
        # works for nn.ModuleList / nn.Sequential children, whose names are "0", "1", ...
        setattr(root.get_submodule(parent_path), name, wrapper)
        return cls(root, path, wrapper)

    @property
    def base_layer(self) -> nn.Module:
        """The original module."""
        return self.wrapper.base_layer

    def remove(self) -> nn.Module:
        """Put the original back in place of the wrapper and return it."""
        if not self.active:
            raise RuntimeError(f"the wrapper of {self.path!r} was already removed")
        self._put(self.base_layer, expected=self.wrapper)
        self.active = False
        return self.base_layer

    @contextmanager
    def lifted(self) -> Iterator[None]:
        """Within the block the original is in place; then the wrapper again."""
        self._put(self.base_layer, expected=self.wrapper)
        try:
            yield
        finally:
            self._put(self.wrapper, expected=self.base_layer)

    def _put(self, module: nn.Module, expected: nn.Module) -> None:
        current = self.root.get_submodule(self.path)
        if current is not expected:
            # Someone replaced the module after us (another wrapper on top of ours):
            # putting ours back would silently drop theirs.
            raise RuntimeError(
                f"{self.path!r} is now a {type(current).__name__}, not the "
                f"{type(expected).__name__} this graft expects there; remove the "
                "grafts made after this one first (last made, first removed)"
            )
        parent_path, name = _split_path(self.path)
        setattr(self.root.get_submodule(parent_path), name, module)


def refuse_other_wrappers(model: nn.Module) -> None:
    """Raise if a wrapper (a module with a `base_layer`) is still in `model`.

    Called, with every graft being saved lifted, before a model's own `save_pretrained`:
    a wrapper left in would write its parameter names (`....base_layer.weight`), which
    the plain model does not load.
    """
    wrapped = [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "base_layer", None), nn.Module)
    ]
    if wrapped:
        raise RuntimeError(
            f"the model has other grafts ({', '.join(wrapped)}), whose wrappers would be saved: "
            "save it with tokencompress.adapters.save_grafted(model, folder, *grafts), which "
            "lifts them all"
        )


def match_wrapped(module: nn.Module | None, like: nn.Module) -> None:
    """Move `module` to `like`'s device and dtype, and give it `like`'s train/eval mode."""
    if module is None:
        return
    # A new module is in training mode; grafted into a model in eval mode, its dropout
    # would make inference random. It follows the model's mode from then on.
    module.train(like.training)
    reference = next(like.parameters(), None)
    if reference is not None:
        # As peft does for its layers: the new weights live where the wrapped ones do.
        module.to(device=reference.device, dtype=reference.dtype)
