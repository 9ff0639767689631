"""The paper's configurations, and larger models with our compressors, as `ProfileSpec`s,
and the paper's own figures to compare with.

    preset("flashsloth", text_tokens=64)            # SAP 81 + 9 EmbQ queries = 90 tokens
    preset("flashsloth", num_queries=6)             # Table 3's query ablation, named "flashsloth/q=6"
    preset("qwen3-vl-2b/sap", image_size=(1024, 1024))   # named "qwen3-vl-2b/sap@1024x1024"
    [preset(name) for name in PRESET_GROUPS["all"]]

Sizes are the released checkpoints' (see `/work/shared/spec/flashsloth-reference.md`, and
docs/benchmarks.md for LLaVA-NeXT and Qwen3-VL); compressors and EmbQ are built on the
`meta` device, so a preset costs no memory. `PRESET_GROUPS` names sets of presets: "all"
is the paper's six (the recorded results are made with it), "llava-next" and "qwen3-vl"
each model uncompressed and with AvgPool(2), SAP (window 2) and PixelShuffle(2), which all
keep a quarter of the tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, PhiConfig, Qwen3Config, Qwen3VLVisionConfig
from transformers import SiglipVisionConfig

from .anyres import LLAVA_NEXT_PINPOINTS
from .avgpool import AvgPool
from .embq import EmbQ
from .pixel_shuffle import PixelShuffle
from .profile import EmbQSpec, ProfileSpec
from .sap import SAP

__all__ = ["PRESETS", "PRESET_GROUPS", "PAPER_TFLOPS", "PaperFigure", "preset", "siglip_so400m_384",
           "clip_vit_l14_336", "phi_2", "llama_7b", "qwen3_vl_vision", "qwen3_vl_2b_text", "qwen3_vl_4b_text",
           "llava_next_7b", "qwen3_vl", "LLAVA_NEXT_IMAGE", "QWEN3_VL_IMAGE"]


# -- backbones -------------------------------------------------------------------------
def siglip_so400m_384() -> SiglipVisionConfig:
    """SigLIP so400m, patch 14 at 384 px: 27 x 27 = 729 tokens of width 1152."""
    return SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        patch_size=14, image_size=384,
    )


def clip_vit_l14_336() -> CLIPVisionConfig:
    """CLIP ViT-L/14 at 336 px (LLaVA-1.5): 24 x 24 = 576 patch tokens + CLS, width 1024."""
    return CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        patch_size=14, image_size=336, projection_dim=768,
    )


def phi_2() -> PhiConfig:
    """phi-2 (2.7B): FlashSloth's LLM."""
    return PhiConfig(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
        vocab_size=51200, partial_rotary_factor=0.4,
    )


def llama_7b() -> LlamaConfig:
    """A 7B Llama (Vicuna-7B, LLaVA-1.5-7B's LLM)."""
    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )


def qwen3_vl_vision(out_hidden_size: int) -> Qwen3VLVisionConfig:
    """Qwen3-VL-2B's and -4B's ViT: 24 layers of width 1024, patch 16, 2x2 merge to the
    LLM's width `out_hidden_size`, DeepStack mergers after layers 5, 11 and 17."""
    return Qwen3VLVisionConfig(
        depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, temporal_patch_size=2,
        spatial_merge_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
        out_hidden_size=out_hidden_size,
    )


# Qwen3-VL's text model is Qwen3's decoder (q/k RMSNorm, grouped-query attention) with
# mRoPE, which changes no matmul, and DeepStack's additions, which are adds: a Qwen3
# config of the same sizes gives the same multiply-adds, parameters and cache.
def qwen3_vl_2b_text() -> Qwen3Config:
    """Qwen3-VL-2B's language model (1.7B), as a Qwen3 of its sizes; tied LM head."""
    return Qwen3Config(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    )


def qwen3_vl_4b_text() -> Qwen3Config:
    """Qwen3-VL-4B's language model, as a Qwen3 of its sizes; tied LM head."""
    return Qwen3Config(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    )


# -- FlashSloth family (SigLIP so400m penultimate layer + phi-2) --------------------------
def _embq(num_queries: int) -> EmbQSpec | None:
    if num_queries == 0:
        return None  # Table 3's "0 queries" row is SAP alone
    with torch.device("meta"):
        module = EmbQ(text_dim=2560, vision_dim=1152)
    return EmbQSpec(module, num_queries=num_queries, layer=8)


def _sap() -> SAP:
    with torch.device("meta"):
        return SAP(1152, window=3)


def baseline(text_tokens: int = 64) -> ProfileSpec:
    """SigLIP + phi-2 without compression: 729 visual tokens."""
    return ProfileSpec(siglip_so400m_384(), phi_2(), text_tokens=text_tokens, name="baseline")


def avgpool(text_tokens: int = 64) -> ProfileSpec:
    """3 x 3 average pooling: 81 visual tokens (Table 3, "Avg.Pool")."""
    return ProfileSpec(siglip_so400m_384(), phi_2(), text_tokens=text_tokens, compressor=AvgPool(3), name="avgpool")


def sap(text_tokens: int = 64) -> ProfileSpec:
    """SAP, window 3: 81 visual tokens, no EmbQ (Table 3, "Att.Pool", and "0 queries")."""
    return ProfileSpec(siglip_so400m_384(), phi_2(), text_tokens=text_tokens, compressor=_sap(), name="sap")


def flashsloth(text_tokens: int = 64, num_queries: int = 9) -> ProfileSpec:
    """SAP 81 + EmbQ with `num_queries` queries at the 8th layer (paper: 9, 90 tokens)."""
    return ProfileSpec(
        siglip_so400m_384(), phi_2(), text_tokens=text_tokens, compressor=_sap(), embq=_embq(num_queries),
        name="flashsloth" if num_queries == 9 else f"flashsloth/q={num_queries}",
    )


def flashsloth_hd(text_tokens: int = 64, num_queries: int = 9) -> ProfileSpec:
    """5 tiles of 384 px (thumbnail + 4) x 81 = 405 visual tokens + 9 queries; EmbQ reads 5 x 729."""
    return ProfileSpec(
        siglip_so400m_384(), phi_2(), text_tokens=text_tokens, num_images=5, compressor=_sap(),
        embq=_embq(num_queries),
        name="flashsloth-hd" if num_queries == 9 else f"flashsloth-hd/q={num_queries}",
    )


def llava_1_5_7b(text_tokens: int = 64) -> ProfileSpec:
    """CLIP ViT-L/14-336 penultimate layer, CLS dropped: 576 tokens, mlp2x_gelu, Llama 7B."""
    return ProfileSpec(clip_vit_l14_336(), llama_7b(), text_tokens=text_tokens, name="llava-1.5-7b")


# -- larger models, uncompressed and with each compressor at a quarter of the tokens ----------
_VARIANTS = ("", "avgpool2", "sap", "pixelshuffle")


def _compressor(variant: str, dim: int) -> nn.Module | None:
    """The variant's compressor for tokens of width `dim`, on meta (None: uncompressed)."""
    if variant not in _VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(_VARIANTS)} ('' is uncompressed)")
    with torch.device("meta"):
        if variant == "avgpool2":
            return AvgPool(2)
        if variant == "sap":
            return SAP(dim, window=2)
        if variant == "pixelshuffle":
            return PixelShuffle(2, pad=True)  # 4 x the width: a new projector follows
    return None


def _preset_name(model: str, variant: str) -> str:
    return f"{model}/{variant}" if variant else model


def _sized(name: str, image_size: tuple[int, int], default_size: tuple[int, int]) -> str:
    """`name`, with the image size appended when it is not the preset's default."""
    return name if image_size == default_size else f"{name}@{image_size[0]}x{image_size[1]}"


LLAVA_NEXT_IMAGE = (672, 672)  # a square image: 2x2 tiles + the base view


def llava_next_7b(
    variant: str = "", text_tokens: int = 64, image_size: tuple[int, int] = LLAVA_NEXT_IMAGE
) -> ProfileSpec:
    """llava-v1.6-vicuna-7b: CLIP ViT-L/14-336 (penultimate layer, CLS dropped) on the base
    view and AnyRes tiles of `image_size`, each compressed on its 24x24 grid; mlp2x_gelu
    (from the compressor's width); Vicuna-7B."""
    return ProfileSpec(
        clip_vit_l14_336(), llama_7b(), text_tokens=text_tokens, image_size=tuple(image_size),
        grid_pinpoints=LLAVA_NEXT_PINPOINTS, compressor=_compressor(variant, 1024),
        name=_sized(_preset_name("llava-next-7b", variant), tuple(image_size), LLAVA_NEXT_IMAGE),
    )


QWEN3_VL_IMAGE = (512, 512)  # a benchmark photo's area (a 640x480 photo is 0.31 MP): 256 tokens
_QWEN3_VL_TEXT: dict[str, Callable[[], Qwen3Config]] = {
    "qwen3-vl-2b": qwen3_vl_2b_text,
    "qwen3-vl-4b": qwen3_vl_4b_text,
}


def qwen3_vl(
    model: str, variant: str = "", text_tokens: int = 64, image_size: tuple[int, int] = QWEN3_VL_IMAGE
) -> ProfileSpec:
    """Qwen3-VL-2B or -4B (`model`) on one image of `image_size`: the compressor runs on the
    merged grid (and the DeepStack levels); a widening one gets a new mlp2x_gelu projector
    back to the LLM's width, the others none (the merger already projects)."""
    if model not in _QWEN3_VL_TEXT:
        raise ValueError(f"unknown Qwen3-VL model {model!r}; expected one of {list(_QWEN3_VL_TEXT)}")
    text = _QWEN3_VL_TEXT[model]()
    compressor = _compressor(variant, text.hidden_size)
    widens = compressor is not None and compressor.out_dim(text.hidden_size) != text.hidden_size
    return ProfileSpec(
        qwen3_vl_vision(text.hidden_size), text, text_tokens=text_tokens, image_size=tuple(image_size),
        compressor=compressor, projector="mlp2x_gelu" if widens else "identity",
        name=_sized(_preset_name(model, variant), tuple(image_size), QWEN3_VL_IMAGE),
    )


_PAPER: dict[str, Callable[..., ProfileSpec]] = {
    "baseline": baseline,
    "avgpool": avgpool,
    "sap": sap,
    "flashsloth": flashsloth,
    "flashsloth-hd": flashsloth_hd,
    "llava-1.5-7b": llava_1_5_7b,
}
_FAMILIES: dict[str, dict[str, Callable[..., ProfileSpec]]] = {
    "llava-next": {_preset_name("llava-next-7b", v): functools.partial(llava_next_7b, v) for v in _VARIANTS},
    "qwen3-vl": {_preset_name(model, v): functools.partial(qwen3_vl, model, v)
                 for model in _QWEN3_VL_TEXT for v in _VARIANTS},
}
PRESETS: dict[str, Callable[..., ProfileSpec]] = {
    **_PAPER, **{name: build for family in _FAMILIES.values() for name, build in family.items()},
}
PRESET_GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(_PAPER),  # the paper's models; the recorded results of `--preset all` are these
    **{group: tuple(family) for group, family in _FAMILIES.items()},
}


def preset(name: str, text_tokens: int = 64, **options: Any) -> ProfileSpec:
    """The `ProfileSpec` of preset `name`; `options` such as `num_queries` (FlashSloth) or
    `image_size` (LLaVA-NeXT, Qwen3-VL) go to its builder."""
    try:
        build = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {list(PRESETS)}") from None
    try:
        return build(text_tokens=text_tokens, **options)
    except TypeError as error:
        raise ValueError(f"preset {name!r} does not take {sorted(options)}: {error}") from None


# -- the paper's figures -----------------------------------------------------------------
@dataclass(frozen=True)
class PaperFigure:
    """A first-round "TFLOPs" figure of the paper (in fact multiply-adds) and where it is."""

    tflops: float
    source: str


PAPER_TFLOPS: dict[str, PaperFigure] = {
    "baseline": PaperFigure(2.40, "Table 3; Table 1, IMP-3B (same backbone), every task"),
    "avgpool": PaperFigure(0.40, "Table 3, Avg.Pool (81)"),
    "sap": PaperFigure(0.48, "Table 3, Att.Pool (81)"),
    "flashsloth": PaperFigure(0.72, "Table 3; Table 1, MME (0.64-0.80 by task)"),
    "flashsloth/q=0": PaperFigure(0.48, "Table 3, 0 queries"),
    "flashsloth/q=6": PaperFigure(0.64, "Table 3, 6 queries"),
    "flashsloth/q=12": PaperFigure(0.80, "Table 3, 12 queries"),
    "flashsloth/q=15": PaperFigure(0.88, "Table 3, 15 queries"),
    "flashsloth-hd": PaperFigure(2.72, "Table 1, MME (1.98-2.83 by task)"),
    "llava-1.5-7b": PaperFigure(4.43, "Table 1, MME (4.40-4.77 by task)"),
}
