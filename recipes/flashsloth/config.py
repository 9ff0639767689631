"""Typed recipe configs: YAML files plus ``key=value`` command-line overrides.

A config is a tree of dataclasses (`RecipeConfig` at the root). YAML is read with
``yaml.safe_load``; every key must be a field of the matching dataclass, and every value
must have the field's type (an error names the key, the value and the known keys).
Overrides use dotted keys and YAML values::

    python -m recipes.flashsloth.train --config stage1 optimizer.lr=2.0e-4 training.seed=3

``--config`` takes a path or the name of a bundled config (``stage1``, ``stage2``,
``hd_stage2``, ``tiny_stage1``, ``tiny_stage2``).

Note: YAML 1.1 (PyYAML) reads ``1e-3`` (no dot) as a string; float fields accept such
strings so that ``optimizer.lr=1e-3`` works as expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

__all__ = [
    "COMPONENTS",
    "BUNDLED_CONFIG_DIR",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RecipeConfig",
    "ScheduleConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_cli",
    "parse_override",
    "resolve_config_path",
]

BUNDLED_CONFIG_DIR = Path(__file__).parent / "configs"

# The model's parts, as named in `trainable` and `init_components`.
COMPONENTS = ("vision_encoder", "compressor", "projector", "embq", "llm")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# ----------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """What the model builder assembles. Sizes come from `preset`; the rest picks parts."""

    preset: Literal["flashsloth", "tiny"] = "flashsloth"
    # Hugging Face ids or local paths; null with the tiny preset (random init).
    vision_encoder: str | None = "google/siglip-so400m-patch14-384"
    llm: str | None = "microsoft/phi-2"
    # Null: build a tiny BPE tokenizer from the training data (`recipes.flashsloth.tokenizer`).
    tokenizer: str | None = "microsoft/phi-2"
    image_size: int = 384
    hd: bool = False  # FlashSloth-HD: thumbnail + 4 tiles of image_size each
    sap_window: int = 3
    sap_dropout: float = 0.1  # dropout in SAP's score MLP, as released
    # Table 3's visual compression rows: "sap" (FlashSloth), "avgpool" or "none" (all tokens).
    compressor: Literal["sap", "avgpool", "none"] = "sap"
    num_queries: int = 9
    # 1-based, as the paper counts and as `graft_embq(layer=...)` takes it: 8 means EmbQ
    # updates the input of the 8th decoder layer (`layers[7]`), after 7 layers have run.
    embq_layer: int = 8
    embq_inner_dim: int = 576
    embq_num_heads: int = 32
    # A previous stage's run (its latest checkpoint) or one checkpoint directory.
    init_from: str | None = None
    init_components: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("trainable", "init_components"):
            unknown = [c for c in getattr(self, name) if c not in COMPONENTS]
            if unknown:
                raise ConfigError(
                    f"model.{name}: unknown component(s) {unknown}; known: {list(COMPONENTS)}"
                )
        if self.init_components and self.init_from is None:
            raise ConfigError(
                f"model.init_components={self.init_components} needs model.init_from "
                "(the checkpoint to copy them from)"
            )
        for name in ("image_size", "sap_window", "embq_inner_dim", "embq_num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.sap_dropout < 1.0:
            raise ConfigError(f"model.sap_dropout must be in [0, 1), got {self.sap_dropout}")
        if self.num_queries < 0:
            raise ConfigError(f"model.num_queries must be >= 0, got {self.num_queries}")
        if self.embq_layer < 1:
            raise ConfigError(
                f"model.embq_layer is 1-based (the paper's 8th layer is 8), got {self.embq_layer}"
            )


@dataclass
class DataConfig:
    """Where the LLaVA-format JSON and images are, and how samples are formatted."""

    train_json: str
    image_folder: str
    template: Literal["plain", "vicuna_v1"] = "vicuna_v1"
    max_length: int = 3072
    num_workers: int = 2
    # "skip": check every image once at start-up and leave out unreadable ones (logged).
    on_bad_image: Literal["raise", "skip"] = "raise"
    eval_json: str | None = None

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ConfigError(f"data.max_length must be >= 1, got {self.max_length}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class OptimizerConfig:
    """AdamW."""

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class ScheduleConfig:
    """Linear warmup + cosine decay (`recipes.flashsloth.schedule`)."""

    warmup_ratio: float = 0.03

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"schedule.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")


@dataclass
class TrainingConfig:
    """Batch sizes, precision and loop settings."""

    global_batch_size: int
    micro_batch_size: int  # per device and per forward pass
    epochs: int = 1
    # Cap on optimizer steps (the schedule spans the capped run); null: `epochs` full epochs.
    max_steps: int | None = None
    max_grad_norm: float | None = 1.0
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    device: str = "cuda"
    # With torchrun: "fsdp" (FSDP2, sharded) or "ddp" (replicated). Ignored in one process.
    parallelism: Literal["fsdp", "ddp"] = "fsdp"
    seed: int = 42
    log_every_n_steps: int = 10

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "micro_batch_size", "epochs", "log_every_n_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"training.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"training.global_batch_size={self.global_batch_size} is not a multiple of "
                f"training.micro_batch_size={self.micro_batch_size}"
            )

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank, so the global batch is exact."""
        per_step = self.micro_batch_size * world_size
        if world_size < 1 or self.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size * world_size = {self.micro_batch_size} * {world_size}"
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointConfig:
    """Where and how often to save (`recipes.flashsloth.checkpoint`)."""

    output_dir: str
    save_every_n_steps: int = 500
    keep_last: int | None = 2  # null keeps every checkpoint
    resume: bool = True  # continue from the latest checkpoint in output_dir, if any

    def __post_init__(self) -> None:
        if self.save_every_n_steps < 1:
            raise ConfigError(
                f"checkpoint.save_every_n_steps must be >= 1, got {self.save_every_n_steps}"
            )
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1 or null, got {self.keep_last}")


@dataclass
class RecipeConfig:
    """One training stage."""

    name: str
    stage: Literal[1, 2]
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        required = {"projector", "compressor"}
        if self.stage == 2 and self.model.init_from is not None:
            missing = required - set(self.model.init_components)
            if missing:
                # The release re-created SAP at stage 2, throwing away its stage-1 training.
                raise ConfigError(
                    f"stage 2 initialised from {self.model.init_from!r} must load "
                    f"{sorted(required)} from it; model.init_components lacks {sorted(missing)}"
                )
        if self.stage == 1 and self.data.template != "plain":
            raise ConfigError("stage 1 (alignment) uses data.template: plain")


# ----------------------------------------------------------------------------- building


def _where(path: str) -> str:
    return path or "top level"


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _section_class(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        classes = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return classes[0] if len(classes) == 1 else None
    return None


def _type_error(path: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config key {path!r}: expected {expected}, got {value!r}")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type ``tp``; returns the value in the field's type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(path, value, f"a value of type {tp}")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return value
        raise _type_error(path, value, f"one of {list(choices)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(path, value, f"a mapping (section {tp.__name__})")
        return _build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, value, "a list")
        args = typing.get_args(tp)
        if origin is list:
            return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _type_error(path, value, f"a list of {len(args)} items")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(path, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                return float(value)
            except ValueError:
                pass
        raise _type_error(path, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, value, "a string")
    raise TypeError(f"config schema: unsupported type {tp!r} at {path!r}")


def _build(cls: type, raw: dict, path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    for key in raw:
        if key not in known:
            dotted = f"{path}.{key}" if path else str(key)
            raise ConfigError(
                f"unknown config key {dotted!r}; known keys under {_where(path)}: "
                f"{', '.join(known)}"
            )
    kwargs = {}
    for name, f in known.items():
        dotted = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {dotted!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_where(path)}: {exc}") from exc


def config_from_dict(raw: dict) -> RecipeConfig:
    """Build and validate a `RecipeConfig` from plain data (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(raw).__name__}")
    return _build(RecipeConfig, raw)


def config_to_dict(config: Any) -> dict:
    """Plain data (lists, not tuples) that `config_from_dict` reads back to an equal config."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def dump_config(config: RecipeConfig) -> str:
    """YAML text of a config (saved next to checkpoints)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=VALUE"`` -> (["a", "b"], yaml.safe_load("VALUE")); empty VALUE is null."""
    key, sep, value_text = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"override {text!r} is not of the form key.subkey=value")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return [p.strip() for p in parts], value


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of ``raw`` with the overrides set; keys are checked against the schema."""
    result = _deep_copy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node, cls = result, RecipeConfig
        for depth, key in enumerate(keys):
            known = _fields(cls)
            prefix = ".".join(keys[:depth])
            if key not in known:
                raise ConfigError(
                    f"override {text!r}: unknown key {'.'.join(keys[: depth + 1])!r}; "
                    f"known keys under {_where(prefix)}: {', '.join(known)}"
                )
            if depth == len(keys) - 1:
                node[key] = value
                break
            section = _section_class(typing.get_type_hints(cls)[key])
            if section is None:
                raise ConfigError(
                    f"override {text!r}: {'.'.join(keys[: depth + 1])!r} is a value, "
                    "not a section"
                )
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node, cls = node[key], section
    return result


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


# ----------------------------------------------------------------------------- loading


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path as given, or ``configs/<name>.yaml`` for a bundled config name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = BUNDLED_CONFIG_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(p.stem for p in BUNDLED_CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name_or_path)!r}: no such file, nor a bundled config {names}")


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Read a YAML config (path or bundled name), apply overrides, validate."""
    path = resolve_config_path(name_or_path)
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    try:
        return config_from_dict(apply_overrides(raw, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse_cli(argv: Sequence[str] | None = None, description: str | None = None) -> RecipeConfig:
    """``--config NAME_OR_PATH [key=value ...]`` -> a validated config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML path or bundled config name")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optimizer.lr=2e-5")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)
