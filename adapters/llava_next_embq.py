"""Graft FlashSloth's EmbQ onto LLaVA-NeXT or LLaVA-OneVision, removably.

    queries = graft_embq(model, EmbQ(text_dim, vision_dim), layer=8, num_queries=9,
                         tokenizer=processor.tokenizer)                 # dispatches here
    pixels = processor.image_processor([photo, chart], return_tensors="pt")
    prompt = queries.build_prompt(messages, processor=processor, image_sizes=pixels["image_sizes"][:1])
    model.generate(**pad_prompts([prompt], pad_token_id=...), **pixels)
    queries.remove()

Everything is the LLaVA graft's (`tokencompress.adapters.embq`): the query tokens and
their "." embedding, the wrapped decoder layer, the per-call instruction map, EmbQ on the
prefill only, `generate`'s instruction map, `remove()`, `lifted()`, saving and loading.
What differs is which vision features EmbQ reads and how many placeholders an image has:

- **vision**: all the uncompressed tokens of every view (the base view and each AnyRes
  tile) of every image of the sample, as the projector receives them, before any
  compressor graft (`AnyresCallRouter`); `vision_dim` is the vision tower's width (times
  the number of feature layers);
- **prompts**: each image gets as many placeholders as the processor writes for its
  size (the compressed count under a compressor graft; OneVision: base view only when
  the prompt has several images) (`build_prompt`). Prompts with videos are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ._llava_next_embq_hooks import AnyresCallRouter
from ._llava_parts import projector_widths
from ._qwen2_vl_prompt import expand_image_placeholders
from .embq import EmbQGraft, graft_embq_onto
from .llava_next import llava_next_core
from .llava_onevision import LLAVA_ONEVISION_CLASSES, llava_onevision_core
from .prompt import EncodedPrompt, build_prompt

__all__ = ["AnyresEmbQGraft", "graft_anyres_embq", "image_placeholder_counts"]


def image_placeholder_counts(processor: Any, image_sizes: Any) -> list[int]:
    """The placeholders `processor` writes for each image of one prompt, of `image_sizes`
    (height, width) in prompt order; asked of its own `replace_image_token`."""
    sizes = [[int(side) for side in size] for size in (image_sizes if image_sizes is not None else [])]
    tile = processor.image_processor.size
    tile_size = (tile["height"], tile["width"]) if "height" in tile else (tile["shortest_edge"],) * 2
    stand_in = {
        "image_sizes": sizes,
        "pixel_values": [np.zeros((1, 3, *tile_size), dtype=np.float32)],  # read for the tile's size
        "batch_num_images": [len(sizes)],  # one prompt (OneVision: several images, base views only)
    }
    return [processor.replace_image_token(stand_in, image_idx=index).count(processor.image_token)
            for index in range(len(sizes))]


class AnyresEmbQGraft(EmbQGraft):
    """An `EmbQGraft` on a LLaVA-NeXT or LLaVA-OneVision model, with placeholders per image size."""

    def build_prompt(  # type: ignore[override]
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        processor: Any,
        image_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> EncodedPrompt:
        """`build_prompt` with this graft's tokenizer and query tokens, and each image's placeholders.

        Args:
            messages: the conversation; images where `image_marker` ("<image>") stands.
            processor: the model's processor (after a compressor graft, the grafted one):
                image i gets as many placeholders as it writes for it.
            image_sizes: the images' original (height, width), one row per image in prompt
                order (the image processor's `image_sizes`); needed with images.
            kwargs: further `build_prompt` arguments (template, ...), except `max_length`
                (a cut must not fall inside an image, whose size is known only here).
        """
        for name in ("max_length", "image_token_id", "num_image_tokens"):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.build_prompt takes no {name}= (see its docstring)")
        image_token_id = self._llava.config.image_token_id
        prompt = build_prompt(
            messages, self.tokenizer, query_token_ids=self.token_ids, image_token_id=image_token_id,
            num_image_tokens=1,  # expanded below to each image's own count
            **kwargs,
        )
        return expand_image_placeholders(prompt, image_token_id, image_placeholder_counts(processor, image_sizes))


def graft_anyres_embq(
    model: nn.Module,
    embq: nn.Module,
    *,
    layer: int,
    tokenizer: Any,
    num_queries: int = 9,
    query_tokens: Sequence[str] | None = None,
    dot_token: str = ".",
    dot_token_id: int | None = None,
) -> AnyresEmbQGraft:
    """`graft_embq` for LLaVA-NeXT and LLaVA-OneVision (with or without the LM head); same
    arguments. `embq.vision_dim` is the vision tower's width (times the feature layers)."""
    if isinstance(model, LLAVA_ONEVISION_CLASSES):
        core = llava_onevision_core(model, "graft_embq")
    else:
        core = llava_next_core(model, "graft_embq")
    vision_dim, text_dim = projector_widths(core.config)
    return graft_embq_onto(
        AnyresEmbQGraft, AnyresCallRouter, model, core, embq, text_dim=text_dim, vision_dim=vision_dim,
        vision_input="the width of the selected vision features, before the projector",
        layer=layer, tokenizer=tokenizer, num_queries=num_queries,
        query_tokens=query_tokens, dot_token=dot_token, dot_token_id=dot_token_id,
    )
