"""How many image placeholder tokens a `LlavaProcessor` writes per image, and setting it.

transformers 5.x `LlavaProcessor.replace_image_token` expands each image token to

    (height // patch_size) * (width // patch_size) + num_additional_image_tokens
    - (1 if vision_feature_select_strategy == "default" else 0)

copies, from the size of the processed image. LLaVA's image processors resize every image
to one size, so the count is the same for every image, and `num_additional_image_tokens`
(meant for extra tokens such as CLS) is the one integer that moves it by any amount. We
set that attribute, a plain setting that `save_pretrained` writes, rather than override
a method of the processor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["processor_image_token_count", "set_processor_image_token_count"]


def processor_image_token_count(processor: Any, image_size: tuple[int, int]) -> int:
    """Placeholders `processor` writes for one processed image of `image_size` (H, W)."""
    for name in ("replace_image_token", "image_token", "num_additional_image_tokens"):
        if not hasattr(processor, name):
            raise TypeError(
                f"processor must be a LlavaProcessor (or have its `{name}`), "
                f"got {type(processor).__name__}"
            )
    # Ask the processor's own method, with a stand-in processed image (channels first, as
    # the image processor returns them), so this follows whatever its formula is.
    stand_in = {"pixel_values": [np.zeros((3, *image_size), dtype=np.float32)]}
    replacement = processor.replace_image_token(stand_in, image_idx=0)
    return replacement.count(processor.image_token)


def set_processor_image_token_count(processor: Any, image_size: tuple[int, int], count: int) -> None:
    """Make `processor` write `count` placeholders per image of `image_size`."""
    if count < 1:
        raise ValueError(f"count must be a positive number of tokens, got {count}")
    current = processor_image_token_count(processor, image_size)
    processor.num_additional_image_tokens += count - current
    written = processor_image_token_count(processor, image_size)
    if written != count:  # a processor whose count does not move with the attribute
        processor.num_additional_image_tokens -= count - current
        raise TypeError(
            f"{type(processor).__name__} does not size its image placeholders by "
            f"`num_additional_image_tokens` (asked for {count} per image, it writes {written})"
        )
