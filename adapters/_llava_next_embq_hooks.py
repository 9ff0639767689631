"""EmbQ's per-call data on LLaVA-NeXT and LLaVA-OneVision: each sample's images, all their views.

The LLaVA `CallRouter` finds the query blocks and hands the grafted decoder layer an
`EmbQCall`; this subclass changes how the raw vision features are grouped. An AnyRes
image is a base view plus tiles, each on the vision grid, and images differ in their
number of tiles and of placeholders, so:

- the core's `get_image_features` (an instance attribute while the graft is on) records
  on the output it returns how many views each image has (`VIEWS_ATTR`), from the
  `image_sizes` (and OneVision's `batch_num_images`) of that call, by transformers' own
  rule. The output travels, so the record does too, also when `generate` encodes the
  images before the prefill and passes them in `mm_encoder_outputs`;
- EmbQ reads each image's raw features (the vision tower's `vision_feature_layer`
  hidden states, CLS dropped under "default": what the projector gets, before any
  compressor graft) over all its views, base view first, uncompressed;
- a sample owns the images whose placeholders it holds: image i fills as many as its
  packed features (`pooler_output[i]`) have, in order.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ._embq_call import images_per_row_by_length, pack_images_of_rows, select_raw_vision
from ._embq_hooks import CallRouter, _CallState
from ._instance_override import InstanceOverride

__all__ = ["VIEWS_ATTR", "AnyresCallRouter", "views_per_image"]

#: The attribute of `get_image_features`' output that holds each image's number of views.
VIEWS_ATTR = "embq_views_per_image"


def views_per_image(config: Any, image_sizes: Any, batch_num_images: Any = None) -> list[int]:
    """The views (base + tiles) of each image, as `get_image_features` splits them: an
    image of a multi-image prompt (OneVision's `batch_num_images`) has its base view only."""
    if batch_num_images is None:
        tiled = [True] * len(image_sizes)
    else:
        tiled = [int(count) == 1 for count in batch_num_images for _ in range(int(count))]
    return [
        image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if tile else 1
        for size, tile in zip(image_sizes, tiled)
    ]


def _recording_views(core: nn.Module, get_image_features: Callable[..., Any]) -> Callable[..., Any]:
    """`get_image_features` that records each image's views on its output."""
    signature = inspect.signature(get_image_features)

    @functools.wraps(get_image_features)  # generate() reads its parameters from the signature
    def recording(*args: Any, **kwargs: Any) -> Any:
        output = get_image_features(*args, **kwargs)
        arguments = signature.bind_partial(*args, **kwargs).arguments
        if not isinstance(output, tuple) and arguments.get("image_sizes") is not None:
            setattr(output, VIEWS_ATTR,
                    views_per_image(core.config, arguments["image_sizes"], arguments.get("batch_num_images")))
        return output

    return recording


class _OverrideHandle:
    """An `InstanceOverride` with a hook handle's `remove()`, for the graft's list of hooks."""

    def __init__(self, override: InstanceOverride) -> None:
        self.override = override

    def remove(self) -> None:
        if self.override.active:
            self.override.remove()


class AnyresCallRouter(CallRouter):
    """`CallRouter` for a LLaVA-NeXT or LLaVA-OneVision core; `self.llava` is that core."""

    def install(self, model: nn.Module) -> list[RemovableHandle]:
        handles = super().install(model)
        override = InstanceOverride.install(self.llava, "get_image_features",
                                            lambda method: _recording_views(self.llava, method))
        return [*handles, _OverrideHandle(override)]  # type: ignore[list-item]

    def _watch_vision(self, module: nn.Module, state: _CallState, kwargs: dict) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values_videos") is not None or encoded.get("video") is not None:
            raise ValueError(
                f"EmbQ on {type(module).__name__} reads each sample's images; prompts with videos are not supported"
            )
        if encoded.get("image") is not None:
            # generate() encodes the images before prefill and passes the outputs in.
            state.vision_output, state.encoded = encoded["image"], True
        elif kwargs.get("pixel_values") is not None:
            state.capture_output_of(module.vision_tower)

    def _vision(self, state: _CallState) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's images' raw features (all views), packed, and their cumulative lengths."""
        input_ids = state.input_ids
        placeholders = (input_ids == self.llava.config.image_token_id).sum(dim=1)
        images: list[torch.Tensor] = []
        lengths = torch.zeros(0, dtype=torch.long)
        if state.vision_output is not None:
            views = getattr(state.vision_output, VIEWS_ATTR, None)
            if views is None:
                raise ValueError(
                    "EmbQ needs each image's number of views, which these image features do not carry "
                    "(encoded before the graft, or without image_sizes?): pass pixel_values and image_sizes"
                )
            raw = select_raw_vision(state.vision_output, state.feature_layer, state.select_strategy)
            images = [tokens.flatten(0, 1) for tokens in torch.split(raw, views)]
            lengths = torch.tensor([len(packed) for packed in state.vision_output.pooler_output])
        elif bool(placeholders.any()):
            raise ValueError("the prompt has image placeholders but EmbQ saw no images in this call: pass pixel_values")
        per_row = images_per_row_by_length(placeholders, lengths)
        return pack_images_of_rows(
            per_row, images, len(lengths), self.embq.vision_dim, next(self.embq.parameters()).dtype
        )
