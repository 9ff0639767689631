"""The model families the grafts support: one row per family, found from the model.

As peft's per-model target tables: each row says, for the `config.model_type` values of
one family, where its vision features leave the vision tower, where the projector is,
how its processor counts and writes image placeholders, how positions are assigned,
which decoder layers EmbQ can wrap, and which functions graft and load its compressor and
EmbQ. `graft_compressor`, `graft_embq`, `load_compressor_graft`, `load_embq_graft` and
`save_grafted` / `load_grafted` (`grafting`, `embq_io`, `grafts_io`) look the family up
here and know no family themselves.

Adding a family: one module with its compressor graft (and loader) and, if the shared
EmbQ graft (`embq.graft_embq_onto`) needs a family-specific vision router or prompt, its
EmbQ graft; then one `Family` row in `FAMILIES`. `docs/adapters.md` walks through it.
The paths in a row are checked against the grafts by `tests/adapters/test_families.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ._llava_parts import LLAVA_CLASSES, PROJECTOR_PATH, llava_core
from ._qwen2_vl_parts import QWEN2_VL_CLASSES, qwen2_vl_core
from .compressor_graft import CompressorGraft, graft_llava_compressor
from .compressor_graft_io import load_llava_compressor_graft
from .embq import EmbQGraft, graft_llava_embq
from .llava_next import LLAVA_NEXT_CLASSES, LlavaNextCompressorGraft, graft_llava_next_compressor
from .internvl import INTERNVL_CLASSES, InternVLCompressorGraft, graft_internvl_compressor, internvl_core
from .internvl import load_internvl_compressor_graft
from .internvl_embq import InternVLEmbQGraft, graft_internvl_embq
from .llava_next import llava_next_core, load_llava_next_compressor_graft
from .llava_next_embq import AnyresEmbQGraft, graft_anyres_embq
from .llava_onevision import LLAVA_ONEVISION_CLASSES, LlavaOnevisionCompressorGraft
from .llava_onevision import graft_llava_onevision_compressor, llava_onevision_core, load_llava_onevision_compressor_graft
from .qwen2_vl import MERGER_PATH, Qwen2VLCompressorGraft, graft_qwen2_vl_compressor
from .qwen2_vl_embq import Qwen2VLEmbQGraft, graft_qwen2_vl_embq
from .qwen2_vl_io import load_qwen2_vl_compressor_graft
from .qwen3_vl import QWEN3_VL_CLASSES, Qwen3VLCompressorGraft, Qwen3VLEmbQGraft, graft_qwen3_vl_compressor
from .qwen3_vl import graft_qwen3_vl_embq, load_qwen3_vl_compressor_graft, qwen3_vl_core

__all__ = ["Family", "FAMILIES", "family_of", "embq_family_of", "supported_model_types"]


@dataclass(frozen=True)
class Family:
    """One supported model family: what the grafts need to know of it.

    Attributes:
        name: for messages and the docs.
        model_types: the `config.model_type` values it covers.
        model_classes: the transformers classes it takes (with and without the LM head).
        core: `core(model, caller)`, the multimodal core (the model without the LM head).
        vision_features: where the features a compressor and EmbQ read leave the tower.
        projector: the path, from the core, of the module a compressor graft wraps.
        placeholders: how the processor counts and writes each image's placeholders.
        positions: "1-D" (one position per token) or "mRoPE" (3-D rotary: t, h, w).
        decoder_layers: the path, from the core, of the decoder layers EmbQ can wrap.
        graft_compressor, load_compressor, graft_embq: the family's graft functions,
            with the signatures of the public ones; graft_embq None: no EmbQ graft yet.
        compressor_graft, embq_graft: the handle classes they return (embq_graft None
            with graft_embq).
    """

    name: str
    model_types: tuple[str, ...]
    model_classes: tuple[type[nn.Module], ...]
    core: Callable[[nn.Module, str], nn.Module]
    vision_features: str
    projector: str
    placeholders: str
    positions: Literal["1-D", "mRoPE"]
    decoder_layers: str
    graft_compressor: Callable[..., Any]
    load_compressor: Callable[..., Any]
    graft_embq: Callable[..., Any] | None
    compressor_graft: type
    embq_graft: type | None


LLAVA = Family(
    name="LLaVA",
    model_types=("llava",),
    model_classes=LLAVA_CLASSES,
    core=llava_core,
    vision_features=(
        "the vision tower's `vision_feature_layer` hidden states, CLS dropped under the 'default' "
        "strategy: what `get_image_features` hands the projector, (num_images, H*W, C) on one grid"
    ),
    projector=PROJECTOR_PATH,
    placeholders=(
        "`LlavaProcessor.replace_image_token`: the same count for every image, moved by the "
        "processor's `num_additional_image_tokens` (and the config's `image_seq_length`)"
    ),
    positions="1-D",
    decoder_layers="language_model.layers",
    graft_compressor=graft_llava_compressor,
    load_compressor=load_llava_compressor_graft,
    graft_embq=graft_llava_embq,
    compressor_graft=CompressorGraft,
    embq_graft=EmbQGraft,
)

QWEN2_VL = Family(
    name="Qwen2-VL / Qwen2.5-VL",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    model_classes=QWEN2_VL_CLASSES,
    core=qwen2_vl_core,
    vision_features=(
        "the patch merger's output: per image t * (h/m) * (w/m) merged tokens of the LLM's width, "
        "row-major, each image on its own grid (`image_grid_thw`)"
    ),
    projector=MERGER_PATH,
    placeholders=(
        "the processor's `replace_image_token` writes each image's count from its `image_grid_thw` row; "
        "`_get_num_multimodal_tokens` answers the same from image sizes"
    ),
    positions="mRoPE",
    decoder_layers="language_model.layers",
    graft_compressor=graft_qwen2_vl_compressor,
    load_compressor=load_qwen2_vl_compressor_graft,
    graft_embq=graft_qwen2_vl_embq,
    compressor_graft=Qwen2VLCompressorGraft,
    embq_graft=Qwen2VLEmbQGraft,
)

LLAVA_NEXT = Family(
    name="LLaVA-NeXT",
    model_types=("llava_next",),
    model_classes=LLAVA_NEXT_CLASSES,
    core=llava_next_core,
    vision_features=(
        "as LLaVA's, for the base view and every AnyRes tile: (num_views, H*W, C), each view on the "
        "vision grid; `pack_image_features` then joins the tiles, unpads them and adds newlines"
    ),
    projector=PROJECTOR_PATH,
    placeholders=(
        "the processor's `_get_number_of_features`, from each image's size and the tile grid "
        "(`replace_image_token` and `_get_num_multimodal_tokens` both ask it)"
    ),
    positions="1-D",
    decoder_layers="language_model.layers",
    graft_compressor=graft_llava_next_compressor,
    load_compressor=load_llava_next_compressor_graft,
    graft_embq=graft_anyres_embq,
    compressor_graft=LlavaNextCompressorGraft,
    embq_graft=AnyresEmbQGraft,
)

LLAVA_ONEVISION = Family(
    name="LLaVA-OneVision",
    model_types=("llava_onevision",),
    model_classes=LLAVA_ONEVISION_CLASSES,
    core=llava_onevision_core,
    vision_features=(
        "as LLaVA-NeXT's, for the base view and every AnyRes tile, and for every video frame "
        "(`get_video_features`, then pooled 2x); SigLIP: no CLS token, the 'full' strategy"
    ),
    projector=PROJECTOR_PATH,
    placeholders=(
        "the processor's `num_image_tokens` (the tokens of one view): `_get_number_of_features` (tiles, "
        "unpadding, the anyres_max cap), multi-image prompts and `replace_video_token` all count from it"
    ),
    positions="1-D",
    decoder_layers="language_model.layers",
    graft_compressor=graft_llava_onevision_compressor,
    load_compressor=load_llava_onevision_compressor_graft,
    graft_embq=graft_anyres_embq,
    compressor_graft=LlavaOnevisionCompressorGraft,
    embq_graft=AnyresEmbQGraft,
)

INTERNVL = Family(
    name="InternVL",
    model_types=("internvl",),
    model_classes=INTERNVL_CLASSES,
    core=internvl_core,
    vision_features=(
        "each tile's (and thumbnail's, each video frame's) vision features, CLS dropped, pixel-shuffled by "
        "`downsample_ratio`: (num_tiles, (H*r)*(W*r), C/r^2), what `multi_modal_projector` gets"
    ),
    projector=PROJECTOR_PATH,
    placeholders="the processor's `image_seq_length` tokens per tile (and the config's), times each image's tiles",
    positions="1-D",
    decoder_layers="language_model.layers",
    graft_compressor=graft_internvl_compressor,
    load_compressor=load_internvl_compressor_graft,
    graft_embq=graft_internvl_embq,
    compressor_graft=InternVLCompressorGraft,
    embq_graft=InternVLEmbQGraft,
)

QWEN3_VL = Family(
    name="Qwen3-VL",
    model_types=("qwen3_vl",),
    model_classes=QWEN3_VL_CLASSES,
    core=qwen3_vl_core,
    vision_features=(
        "as Qwen2-VL's: each image's merged tokens on its own grid; plus the DeepStack features (one merged "
        "map per `deepstack_visual_indexes` block, split per image), added to the image tokens' hidden states"
    ),
    projector=MERGER_PATH,
    placeholders=(
        "as Qwen2-VL's: `replace_image_token` from each image's `image_grid_thw` row; "
        "`_get_num_multimodal_tokens` answers the same from image sizes"
    ),
    positions="mRoPE",
    decoder_layers="language_model.layers",
    graft_compressor=graft_qwen3_vl_compressor,
    load_compressor=load_qwen3_vl_compressor_graft,
    graft_embq=graft_qwen3_vl_embq,
    compressor_graft=Qwen3VLCompressorGraft,
    embq_graft=Qwen3VLEmbQGraft,
)

#: Every supported family, one row each.
FAMILIES: tuple[Family, ...] = (LLAVA, QWEN2_VL, LLAVA_NEXT, LLAVA_ONEVISION, INTERNVL, QWEN3_VL)


def supported_model_types() -> list[str]:
    """The `config.model_type` values some family covers."""
    return [model_type for family in FAMILIES for model_type in family.model_types]


def family_of(model: Any, caller: str) -> Family:
    """The family of `model` (a transformers model with or without its LM head).

    Raises:
        TypeError: naming `caller`, the model's class and type, and every supported one.
    """
    for family in FAMILIES:
        if isinstance(model, family.model_classes):
            return family
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = "; ".join(
        f"{family.name}: {', '.join(cls.__name__ for cls in family.model_classes)} "
        f"(model_type {', '.join(repr(t) for t in family.model_types)})"
        for family in FAMILIES
    )
    raise TypeError(
        f"{caller} supports these models: {supported}; got {type(model).__name__} "
        f"(model_type {model_type!r})"
    )


def embq_family_of(model: Any, caller: str) -> Family:
    """`family_of(model)`, which must have an EmbQ graft (TypeError naming those that do)."""
    family = family_of(model, caller)
    if family.graft_embq is None:
        with_embq = ", ".join(f.name for f in FAMILIES if f.graft_embq is not None)
        raise TypeError(
            f"{caller} does not support {family.name} models yet ({type(model).__name__}); EmbQ grafts "
            f"onto {with_embq}. Compressor grafts: every family in adapters.FAMILIES"
        )
    return family
