"""The `model_args` of the lmms-eval model `tokencompress`, checked before any model loads.

    lmms-eval --model tokencompress --model_args pretrained=PATH,compressor=tome,compressor.num_tokens=64

lmms-eval hands them over as one `key=value,...` string, parsed into ints, floats, bools
and strings. Every key is checked here, with the folder's kind read from its JSON alone:

- `pretrained` (required): a FlashSloth folder (`flashsloth_config.json`, written by the
  recipe's training or `recipes.flashsloth.convert`), or a Hugging Face model folder
  (`config.json`) whose `model_type` the adapters' family table supports;
- `compressor` + `compressor.<argument>`: a compressor from the registry
  (`tokencompress.list_compressors()`) and its constructor arguments, grafted with
  `graft_compressor` (training-free ones such as `tome`, `dart`, `visionzip` need no weights);
- `graft`: a folder with a saved compressor graft (`CompressorGraft.save_pretrained`),
  loaded with `load_compressor_graft`; exclusive with `compressor`;
- `fastv_layer`, `fastv_keep`: `graft_fastv(model, layer=..., keep=...)`, both or neither;
- `batch_size`, `device`, `dtype` ("float32", "bfloat16", "float16"), `max_new_tokens`
  (the default when a task gives none), `on_bad_image` ("stop": an unreadable image stops
  the run naming the sample; "skip": the sample is answered with `SKIPPED_ANSWER` and
  counted by the task's `skipped` metric), `chat_template` ("auto": the processor's own
  when it has one; "plain": "USER: <images>\\n<question> ASSISTANT:").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

__all__ = ["EvalSpec", "parse_model_args", "FLASHSLOTH_CONFIG", "KNOWN_KEYS"]

#: The file that marks a FlashSloth folder (`recipes.flashsloth.model.CONFIG_NAME`).
FLASHSLOTH_CONFIG = "flashsloth_config.json"
_DTYPES = ("float32", "bfloat16", "float16")
_BAD_IMAGE = ("stop", "skip")
_TEMPLATES = ("auto", "plain")
KNOWN_KEYS = (
    "pretrained", "compressor", "graft", "fastv_layer", "fastv_keep", "batch_size", "device", "dtype",
    "max_new_tokens", "on_bad_image", "chat_template",
)


@dataclass(frozen=True)
class EvalSpec:
    """What to load and graft, and how to run it; see the module docstring."""

    pretrained: Path
    kind: Literal["flashsloth", "hf"]
    model_type: str
    compressor: str | None = None
    compressor_kwargs: dict[str, Any] = field(default_factory=dict)
    graft: Path | None = None
    fastv_layer: int | None = None
    fastv_keep: int | float | None = None
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    max_new_tokens: int = 128
    on_bad_image: Literal["stop", "skip"] = "stop"
    chat_template: Literal["auto", "plain"] = "auto"


def _read_json(path: Path, argument: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{argument}: cannot read {path} as JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{argument}: {path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _folder_kind(pretrained: Any) -> tuple[Path, Literal["flashsloth", "hf"], str, str | None]:
    """(folder, kind, model_type, FlashSloth's own compressor or None) of `pretrained`."""
    from tokencompress.adapters import supported_model_types

    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"pretrained must be a model folder, got {pretrained!r}")
    folder = Path(pretrained).expanduser()
    if not folder.is_dir():
        raise ValueError(f"pretrained={pretrained!r} is not a folder (no downloads: give a local model folder)")
    if (folder / FLASHSLOTH_CONFIG).is_file():
        record = _read_json(folder / FLASHSLOTH_CONFIG, "pretrained")
        config = record.get("config") if isinstance(record.get("config"), dict) else {}
        return folder, "flashsloth", "flashsloth", config.get("compressor")
    if (folder / "config.json").is_file():
        model_type = _read_json(folder / "config.json", "pretrained").get("model_type")
        if model_type in supported_model_types():
            return folder, "hf", model_type, None
        raise ValueError(
            f"pretrained={pretrained!r} is a {model_type!r} model; the adapters support "
            f"{supported_model_types()} (or give a FlashSloth folder, with {FLASHSLOTH_CONFIG})"
        )
    raise ValueError(
        f"pretrained={pretrained!r} is neither a FlashSloth folder ({FLASHSLOTH_CONFIG}) nor a Hugging Face "
        "model folder (config.json)"
    )


def _positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be a positive int, got {value!r}")
    return value


def _choice(value: Any, argument: str, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")
    return value


def _compressor_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    prefix = "compressor."
    return {key[len(prefix):]: value for key, value in args.items() if key.startswith(prefix)}


def _check_compressor(name: Any, kwargs: dict[str, Any]) -> None:
    """Build the compressor once (no model needed): a wrong name or argument fails here."""
    from tokencompress.registry import create_compressor, list_compressors

    if name not in list_compressors():
        raise ValueError(f"compressor={name!r} is not a registered compressor; expected one of {list_compressors()}")
    try:
        create_compressor(name, **kwargs)
    except (TypeError, ValueError) as error:
        given = ",".join(f"compressor.{key}={value}" for key, value in kwargs.items()) or "no compressor.* arguments"
        raise ValueError(f"compressor={name!r} with {given}: {error}") from None


def parse_model_args(args: Mapping[str, Any]) -> EvalSpec:
    """An `EvalSpec` from lmms-eval's parsed `model_args` (plus its `batch_size`, `device`).

    Raises:
        ValueError: naming the argument, its value and what was expected, for an unknown
            key, a folder that is neither kind, an unknown compressor or argument, or
            options that conflict; before any model is loaded.
    """
    unknown = sorted(key for key in args if key not in KNOWN_KEYS and not key.startswith("compressor."))
    if unknown:
        raise ValueError(f"unknown model_args {unknown}; expected {list(KNOWN_KEYS)} or compressor.<argument>")
    if "pretrained" not in args:
        raise ValueError("model_args needs pretrained=<a FlashSloth or Hugging Face model folder>")
    folder, kind, model_type, own_compressor = _folder_kind(args["pretrained"])

    compressor, kwargs = args.get("compressor"), _compressor_kwargs(args)
    if kwargs and compressor is None:
        raise ValueError(f"compressor.* arguments {sorted(kwargs)} were given without compressor=<name>")
    if compressor is not None:
        _check_compressor(compressor, kwargs)
    graft = args.get("graft")
    if graft is not None:
        if compressor is not None:
            raise ValueError(f"graft={graft!r} and compressor={compressor!r} both compress the images; give one")
        if kind == "flashsloth":
            raise ValueError(f"graft={graft!r}: a FlashSloth folder carries its own grafts")
        if not Path(str(graft)).expanduser().is_dir():
            raise ValueError(f"graft={graft!r} is not a folder with a saved compressor graft")
        graft = Path(str(graft)).expanduser()
    if kind == "flashsloth" and compressor is not None and own_compressor not in (None, "none"):
        raise ValueError(
            f"compressor={compressor!r}: this FlashSloth folder already compresses its images with "
            f"{own_compressor!r}; a second compressor needs a FlashSloth trained with compressor='none'"
        )

    layer, keep = args.get("fastv_layer"), args.get("fastv_keep")
    if (layer is None) != (keep is None):
        given = f"fastv_layer={layer!r}" if keep is None else f"fastv_keep={keep!r}"
        raise ValueError(f"{given} was given alone; FastV needs both fastv_layer and fastv_keep")
    if layer is not None:
        _positive_int(layer, "fastv_layer")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise ValueError(f"fastv_keep must be an int count or a float ratio, got {keep!r}")

    return EvalSpec(
        pretrained=folder,
        kind=kind,
        model_type=model_type,
        compressor=compressor,
        compressor_kwargs=kwargs,
        graft=graft,
        fastv_layer=layer,
        fastv_keep=keep,
        batch_size=_positive_int(args.get("batch_size", 1), "batch_size"),
        device=str(args.get("device") or "cpu"),
        dtype=_choice(args.get("dtype", "float32"), "dtype", _DTYPES),
        max_new_tokens=_positive_int(args.get("max_new_tokens", 128), "max_new_tokens"),
        on_bad_image=_choice(args.get("on_bad_image", "stop"), "on_bad_image", _BAD_IMAGE),
        chat_template=_choice(args.get("chat_template", "auto"), "chat_template", _TEMPLATES),
    )
