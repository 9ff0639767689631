"""Graft FlashSloth's EmbQ onto InternVL, removably.

    queries = graft_embq(model, EmbQ(text_dim, 4 * vision_width), layer=8, num_queries=9,
                         tokenizer=processor.tokenizer)                 # dispatches here
    pixels = processor.image_processor([photo, chart], return_tensors="pt")
    prompt = queries.build_prompt(messages, processor=processor, num_patches=pixels["num_patches"])
    model.generate(**pad_prompts([prompt], pad_token_id=...), pixel_values=pixels["pixel_values"])
    queries.remove()

Everything is the LLaVA graft's (`tokencompress.adapters.embq`): the query tokens and
their "." embedding, the wrapped decoder layer, the per-call instruction map, EmbQ on the
prefill only, `generate`'s instruction map, `remove()`, `lifted()`, saving and loading.
What differs:

- **vision**: every tile of every image of the sample, as `multi_modal_projector`
  receives it, uncompressed: pixel-shuffled, so `vision_dim` is the tower's width times
  1 / downsample_ratio^2 (`InternVLCallRouter`);
- **prompts**: each image is <img>, as many placeholders as the processor writes for its
  tiles (the compressed count under a compressor graft), </img> (`build_prompt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._internvl_embq_hooks import InternVLCallRouter
from ._qwen2_vl_prompt import expand_image_placeholders
from .embq import EmbQGraft, graft_embq_onto
from .internvl import internvl_core, shuffled_sizes
from .prompt import EncodedPrompt, build_prompt

__all__ = ["InternVLEmbQGraft", "graft_internvl_embq"]


class InternVLEmbQGraft(EmbQGraft):
    """An `EmbQGraft` on an InternVL model, with InternVL's image runs in its prompts."""

    def build_prompt(  # type: ignore[override]
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        processor: Any,
        num_patches: Sequence[int] | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> EncodedPrompt:
        """`build_prompt` with this graft's tokenizer and query tokens, and each image's run.

        Args:
            messages: the conversation; images where `image_marker` ("<image>") stands.
            processor: the model's processor (after a compressor graft, the grafted one):
                image i becomes <img>, its placeholders as the processor writes them, </img>.
            num_patches: each image's tiles, in prompt order (the image processor's
                `num_patches`); needed with images.
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
        tiles = [int(count) for count in (num_patches if num_patches is not None else [])]
        counts = [processor.replace_image_token({"num_patches": tiles}, index).count(processor.image_token)
                  for index in range(len(tiles))]
        return expand_image_placeholders(prompt, image_token_id, counts, before=[processor.start_image_token_id],
                                         after=[processor.end_image_token_id])


def graft_internvl_embq(
    model: nn.Module,
    embq: nn.Module,
    *,
    layer: int,
    tokenizer: Any,
    num_queries: int = 9,
    query_tokens: Sequence[str] | None = None,
    dot_token: str = ".",
    dot_token_id: int | None = None,
) -> InternVLEmbQGraft:
    """`graft_embq` for InternVL (with or without the LM head); same arguments.
    `embq.vision_dim` is the pixel-shuffled width (the tower's width / downsample_ratio^2)."""
    core = internvl_core(model, "graft_embq")
    _, vision_dim, text_dim = shuffled_sizes(core.config)
    return graft_embq_onto(
        InternVLEmbQGraft, InternVLCallRouter, model, core, embq, text_dim=text_dim, vision_dim=vision_dim,
        vision_input="the width of each tile's pixel-shuffled features, what the projector takes",
        layer=layer, tokenizer=tokenizer, num_queries=num_queries,
        query_tokens=query_tokens, dot_token=dot_token, dot_token_id=dot_token_id,
    )
