"""Name -> compressor class registry (`register_compressor`, `create_compressor`)."""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Mapping, TypeVar

from .base import TokenCompressor

__all__ = [
    "register_compressor",
    "create_compressor",
    "list_compressors",
    "get_compressor_class",
    "compressor_to_config",
    "compressor_from_config",
]

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


def compressor_to_config(compressor: TokenCompressor) -> dict[str, Any]:
    """`{"name": registry name, "kwargs": get_config()}` as JSON values.

    Raises ValueError for a compressor whose exact class is not registered (a subclass of
    a registered class inherits its `registry_name` but is not that class).
    """
    name = getattr(type(compressor), "registry_name", None)
    if name is None or _REGISTRY.get(name) is not type(compressor):
        raise ValueError(
            f"cannot write the config of {type(compressor).__qualname__}: its class is not "
            "registered; decorate it with @register_compressor(name)"
        )
    kwargs = compressor.get_config()
    try:
        kwargs = json.loads(json.dumps(kwargs))  # JSON values only; tuples become lists
    except TypeError as error:
        raise ValueError(
            f"{type(compressor).__qualname__}.get_config() returned non-JSON values: {error}"
        ) from None
    return {"name": name, "kwargs": kwargs}


def compressor_from_config(config: Mapping[str, Any]) -> TokenCompressor:
    """A fresh compressor (new weights) from the output of `compressor_to_config`."""
    if not isinstance(config, Mapping) or not isinstance(config.get("name"), str):
        raise ValueError(f"config must be a mapping with a string 'name', got {config!r}")
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"config['kwargs'] must be a mapping, got {kwargs!r}")
    return get_compressor_class(config["name"]).from_config(dict(kwargs))
