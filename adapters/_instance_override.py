"""Removable instance-level overrides of a method, for hooks no submodule offers.

Some model behaviour lives in methods, not submodules (Qwen2-VL's `get_rope_index`, a
processor's `replace_image_token`). As peft does for `prepare_inputs_for_generation`,
the override is an attribute of that one instance, shadowing the class's method; the
class and every other instance are untouched, and `remove()` deletes the attribute (or
puts back an instance attribute it shadowed), so the object behaves as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["InstanceOverride"]

_ABSENT = object()


class InstanceOverride:
    """`owner.<name>` replaced by `function` on that instance only; `remove()` undoes it."""

    def __init__(self, owner: Any, name: str, function: Callable[..., Any]) -> None:
        self.owner = owner
        self.name = name
        self.function = function
        self.active = False
        self._shadowed: Any = _ABSENT

    @classmethod
    def install(
        cls, owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
    ) -> "InstanceOverride":
        """Set `owner.<name> = make(current)`, where `current` is the method as it is now."""
        override = cls(owner, name, make(getattr(owner, name)))
        override.apply()
        return override

    def apply(self) -> None:
        """(Re)install the override; its previous instance attribute is kept for `remove()`."""
        if self.active:
            raise RuntimeError(f"the override of {self.name!r} is already in place")
        self._shadowed = vars(self.owner).get(self.name, _ABSENT)
        # object.__setattr__: a plain instance attribute even on an nn.Module.
        object.__setattr__(self.owner, self.name, self.function)
        self.active = True

    @property
    def in_place(self) -> bool:
        """Whether `owner.<name>` is still this override (and not one made after it)."""
        return vars(self.owner).get(self.name, _ABSENT) is self.function

    def check_removable(self) -> None:
        """Raise if `remove()` would drop an override made after this one."""
        if self.active and not self.in_place:
            # Someone overrode it after us: putting ours back would drop theirs.
            raise RuntimeError(
                f"{type(self.owner).__name__}.{self.name} was overridden again after this graft; "
                "remove the grafts made after this one first (last made, first removed)"
            )

    def remove(self) -> None:
        """Put back what `owner.<name>` was before `apply()`."""
        if not self.active:
            raise RuntimeError(f"the override of {self.name!r} was already removed")
        self.check_removable()
        if self._shadowed is _ABSENT:
            object.__delattr__(self.owner, self.name)
        else:
            object.__setattr__(self.owner, self.name, self._shadowed)
        self.active = False
