"""Graft a visual-token compressor, and EmbQ, onto Qwen3-VL, removably.

    graft = graft_compressor(model, AvgPool(2), processor=processor)    # dispatches here
    queries = graft_embq(model, EmbQ(width, width), layer=8, tokenizer=processor.tokenizer)
    model.generate(**inputs)   # each image gives a quarter of its merged tokens
    queries.remove(); graft.remove()   # the model and processor exactly as before

Qwen3-VL keeps Qwen2-VL's layout (`qwen2_vl`): the vision tower ends with a patch merger
(`visual.merger`), every image has its own grid (`image_grid_thw`), the core's
`get_rope_index` lays out the 3-D rotary positions from those grids, and the processor's
`replace_image_token` writes t * (h/m) * (w/m) placeholders per image. So both grafts are
Qwen2-VL's (`graft_merger_compressor`, `graft_merged_tokens_embq`): the merger wrapped,
`get_image_features` and `get_rope_index` overridden on the core, the processor's
`replace_image_token` and `_get_num_multimodal_tokens` on the processor. Two things differ:

- **DeepStack.** The tower also gives, for each of `deepstack_visual_indexes`, the merged
  features of an intermediate ViT block (`deepstack_features`: one list per level, split
  per image as the main tokens are), and the language model adds level i's feature k to
  the hidden state of image token k after decoder layer i. So every level must be
  compressed exactly as the image tokens are: the graft runs the *same* compressor module
  (same weights, and the same new projector if there is one) on each level's features of
  each image, on the same merged grid. Every shipped compressor maps a fixed window of the
  grid to each output token (AvgPool's mean, SAP's weighted sum, PixelShuffle's 2x2 fold,
  LDP's strided convolutions), so compressed token k and level feature k cover the same
  window. SAP's weights within a window come from the features it pools (its score MLP
  runs on the level's own features): SAP is an attention pooling over windows, and any
  feature map of the grid can be pooled with it. A compressor that picks tokens by their
  content would pick different ones per level; none is shipped, and one would need to
  hand its picks over to be applied to every level.
- **Videos.** `get_video_features` calls `get_image_features`, which the graft overrides;
  the graft makes it call the class's own, so videos pass through uncompressed, as on
  Qwen2-VL (their placeholders and positions stay transformers').

EmbQ reads each image's merged tokens as the tower outputs them (uncompressed, the LLM's
width), as on Qwen2-VL; the DeepStack features are not EmbQ's input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel
from transformers.utils.generic import accepts_precomputed_kwargs

from tokencompress.base import TokenCompressor

from .qwen2_vl import Qwen2VLCompressorGraft, graft_merger_compressor
from .qwen2_vl_embq import Qwen2VLEmbQGraft, graft_merged_tokens_embq
from .qwen2_vl_io import load_merger_compressor_graft

__all__ = [
    "QWEN3_VL_CLASSES",
    "RECORD_FORMAT",
    "Qwen3VLCompressorGraft",
    "Qwen3VLEmbQGraft",
    "graft_qwen3_vl_compressor",
    "graft_qwen3_vl_embq",
    "load_qwen3_vl_compressor_graft",
    "qwen3_vl_core",
]

#: Every class the grafts take: the model with the LM head and its core.
QWEN3_VL_CLASSES: tuple[type[nn.Module], ...] = (Qwen3VLForConditionalGeneration, Qwen3VLModel)
#: The record format of a Qwen3-VL compressor graft (`_compressor_files`).
RECORD_FORMAT = "tokencompress.qwen3_vl_compressor_graft"


def qwen3_vl_core(model: nn.Module, caller: str = "this graft") -> Qwen3VLModel:
    """The `Qwen3VLModel` inside `model` (or `model` itself)."""
    core = model.model if isinstance(model, Qwen3VLForConditionalGeneration) else model
    if not isinstance(core, Qwen3VLModel):
        raise TypeError(
            f"{caller} supports transformers' Qwen3VLForConditionalGeneration and Qwen3VLModel "
            f"(model_type 'qwen3_vl'), got {type(model).__name__}"
        )
    return core


def _uncompressed_video_features(core: Qwen3VLModel) -> Callable[..., Any]:
    """`get_video_features` as the class has it, but on the class's `get_image_features`:
    Qwen3-VL's calls `self.get_image_features`, which would find the graft's override."""
    image_features = type(core).get_image_features.__get__(core)

    # The class's decorator: `video_*` keyword arguments are the video's precomputed ones.
    @accepts_precomputed_kwargs(modality="video")
    def get_video_features(
        pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        return image_features(pixel_values_videos, video_grid_thw, **kwargs)

    return get_video_features


class Qwen3VLCompressorGraft(Qwen2VLCompressorGraft):
    """What `graft_compressor` changed on a Qwen3-VL model: Qwen2-VL's graft (the same
    attributes and methods), with every DeepStack level compressed as the image tokens
    are, and videos left uncompressed."""

    family_name = "Qwen3-VL"
    processor_names = "Qwen3VLProcessor"
    record_format = RECORD_FORMAT
    refuses_selection = (
        "adds DeepStack features to the image tokens, and the graft cannot yet apply one image's picks "
        "to every DeepStack level"
    )
    computes_scores = False

    def _compress_image_outputs(self, output: Any, image_grid_thw: torch.Tensor) -> None:
        """The image tokens, and each DeepStack level with the same compressor (and projector),
        so that level feature k is added to compressed token k."""
        super()._compress_image_outputs(output, image_grid_thw)
        levels = getattr(output, "deepstack_features", None)
        if levels is not None:
            output.deepstack_features = [self.module.compress_images(level, image_grid_thw) for level in levels]

    def _install(self) -> None:
        super()._install()
        core = self._core
        self._override(core, "get_video_features", lambda _: _uncompressed_video_features(core))


def graft_qwen3_vl_compressor(
    model: nn.Module,
    compressor: TokenCompressor,
    *,
    processor: Any | None = None,
    projector: nn.Module | None = None,
    placement: str = "auto",
) -> Qwen3VLCompressorGraft:
    """`graft_compressor` for Qwen3-VL (`Qwen3VLForConditionalGeneration` or `Qwen3VLModel`).

    The arguments are `graft_qwen2_vl_compressor`'s: `compressor` runs on each image's
    merged grid at the LLM's width, and on each DeepStack level's features of that image;
    `projector` (needed by a compressor that changes the width, e.g. PixelShuffle) maps
    both back to the LLM's width; `placement` must be "auto".
    """
    return graft_merger_compressor(
        Qwen3VLCompressorGraft, qwen3_vl_core(model, "graft_compressor"), model, compressor,
        processor=processor, projector=projector, placement=placement,
    )


def load_qwen3_vl_compressor_graft(
    model: nn.Module,
    folder: str | Path,
    *,
    processor: Any | None = None,
    compressor: TokenCompressor | None = None,
    projector: nn.Module | None = None,
) -> Qwen3VLCompressorGraft:
    """`load_compressor_graft` for Qwen3-VL: the graft `Qwen3VLCompressorGraft.save_pretrained` wrote."""
    return load_merger_compressor_graft(
        Qwen3VLCompressorGraft, qwen3_vl_core(model, "load_compressor_graft"), model, folder,
        processor=processor, compressor=compressor, projector=projector,
    )


class Qwen3VLEmbQGraft(Qwen2VLEmbQGraft):
    """An EmbQ graft on Qwen3-VL: Qwen2-VL's, with its prompts (`build_prompt`) and batches (`batch`)."""


def graft_qwen3_vl_embq(
    model: nn.Module,
    embq: nn.Module,
    *,
    layer: int,
    tokenizer: Any,
    num_queries: int = 9,
    query_tokens: Sequence[str] | None = None,
    dot_token: str = ".",
    dot_token_id: int | None = None,
) -> Qwen3VLEmbQGraft:
    """`graft_embq` for Qwen3-VL; same arguments. `embq` is an `EmbQ(width, width)`, width
    the LLM's: it reads each image's merged tokens, uncompressed."""
    return graft_merged_tokens_embq(
        Qwen3VLEmbQGraft, qwen3_vl_core(model, "graft_embq"), model, embq,
        layer=layer, tokenizer=tokenizer, num_queries=num_queries,
        query_tokens=query_tokens, dot_token=dot_token, dot_token_id=dot_token_id,
    )
