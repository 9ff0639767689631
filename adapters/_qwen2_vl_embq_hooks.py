"""EmbQ's per-call data on Qwen2-VL / Qwen2.5-VL: the query blocks and each sample's images.

The LLaVA `CallRouter` finds the query blocks and hands the grafted decoder layer an
`EmbQCall`; this subclass changes where the raw vision features come from. EmbQ reads
each image's merged tokens as the vision tower outputs them (the patch merger's output,
row-major over the image's merged grid, before any compressor graft), and images differ
in size, so:

- a forward hook on the vision tower (`visual`) splits its merged tokens per image (by
  the `grid_thw` it was given) and keeps them on the tower's output object, under
  `MERGED_IMAGES_ATTR`. That object is what `get_image_features` returns, so the tokens
  travel with it, also when `generate` encodes the images before the prefill and passes
  the object in `mm_encoder_outputs`, and whatever a compressor graft later puts in its
  `pooler_output`;
- a call that encodes its own images catches that object while it runs (as the LLaVA
  router catches the tower's output);
- `group_images` lays the images out per sample: a sample owns its runs of image
  placeholders, in order (Qwen's template puts <|vision_start|>/<|vision_end|> around
  each image, and transformers' `get_rope_index` relies on those runs too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._embq_call import images_of_rows
from ._embq_hooks import CallRouter, _CallState

__all__ = ["MERGED_IMAGES_ATTR", "Qwen2VLCallRouter", "group_images"]

#: The attribute of the vision tower's output that holds its merged tokens per image.
MERGED_IMAGES_ATTR = "embq_merged_images"


def group_images(
    input_ids: torch.Tensor,
    image_token_id: int,
    images: Sequence[torch.Tensor] | None,
    num_call_images: int,
    vision_dim: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images' merged tokens packed per batch row, and their cumulative lengths (B + 1,).

    Row b owns the images of its runs of image placeholders, in row-major order.
    `generate` with beams or several sequences per prompt repeats each row k times after
    encoding the images once: then `images` holds those of the rows before that
    expansion (1/k of the call's `num_call_images`), and row b reads those of row b // k.
    """
    is_image = input_ids == image_token_id
    run_starts = is_image.clone()
    run_starts[:, 1:] &= ~is_image[:, :-1]
    images_per_row = run_starts.sum(dim=1)
    batch = input_ids.shape[0]
    cu = torch.zeros(batch + 1, dtype=torch.long, device=input_ids.device)
    if images is None:
        if bool(images_per_row.any()):
            raise ValueError(
                "the prompt has image placeholders but EmbQ saw no merged vision tokens in this call: "
                "pass pixel_values and image_grid_thw"
            )
        return torch.zeros(0, vision_dim, dtype=dtype, device=input_ids.device), cu
    if int(images_per_row.sum()) != num_call_images:
        raise ValueError(
            f"the batch rows hold {images_per_row.tolist()} runs of image placeholders, but the call has "
            f"{num_call_images} images; images must be separated by other tokens (Qwen's "
            "<|vision_start|><|image_pad|><|vision_end|>), as transformers' get_rope_index needs too"
        )
    repeats = num_call_images // len(images) if len(images) else 0
    if repeats < 1 or repeats * len(images) != num_call_images or batch % repeats:
        raise ValueError(f"the call has {num_call_images} images but the merged tokens of {len(images)}")
    owner, image_index = images_of_rows(images_per_row, repeats)
    chosen = [images[index] for index in image_index.tolist()]
    lengths = torch.tensor([tokens.shape[0] for tokens in chosen], dtype=torch.long, device=input_ids.device)
    row_lengths = torch.zeros(batch, dtype=torch.long, device=input_ids.device).index_add_(0, owner, lengths)
    cu[1:] = torch.cumsum(row_lengths, 0)
    return torch.cat(chosen).to(dtype), cu


class Qwen2VLCallRouter(CallRouter):
    """`CallRouter` for a Qwen2-VL / Qwen2.5-VL core; `self.llava` is that core."""

    def install(self, model: nn.Module) -> list[RemovableHandle]:
        handles = super().install(model)
        handles.append(self.llava.visual.register_forward_hook(self._on_vision_output, with_kwargs=True))
        return handles

    def _on_vision_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Keep the tower's merged tokens, split per image, on its output."""
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        merged = getattr(output, "pooler_output", None)
        if not self.enabled or grid_thw is None or not isinstance(merged, torch.Tensor):
            return
        sizes = (grid_thw.prod(-1) // module.spatial_merge_size**2).tolist()
        setattr(output, MERGED_IMAGES_ATTR, torch.split(merged, sizes))

    def _call_state(self, module: nn.Module, input_ids: torch.Tensor | None, kwargs: dict) -> _CallState:
        return _CallState(input_ids)  # EmbQ reads the merged tokens, whatever the call selects

    def _watch_vision(self, module: nn.Module, state: _CallState, kwargs: dict) -> None:
        """Arrange to see the call's images' merged tokens."""
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values_videos") is not None or encoded.get("video") is not None:
            raise ValueError(
                f"EmbQ on {type(module).__name__} reads each sample's images; prompts with videos are not supported "
                "(pixel_values_videos)"
            )
        if encoded.get("image") is not None:
            # generate() encodes the images before prefill and passes the outputs in.
            state.vision_output, state.encoded = encoded["image"], True
        elif kwargs.get("pixel_values") is not None:
            state.capture_output_of(module.visual)

    def _vision(self, state: _CallState) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's images' merged tokens packed per batch row, and their cumulative lengths."""
        images, num_call_images = None, 0
        if state.vision_output is not None:
            images = getattr(state.vision_output, MERGED_IMAGES_ATTR, None)
            if images is None:
                raise ValueError(
                    "EmbQ reads the merged tokens of each image as the vision tower gives them, which these "
                    "pre-encoded image features do not carry (encoded before the graft?): pass pixel_values"
                )
            # generate() repeats the pre-encoded features for beams (pooler_output only).
            per_image = state.vision_output.pooler_output
            num_call_images = len(per_image) if state.encoded else len(images)
        return group_images(
            state.input_ids,
            self.llava.config.image_token_id,
            images,
            num_call_images,
            self.embq.vision_dim,
            next(self.embq.parameters()).dtype,
        )
