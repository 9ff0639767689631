"""First-round inference cost of a multimodal LLM, part by part, counted on the `meta` device.

    from tokencompress.profile import profile_model
    from tokencompress.profile_presets import preset
    print(profile_model(preset("flashsloth", text_tokens=64)).to_markdown())

"First round" is what the paper's TFLOPs measure: one sample (one image, or all tiles of
one image) through the vision encoder, the compressor, the projector, EmbQ and the LLM's
prefill, up to the logits of the first answer token. Each part is built from its config on
the `meta` device and run once (`profile_meter.measure`), so full-size models cost seconds
and no weights. Vision towers: SigLIP and CLIP at their config's size (several views, or
LLaVA-NeXT's AnyRes views of an image of any size, `anyres`), and Qwen3-VL's ViT with its
merger and DeepStack mergers at any image size (`profile_qwen3_vl`).

Conventions (see `docs/benchmarks.md`):
- Multiply-adds (MACs) by `mac_count.MacCounter`'s formulas, the same on every torch
  version: matmuls, convolutions and attention only. Attention is counted over the full
  L x L square.
- Only what runs is counted: a vision encoder read at its penultimate layer runs that many
  layers; its last layer, post-layernorm and pooling head are neither run nor counted (nor
  counted as weights: a deployment that loads them holds tens of MB more).
- The LM head runs on the last position only by default, as `generate` does on prefill
  (`logits_to_keep=1`); `lm_head_positions="all"` counts every position.
- Memory: weights = parameters x bytes per element of `dtype`; KV cache = what the LLM's
  cache holds after prefill, 2 * layers * kv_heads * head_dim * tokens * bytes; peak
  activations = the largest measured working set of any part (inputs included, fused
  attention). The estimate is weights + KV cache + peak activations; the CUDA context and
  the allocator's cached blocks are not included.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, DynamicCache
from transformers import PretrainedConfig, Qwen3VLVisionConfig, Qwen3VLVisionModel, SiglipVisionConfig
from transformers import SiglipVisionModel

from . import profile_qwen3_vl
from .anyres import AnyResLayout, anyres_layout
from .hf_compat import cache_argument
from .profile_meter import Measurement, measure

__all__ = [
    "EmbQSpec",
    "ProfileSpec",
    "PartProfile",
    "ProfileResult",
    "profile_model",
    "build_projector",
    "kv_cache_bytes",
    "weight_bytes",
    "vision_layers_run",
    "compare_markdown",
    "savings_markdown",
]

# Vision towers we know how to cut at a hidden layer, by config class (ViTs of a fixed size).
_VISION_MODELS: dict[type[PretrainedConfig], type[nn.Module]] = {
    SiglipVisionConfig: SiglipVisionModel,
    CLIPVisionConfig: CLIPVisionModel,
}
# Read at their penultimate layer unless told otherwise, as LLaVA does.
_DEFAULT_FEATURE_LAYER = -2


# -- specification ---------------------------------------------------------------------
@dataclass(frozen=True)
class EmbQSpec:
    """An EmbQ module and where it acts.

    Args:
        module: an `EmbQ(text_dim, vision_dim, ...)` (on any device; only shapes are used).
        num_queries: query tokens appended after the instruction (paper: 9).
        layer: the decoder layer whose input EmbQ updates (paper: 8). It does not change
            the cost (the queries go through every layer either way); it is reported.
        instruction_tokens: text tokens EmbQ reads; None reads all the text tokens.
    """

    module: nn.Module
    num_queries: int = 9
    layer: int = 8
    instruction_tokens: int | None = None


@dataclass(frozen=True)
class ProfileSpec:
    """Everything that sets the cost of one first-round inference.

    Args:
        vision_config: a `SiglipVisionConfig` or `CLIPVisionConfig` (full size), or a
            `Qwen3VLVisionConfig` (Qwen3-VL's ViT, merger and DeepStack mergers).
        text_config: the LLM's config (`PhiConfig`, `LlamaConfig`, `Qwen2Config`, ...).
        text_tokens: prompt tokens besides the visual and query tokens.
        num_images: images (or tiles) encoded for the sample, each at the config's size
            (Qwen3-VL: each of `image_size`); 1 with `grid_pinpoints`.
        vision_feature_layer: index into a SigLIP/CLIP encoder's hidden states, as in
            LLaVA (-2 is the penultimate layer's output); layers after it are not run.
            None: -2. Qwen3-VL runs its whole tower and takes None only.
        vision_feature_select: "patch" drops a CLS token (LLaVA's "default"); "full" keeps it.
        image_size: the image's (height, width) in pixels, for the towers that take any
            size: Qwen3-VL (each side a multiple of 32), and AnyRes (with `grid_pinpoints`).
            None for SigLIP/CLIP at their config's size.
        grid_pinpoints: LLaVA-NeXT's AnyRes resolutions ((height, width) pixels, multiples
            of the tower's image size): the tower encodes the base view and the tiles of
            `image_size`, and the LLM gets their AnyRes layout (`anyres.anyres_layout`) on
            the compressor's output grid, one `image_newline` token per row included.
        compressor: a `TokenCompressor` applied per image (view) to the patch grid
            (Qwen3-VL: to the merged grid, and to each DeepStack level, so that what the
            LLM adds at the visual positions sits on the same kept grid), or None.
        projector: "mlp{N}x_gelu", "linear", "identity", or a module mapping the
            compressor's output width to the LLM's width (Qwen3-VL's merger is part of
            the tower: "identity", or a new projector after a compressor that widens).
        embq: an `EmbQSpec`, or None.
        dtype: the inference dtype: weights, activations and KV cache.
        lm_head_positions: "last" (what `generate` computes on prefill) or "all".
        attn_implementation: the transformers attention implementation to run.
        name: a label for tables.
    """

    vision_config: PretrainedConfig
    text_config: PretrainedConfig
    text_tokens: int = 64
    num_images: int = 1
    vision_feature_layer: int | None = None
    vision_feature_select: Literal["patch", "full"] = "patch"
    image_size: tuple[int, int] | None = None
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    compressor: nn.Module | None = None
    projector: str | nn.Module = "mlp2x_gelu"
    embq: EmbQSpec | None = None
    dtype: torch.dtype = torch.bfloat16
    lm_head_positions: Literal["last", "all"] = "last"
    attn_implementation: str = "sdpa"
    name: str = "custom"

    def __post_init__(self) -> None:
        if type(self.vision_config) not in (*_VISION_MODELS, Qwen3VLVisionConfig):
            known = ", ".join(cls.__name__ for cls in (*_VISION_MODELS, Qwen3VLVisionConfig))
            raise TypeError(f"vision_config must be one of {known}, got {type(self.vision_config).__name__}")
        _check_int("text_tokens", self.text_tokens, minimum=0)
        _check_int("num_images", self.num_images, minimum=1)
        if self.vision_feature_select not in ("patch", "full"):
            raise ValueError(f"vision_feature_select must be 'patch' or 'full', got {self.vision_feature_select!r}")
        if self.lm_head_positions not in ("last", "all"):
            raise ValueError(f"lm_head_positions must be 'last' or 'all', got {self.lm_head_positions!r}")
        if self.embq is not None:
            _check_int("embq.num_queries", self.embq.num_queries, minimum=1)  # embq=None for none
            if self.embq.instruction_tokens is not None:
                _check_int("embq.instruction_tokens", self.embq.instruction_tokens, minimum=0)
                if self.embq.instruction_tokens > self.text_tokens:
                    raise ValueError(
                        f"embq.instruction_tokens={self.embq.instruction_tokens} exceeds "
                        f"text_tokens={self.text_tokens}; the instruction is part of the text"
                    )
        if isinstance(self.vision_config, Qwen3VLVisionConfig):
            self._check_qwen3_vl()
        else:
            self._check_vit()

    def _check_qwen3_vl(self) -> None:
        if self.vision_feature_layer is not None:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer}: Qwen3-VL's tower runs all its layers "
                "(its merger reads the last one); leave vision_feature_layer at None"
            )
        if self.grid_pinpoints is not None:
            raise ValueError("grid_pinpoints (AnyRes) is for SigLIP/CLIP towers; Qwen3-VL takes the image's own size")
        if self.image_size is None:
            raise ValueError("a Qwen3-VL tower needs image_size=(height, width) in pixels")
        profile_qwen3_vl.patch_grid(self.vision_config, self.image_size)  # raises on a bad size

    def _check_vit(self) -> None:
        vision_layers_run(self.vision_config.num_hidden_layers, self.feature_layer)
        if self.grid_pinpoints is None:
            if self.image_size is not None:
                raise ValueError(
                    f"image_size={self.image_size}: a {type(self.vision_config).__name__} tower runs at its "
                    f"config's image_size ({self.vision_config.image_size}); image_size is for AnyRes "
                    "(with grid_pinpoints) or Qwen3-VL"
                )
            return
        if self.image_size is None:
            raise ValueError("grid_pinpoints (AnyRes) needs the image's image_size=(height, width) in pixels")
        if self.num_images != 1:
            raise ValueError(f"num_images={self.num_images}: with grid_pinpoints the views come from the layout; use 1")
        self.layout()  # raises on a bad size or pinpoints

    @property
    def feature_layer(self) -> int:
        """The hidden layer a SigLIP/CLIP tower is read at (`vision_feature_layer`, or -2)."""
        return _DEFAULT_FEATURE_LAYER if self.vision_feature_layer is None else self.vision_feature_layer

    @property
    def views(self) -> int:
        """Images the vision tower encodes for the sample: AnyRes's base view and tiles, or `num_images`."""
        layout = self.layout()
        return self.num_images if layout is None else layout.views

    def layout(self, tile_grid: tuple[int, int] | None = None) -> AnyResLayout | None:
        """The AnyRes layout of `image_size` for views of `tile_grid` tokens (default: the
        tower's patch grid); None without `grid_pinpoints`."""
        if self.grid_pinpoints is None:
            return None
        tile = self.vision_config.image_size
        grid = tile_grid or (tile // self.vision_config.patch_size,) * 2
        return anyres_layout(self.image_size, self.grid_pinpoints, tile, grid)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# -- result ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PartProfile:
    """One part's token counts, parameters, multiply-adds and memory."""

    name: str
    tokens_in: int
    tokens_out: int
    params: int
    macs: int
    weight_bytes: int
    kv_cache_bytes: int = 0
    peak_activation_bytes: int = 0
    note: str = ""


@dataclass(frozen=True)
class ProfileResult:
    """The cost of one first-round inference, part by part."""

    name: str
    dtype: str
    visual_tokens: int  # visual tokens the LLM sees, after compression
    query_tokens: int
    text_tokens: int
    lm_head_positions: str
    parts: tuple[PartProfile, ...]

    @property
    def tokens(self) -> int:
        """Visual + query tokens: the paper's "token number"."""
        return self.visual_tokens + self.query_tokens

    @property
    def llm_tokens(self) -> int:
        """Length of the LLM's prefill: visual + query + text tokens."""
        return self.tokens + self.text_tokens

    @property
    def params(self) -> int:
        return sum(part.params for part in self.parts)

    @property
    def macs(self) -> int:
        return sum(part.macs for part in self.parts)

    @property
    def weight_bytes(self) -> int:
        return sum(part.weight_bytes for part in self.parts)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(part.kv_cache_bytes for part in self.parts)

    @property
    def peak_activation_bytes(self) -> int:
        """Parts run one after another, so the peak is the largest part's."""
        return max((part.peak_activation_bytes for part in self.parts), default=0)

    @property
    def memory_bytes(self) -> int:
        """Estimated inference memory: weights + KV cache + peak activations."""
        return self.weight_bytes + self.kv_cache_bytes + self.peak_activation_bytes

    def part(self, name: str) -> PartProfile:
        """The part called `name` (KeyError if there is none)."""
        for part in self.parts:
            if part.name == name:
                return part
        raise KeyError(f"no part named {name!r}; parts are {[part.name for part in self.parts]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the fields, the parts and the totals."""
        out = dataclasses.asdict(self)
        out["parts"] = [dataclasses.asdict(part) for part in self.parts]
        out["totals"] = {
            "tokens": self.tokens,
            "llm_tokens": self.llm_tokens,
            "params": self.params,
            "macs": self.macs,
            "weight_bytes": self.weight_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "peak_activation_bytes": self.peak_activation_bytes,
            "memory_bytes": self.memory_bytes,
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProfileResult":
        """The result `to_dict` wrote (its totals are recomputed, not read)."""
        fields = {field.name for field in dataclasses.fields(cls)} - {"parts"}
        parts = tuple(PartProfile(**part) for part in data["parts"])
        return cls(**{name: data[name] for name in fields}, parts=parts)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        """A per-part table with a total row, preceded by the token budget."""
        header = (
            f"**{self.name}**: {self.visual_tokens} visual + {self.query_tokens} query tokens "
            f"= {self.tokens}; LLM prefill {self.llm_tokens} tokens with {self.text_tokens} text "
            f"tokens; {self.dtype}; LM head on {'the last position' if self.lm_head_positions == 'last' else 'every position'}"
        )
        columns = ["part", "tokens in", "tokens out", "params (M)", "GMACs", "weights (MiB)",
                   "KV cache (MiB)", "peak act. (MiB)", "note"]
        rows = [
            [part.name, str(part.tokens_in), str(part.tokens_out), f"{part.params / 1e6:,.2f}",
             f"{part.macs / 1e9:,.2f}", _mib(part.weight_bytes), _mib(part.kv_cache_bytes),
             _mib(part.peak_activation_bytes), part.note]
            for part in self.parts
        ]
        rows.append(
            ["**total**", "", "", f"{self.params / 1e6:,.2f}", f"{self.macs / 1e9:,.2f}",
             _mib(self.weight_bytes), _mib(self.kv_cache_bytes), _mib(self.peak_activation_bytes),
             f"{self.macs / 1e12:.3f} TMACs; memory estimate {self.memory_bytes / 2**30:.2f} GiB"]
        )
        return "\n".join([header, "", *_markdown_table(columns, rows)])


def compare_markdown(results: Sequence[ProfileResult], paper_tmacs: dict[str, float] | None = None) -> str:
    """One row per result; with `paper_tmacs` (name -> paper "TFLOPs"), the gap to the paper."""
    paper_tmacs = paper_tmacs or {}
    columns = ["model", "tokens", "LLM tokens", "params (B)", "TMACs", "paper", "vs paper",
               "weights (GiB)", "KV cache (MiB)", "peak act. (MiB)", "memory (GiB)"]
    rows = []
    for result in results:
        paper = paper_tmacs.get(result.name)
        tmacs = result.macs / 1e12
        rows.append([
            result.name, str(result.tokens), str(result.llm_tokens), f"{result.params / 1e9:.3f}",
            f"{tmacs:.3f}", "" if paper is None else f"{paper:.2f}",
            "" if paper is None else f"{(tmacs - paper) / paper:+.1%}",
            f"{result.weight_bytes / 2**30:.2f}", _mib(result.kv_cache_bytes),
            _mib(result.peak_activation_bytes), f"{result.memory_bytes / 2**30:.2f}",
        ])
    return "\n".join(_markdown_table(columns, rows))


def savings_markdown(results: Sequence[ProfileResult]) -> str:
    """One row per result, with its multiply-adds split into vision encoder and LLM, and its
    MACs ratio: its uncompressed model's multiply-adds over its own. A result's uncompressed
    model is the result of `results` without a compressor that has the same vision encoder
    (tokens, parameters, multiply-adds) and the same LLM parameters; no ratio without one."""
    columns = ["model", "visual tokens", "LLM tokens", "vision TMACs", "LLM TMACs", "TMACs", "MACs ratio",
               "params (B)", "KV cache (MiB)", "memory (GiB)"]
    uncompressed = {_backbone(r): r for r in results if all(part.name != "compressor" for part in r.parts)}
    rows = []
    for result in results:
        reference = uncompressed.get(_backbone(result))
        llm = sum(part.macs for part in result.parts if part.name in ("LLM prefill", "LM head"))
        rows.append([
            result.name, str(result.visual_tokens), str(result.llm_tokens),
            f"{result.part('vision encoder').macs / 1e12:.3f}", f"{llm / 1e12:.3f}", f"{result.macs / 1e12:.3f}",
            "" if reference is None else f"{reference.macs / result.macs:.2f}x",
            f"{result.params / 1e9:.3f}", _mib(result.kv_cache_bytes), f"{result.memory_bytes / 2**30:.2f}",
        ])
    return "\n".join(_markdown_table(columns, rows))


def _backbone(result: ProfileResult) -> tuple[int, ...]:
    """What a compressor leaves as it is: the vision encoder's run and the LLM's size."""
    vision, llm = result.part("vision encoder"), result.part("LLM prefill")
    return vision.tokens_in, vision.params, vision.macs, llm.params


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f}" if nbytes else "0"


def _markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# -- formulas --------------------------------------------------------------------------
def weight_bytes(params: int, dtype: torch.dtype) -> int:
    """Bytes to hold `params` parameters in `dtype`."""
    return params * dtype.itemsize


def kv_cache_bytes(config: PretrainedConfig, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a full-attention KV cache: 2 * layers * kv_heads * head_dim * tokens * bytes."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * dtype.itemsize


def vision_layers_run(num_layers: int, feature_layer: int) -> int:
    """Encoder layers that run to produce hidden state `feature_layer` (LLaVA's indexing).

    Hidden state 0 is the embeddings and hidden state k the output of layer k, so -1 is
    the last layer's output and -2 the penultimate's: `num_layers - 1` layers run.
    """
    layers = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= layers <= num_layers:
        raise ValueError(
            f"vision_feature_layer={feature_layer} is out of range for an encoder with "
            f"{num_layers} layers; expected -{num_layers + 1} <= layer <= {num_layers}"
        )
    return layers


# -- building and running parts on meta --------------------------------------------------
def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA's projector by name: "linear", "identity" or "mlp{N}x_gelu".

    "mlp2x_gelu" is Linear(in_dim, out_dim) -> GELU -> Linear(out_dim, out_dim).
    """
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"an identity projector needs in_dim == out_dim, got {in_dim} and {out_dim}")
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"unknown projector {kind!r}; expected 'linear', 'identity' or 'mlp<N>x_gelu'")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def _count_params(modules: Sequence[nn.Module], exclude: frozenset[int] = frozenset()) -> int:
    """Parameters of `modules`, each tensor once, leaving out tensors whose id is in `exclude`."""
    seen = set(exclude)
    total = 0
    for param in itertools.chain.from_iterable(module.parameters() for module in modules):
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put `module` in eval mode (no dropout) and restore every submodule's mode after."""
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for sub, training in modes.items():
            sub.training = training


def _on_meta(module: nn.Module, dtype: torch.dtype) -> Callable[..., Any]:
    """Call `module` with meta copies of its parameters and buffers, in `dtype`.

    `functional_call` swaps the tensors for the call only, so a user's module (with real
    weights, on any device) is neither copied nor changed.
    """
    state = {
        name: torch.empty_like(tensor, device="meta", dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
    }

    def call(*args: Any, **kwargs: Any) -> Any:
        with _eval_mode(module):
            return torch.func.functional_call(module, state, args, kwargs)

    return call


def _meta_tensor(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def _build_on_meta(build: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        module = build()
    return module.to(dtype).eval()


def _with_attention(config: PretrainedConfig, attn_implementation: str, **changes: Any) -> PretrainedConfig:
    """A copy of `config` with `changes` and the attention implementation set."""
    config = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(config, key, value)
    config._attn_implementation = attn_implementation
    return config


class _VisionTrunk(nn.Module):
    """The part of a HF vision tower that runs up to a hidden layer: embeddings (and
    CLIP's pre-layernorm) and the first layers of the encoder."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.embeddings = tower.embeddings
        pre_norm = getattr(tower, "pre_layrnorm", None)  # CLIP has one, SigLIP does not
        self.pre_norm = nn.Identity() if pre_norm is None else pre_norm
        self.encoder = tower.encoder

    @property
    def has_cls_token(self) -> bool:
        return self.embeddings.num_positions > self.embeddings.num_patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.pre_norm(self.embeddings(pixel_values))
        return self.encoder(inputs_embeds=hidden).last_hidden_state


@dataclass(frozen=True)
class _VisionFeatures:
    raw: torch.Tensor  # (views, tokens, dim): what the compressor and EmbQ read
    grid: tuple[int, int]
    # Qwen3-VL's DeepStack features, each shaped as `raw`: they go through the compressor
    # and the projector with it (the LLM adds them at the visual positions).
    deepstack: tuple[torch.Tensor, ...] = ()


def _profile_vision(spec: ProfileSpec) -> tuple[PartProfile, _VisionFeatures]:
    if isinstance(spec.vision_config, Qwen3VLVisionConfig):
        return _profile_qwen3_vl_vision(spec)
    return _profile_vit(spec)


def _measured_part(
    name: str, tokens_in: int, tokens_out: int, params: int, cost: Measurement, dtype: torch.dtype, note: str
) -> PartProfile:
    """A part that holds no cache: its measured multiply-adds and peak, its weights in `dtype`."""
    return PartProfile(
        name=name,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        params=params,
        macs=cost.macs,
        weight_bytes=weight_bytes(params, dtype),
        peak_activation_bytes=cost.peak_bytes,
        note=note,
    )


def _profile_vit(spec: ProfileSpec) -> tuple[PartProfile, _VisionFeatures]:
    """A SigLIP/CLIP tower up to its feature layer, on every view of the sample."""
    config = spec.vision_config
    layers = vision_layers_run(config.num_hidden_layers, spec.feature_layer)
    config = _with_attention(config, spec.attn_implementation, num_hidden_layers=layers)
    trunk = _VisionTrunk(_build_on_meta(lambda: _VISION_MODELS[type(config)](config), spec.dtype))
    views = spec.views
    pixels = _meta_tensor(views, config.num_channels, config.image_size, config.image_size, dtype=spec.dtype)
    hidden, cost = measure(trunk, pixels)
    side = config.image_size // config.patch_size
    if trunk.has_cls_token and spec.vision_feature_select == "patch":
        hidden = hidden[:, 1:]
    note = f"{views} x {layers}/{spec.vision_config.num_hidden_layers} layers"
    if spec.grid_pinpoints is not None:
        layout = spec.layout()
        note += f" (base view + {layout.tiles[0]}x{layout.tiles[1]} tiles of a {_size(spec.image_size)} px image)"
    part = _measured_part("vision encoder", views * trunk.embeddings.num_positions, views * hidden.shape[1],
                          _count_params([trunk]), cost, spec.dtype, note)
    return part, _VisionFeatures(raw=hidden, grid=(side, side))


def _profile_qwen3_vl_vision(spec: ProfileSpec) -> tuple[PartProfile, _VisionFeatures]:
    """Qwen3-VL's whole tower (ViT, merger, DeepStack mergers) on `image_size` images."""
    config = _with_attention(spec.vision_config, spec.attn_implementation)
    tower = _build_on_meta(lambda: Qwen3VLVisionModel(config), spec.dtype)
    pixels, grid_thw = profile_qwen3_vl.vision_inputs(config, spec.image_size, spec.num_images, spec.dtype)
    run = profile_qwen3_vl.run_vision(tower, pixels, grid_thw)
    height, width = profile_qwen3_vl.patch_grid(config, spec.image_size)
    note = (
        f"{spec.num_images} x {config.depth} layers + merger + {len(run.deepstack)} DeepStack mergers; "
        f"{_size(spec.image_size)} px, {height}x{width} patches"
    )
    part = _measured_part("vision encoder", pixels.shape[0], run.merged.shape[0] * run.merged.shape[1],
                          _count_params([tower]), run.cost, spec.dtype, note)
    grid = profile_qwen3_vl.merged_grid(config, spec.image_size)
    return part, _VisionFeatures(raw=run.merged, grid=grid, deepstack=run.deepstack)


def _size(image_size: tuple[int, int]) -> str:
    return f"{image_size[0]}x{image_size[1]}"


def _profile_module(
    name: str, module: nn.Module, dtype: torch.dtype, *inputs: Any, note: str = ""
) -> tuple[PartProfile, torch.Tensor]:
    """Run a small module (compressor, projector, EmbQ) on meta and describe its cost."""
    out, cost = measure(_on_meta(module, dtype), *inputs)
    tokens = out[0] if isinstance(out, tuple) else out
    tokens_in = sum(t.shape[0] * t.shape[1] for t in inputs if isinstance(t, torch.Tensor))
    tokens_out = tokens.shape[0] * tokens.shape[1]
    part = _measured_part(name, tokens_in, tokens_out, _count_params([module]), cost, dtype, note)
    return part, tokens


def _layout_part(layout: AnyResLayout, tokens_in: int, text_dim: int, dtype: torch.dtype) -> PartProfile:
    """LLaVA-NeXT's packing of the projected views: no multiply-adds; one learned
    `image_newline` vector of the LLM's width."""
    (rows, cols), (height, width) = layout.tiles, layout.picture
    return PartProfile(
        name="AnyRes layout",
        tokens_in=tokens_in,
        tokens_out=layout.tokens,
        params=text_dim,
        macs=0,
        weight_bytes=weight_bytes(text_dim, dtype),
        note=f"base view {layout.tile_grid[0]}x{layout.tile_grid[1]} + {rows}x{cols} tiles joined and unpadded "
        f"to {height}x{width}, + {layout.newlines} newline tokens",
    )


def _profile_llm(spec: ProfileSpec, sequence: int) -> list[PartProfile]:
    """The decoder's prefill over `sequence` tokens, then the LM head."""
    config = _with_attention(spec.text_config, spec.attn_implementation)
    model = _build_on_meta(lambda: AutoModelForCausalLM.from_config(config), spec.dtype)
    decoder, head = model.base_model, model.get_output_embeddings()
    embeds = _meta_tensor(1, sequence, config.hidden_size, dtype=spec.dtype)
    # Prefill with a cache, as `generate` does; it also keeps transformers from inspecting
    # position ids for packed sequences, which needs real values.
    cache = DynamicCache(config=config)
    hidden, cost = measure(decoder, inputs_embeds=embeds, use_cache=True, **cache_argument(cache))
    kv_bytes = kv_cache_bytes(config, sequence, spec.dtype)
    decoder_params = _count_params([decoder])
    # The cache grows layer by layer and is whole at the last layer, where the working set
    # peaks; what is left after taking it out is the activations.
    llm = PartProfile(
        name="LLM prefill",
        tokens_in=sequence,
        tokens_out=sequence,
        params=decoder_params,
        macs=cost.macs,
        weight_bytes=weight_bytes(decoder_params, spec.dtype),
        kv_cache_bytes=kv_bytes,
        peak_activation_bytes=max(cost.peak_bytes - kv_bytes, 0),
        note=f"{config.num_hidden_layers} layers, includes the {config.vocab_size}-token embedding table",
    )
    positions = 1 if spec.lm_head_positions == "last" else sequence
    _, head_cost = measure(head, hidden.last_hidden_state[:, -positions:])
    head_params = _count_params([head], exclude=frozenset(id(p) for p in decoder.parameters()))
    note = ("last position" if positions == 1 else f"all {positions} positions") + (
        "; tied to the embedding table" if head_params == 0 else "")
    lm_head = _measured_part("LM head", positions, positions, head_params, head_cost, spec.dtype, note)
    return [llm, lm_head]


def profile_model(spec: ProfileSpec) -> ProfileResult:
    """Count tokens, parameters, multiply-adds and memory of one first-round inference."""
    text_dim = spec.text_config.hidden_size
    vision_part, features = _profile_vision(spec)
    parts = [vision_part]

    # Qwen3-VL's DeepStack levels go through the compressor and the projector with the
    # merged tokens, stacked after them as more images.
    levels = 1 + len(features.deepstack)
    tokens = torch.cat((features.raw, *features.deepstack)) if levels > 1 else features.raw
    deepstack = f"; also on the {levels - 1} DeepStack levels" if levels > 1 else ""
    grid = out_grid = features.grid
    if spec.compressor is not None:
        if tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError("a compressor needs patch tokens on a grid; use vision_feature_select='patch'")
        part, tokens = _profile_module(
            "compressor", spec.compressor, spec.dtype, tokens, grid,
            note=f"{type(spec.compressor).__name__}, per image{deepstack}",
        )
        parts.append(part)
        out_grid = tuple(spec.compressor.out_grid(grid))
    # One sample: the images' tokens side by side in one sequence (one per DeepStack level).
    tokens = tokens.reshape(levels, -1, tokens.shape[-1])
    visual_tokens = tokens.shape[1]

    projector = spec.projector
    if isinstance(projector, str):
        kind = projector
        projector = _build_on_meta(lambda: build_projector(kind, tokens.shape[-1], text_dim), spec.dtype)
    part, _ = _profile_module(
        "projector", projector, spec.dtype, tokens,
        note=(spec.projector if isinstance(spec.projector, str) else type(projector).__name__) + deepstack,
    )
    parts.append(part)

    layout = spec.layout(out_grid)
    if layout is not None:
        parts.append(_layout_part(layout, visual_tokens, text_dim, spec.dtype))
        visual_tokens = layout.tokens

    query_tokens = 0
    if spec.embq is not None:
        query_tokens = spec.embq.num_queries
        instruction = spec.text_tokens if spec.embq.instruction_tokens is None else spec.embq.instruction_tokens
        raw = features.raw.reshape(1, -1, features.raw.shape[-1])  # every image's raw tokens
        part, _ = _profile_module(
            "EmbQ", spec.embq.module, spec.dtype,
            _meta_tensor(1, query_tokens, text_dim, dtype=spec.dtype),
            _meta_tensor(1, instruction, text_dim, dtype=spec.dtype),
            raw,
            note=f"{query_tokens} queries at layer {spec.embq.layer}; reads {instruction} text + {raw.shape[1]} raw visual tokens",
        )
        parts.append(part)

    parts += _profile_llm(spec, visual_tokens + query_tokens + spec.text_tokens)
    return ProfileResult(
        name=spec.name,
        dtype=str(spec.dtype).removeprefix("torch."),
        visual_tokens=visual_tokens,
        query_tokens=query_tokens,
        text_tokens=spec.text_tokens,
        lm_head_positions=spec.lm_head_positions,
        parts=tuple(parts),
    )
