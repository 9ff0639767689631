"""Graft FlashSloth's EmbQ onto Qwen2-VL or Qwen2.5-VL, removably.

    queries = graft_embq(model, EmbQ(text_dim, text_dim), layer=8, num_queries=9,
                         tokenizer=processor.tokenizer)                 # dispatches here
    pixels = processor.image_processor([photo, chart], return_tensors="pt")
    prompt = queries.build_prompt(messages, processor=processor, image_grid_thw=pixels["image_grid_thw"])
    model.generate(**queries.batch([prompt]), **pixels)
    queries.remove()

Everything is the LLaVA graft's (`tokencompress.adapters.embq`): the query tokens and
their "." embedding, the wrapped decoder layer, the per-call instruction map, EmbQ on the
prefill only, `generate`'s instruction map, `remove()`, `lifted()`, saving and loading.
What differs is where the vision features and the image placeholders come from:

- **vision**: EmbQ reads each image's merged tokens as the vision tower outputs them (the
  patch merger's output, whose width is the LLM's, so `vision_dim = text_dim`): all images
  of the sample, uncompressed even under a compressor graft (`Qwen2VLCallRouter`);
- **prompts**: each image gets as many placeholders as its grid gives (the compressed
  count under a compressor graft), inside the chat template's vision markers
  (`build_prompt`), and the batch carries the `mm_token_type_ids` that Qwen's mRoPE
  needs (`batch`). Prompts with videos are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ._qwen2_vl_embq_hooks import Qwen2VLCallRouter
from ._qwen2_vl_parts import merged_dim, qwen2_vl_core, text_dim
from ._qwen2_vl_prompt import expand_image_placeholders
from .embq import EmbQGraft, graft_embq_onto
from .prompt import EncodedPrompt, Template, build_prompt, chat_template, pad_prompts

__all__ = ["Qwen2VLEmbQGraft", "graft_qwen2_vl_embq", "graft_merged_tokens_embq"]


class Qwen2VLEmbQGraft(EmbQGraft):
    """An `EmbQGraft` on a Qwen2-VL / Qwen2.5-VL model, with Qwen's prompts and batches."""

    def build_prompt(  # type: ignore[override]
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        processor: Any,
        image_grid_thw: torch.Tensor | None = None,
        template: Template | None = None,
        **kwargs: Any,
    ) -> EncodedPrompt:
        """`build_prompt` with this graft's tokenizer and query tokens, and each image's placeholders.

        Args:
            messages: the conversation; images as `{"type": "image"}` parts (the template
                writes Qwen's <|vision_start|><|image_pad|><|vision_end|> for them).
            processor: the model's processor (after a compressor graft, the grafted one):
                image i gets as many placeholders as it writes for it.
            image_grid_thw: the images' grids, one row per image in prompt order, as the
                image processor returns them; needed when the conversation has images.
            template: default `chat_template(processor)`, the processor's chat template.
            kwargs: further `build_prompt` arguments, except `max_length` (a cut must not
                fall inside an image, whose size is known only here; shorten the messages).
        """
        for name in ("max_length", "image_token_id", "num_image_tokens"):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.build_prompt takes no {name}= (see its docstring)")
        kwargs.setdefault("image_marker", processor.image_token)
        image_token_id = self._llava.config.image_token_id
        prompt = build_prompt(
            messages,
            self.tokenizer,
            query_token_ids=self.token_ids,
            template=template if template is not None else chat_template(processor),
            image_token_id=image_token_id,
            num_image_tokens=1,  # expanded below to each image's own count
            **kwargs,
        )
        grids = torch.zeros(0, 3, dtype=torch.long) if image_grid_thw is None else torch.as_tensor(image_grid_thw)
        counts = [
            processor.replace_image_token({"image_grid_thw": grids}, image_idx=index).count(processor.image_token)
            for index in range(grids.shape[0])
        ]
        return expand_image_placeholders(prompt, image_token_id, counts)

    def batch(
        self, prompts: Sequence[EncodedPrompt], *, labels: bool = False, padding_side: str = "left"
    ) -> dict[str, torch.Tensor]:
        """`pad_prompts` with this tokenizer's padding, plus `mm_token_type_ids` (1: image, 2: video)."""
        batch = pad_prompts(
            prompts, pad_token_id=self.tokenizer.pad_token_id, padding_side=padding_side, labels=labels
        )
        config = self._llava.config
        input_ids = batch["input_ids"]
        token_types = torch.zeros_like(input_ids)
        token_types[input_ids == config.image_token_id] = 1
        token_types[input_ids == config.video_token_id] = 2
        batch["mm_token_type_ids"] = token_types
        return batch

    def __repr__(self) -> str:
        return type(self).__name__.removesuffix("EmbQGraft") + super().__repr__()


_Graft = TypeVar("_Graft", bound=Qwen2VLEmbQGraft)


def graft_qwen2_vl_embq(
    model: nn.Module,
    embq: nn.Module,
    *,
    layer: int,
    tokenizer: Any,
    num_queries: int = 9,
    query_tokens: Sequence[str] | None = None,
    dot_token: str = ".",
    dot_token_id: int | None = None,
) -> Qwen2VLEmbQGraft:
    """`graft_embq` for Qwen2-VL / Qwen2.5-VL (with or without the LM head); same arguments.

    `embq` is a `tokencompress.EmbQ(text_dim, vision_dim)` with both the LLM's width (the
    merged visual tokens have it). `tokenizer` should be the processor's tokenizer, so
    that its prompts and the processor's agree on the query tokens.
    """
    return graft_merged_tokens_embq(
        Qwen2VLEmbQGraft, qwen2_vl_core(model, "graft_embq"), model, embq,
        layer=layer, tokenizer=tokenizer, num_queries=num_queries,
        query_tokens=query_tokens, dot_token=dot_token, dot_token_id=dot_token_id,
    )


def graft_merged_tokens_embq(
    graft_class: type[_Graft], core: nn.Module, model: nn.Module, embq: nn.Module, **settings: Any
) -> _Graft:
    """`graft_qwen2_vl_embq` onto `model` whose core is `core` (Qwen2-VL's layout: `visual`
    outputs the merged tokens), with the handle `graft_class`; `settings` are
    `graft_embq`'s keyword arguments."""
    return graft_embq_onto(
        graft_class, Qwen2VLCallRouter, model, core, embq,
        text_dim=text_dim(core), vision_dim=merged_dim(core),
        vision_input="the width of the merged visual tokens, the patch merger's output",
        **settings,
    )
