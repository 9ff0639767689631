"""Name -> compressor class registry (`register_compressor`, `create_compressor`)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from .base import TokenCompressor

__all__ = ["register_compressor", "create_compressor", "list_compressors", "get_compressor_class"]

_REGISTRY: dict[str, type[TokenCompressor]] = {}

C = TypeVar("C", bound=type[TokenCompressor])


def register_compressor(name: str) -> Callable[[C], C]:
    """Class decorator: register a `TokenCompressor` subclass under `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def decorator(cls: C) -> C:
        if not (inspect.isclass(cls) and issubclass(cls, TokenCompressor)):
            raise TypeError(f"register_compressor({name!r}) needs a TokenCompressor subclass, got {cls!r}")
        if name in _REGISTRY:
            raise ValueError(
                f"a compressor named {name!r} is already registered ({_REGISTRY[name].__qualname__})"
            )
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def get_compressor_class(name: str) -> type[TokenCompressor]:
    """The class registered under `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown compressor name={name!r}; expected one of {list_compressors()}"
        ) from None


def create_compressor(name: str, **kwargs: Any) -> TokenCompressor:
    """Build the compressor registered under `name` with keyword arguments."""
    return get_compressor_class(name)(**kwargs)


def list_compressors() -> list[str]:
    """Registered compressor names, sorted."""
    return sorted(_REGISTRY)
