"""Prompts with EmbQ query blocks whose images differ in size: one placeholder per image,
then each its own count.

`build_prompt` writes the same number of placeholders for every image, which is what a
LLaVA image has. A Qwen2-VL image has as many as its grid gives, a LLaVA-NeXT image as
many as its tiles and aspect ratio give, an InternVL image as many as its tiles (and a
compressor graft changes each), so those prompts are built with one placeholder per
image and then expanded: `expand_image_placeholders` repeats image i's placeholder
`counts[i]` times (between InternVL's <img> and </img>) and moves the positions of the
query blocks and their instructions along.
"""

from __future__ import annotations

from collections.abc import Sequence

from .prompt import EncodedPrompt, QueryBlock

__all__ = ["expand_image_placeholders"]


def expand_image_placeholders(
    prompt: EncodedPrompt, image_token_id: int, counts: Sequence[int],
    before: Sequence[int] = (), after: Sequence[int] = (),
) -> EncodedPrompt:
    """`prompt`, whose images are one `image_token_id` each, with image i's repeated `counts[i]`
    times, between the tokens `before` and `after` (InternVL's <img> and </img>)."""
    found = sum(1 for token in prompt.input_ids if token == image_token_id)
    if found != len(counts) or found != prompt.num_images:
        raise ValueError(
            f"the prompt has {found} image placeholders for {prompt.num_images} images, but {len(counts)} image "
            "sizes were given (one per image, in prompt order: an image_grid_thw row, image_sizes row or "
            "num_patches entry)"
        )
    if any(count < 1 for count in counts):
        raise ValueError(f"every image needs at least one placeholder, got counts {list(counts)}")
    input_ids: list[int] = []
    labels: list[int] = []
    moved_to: list[int] = []  # the new position of each old position
    remaining = iter(counts)
    for token, label in zip(prompt.input_ids, prompt.labels):
        moved_to.append(len(input_ids))
        if token == image_token_id:
            image = [*before, *[token] * next(remaining), *after]
            input_ids += image
            labels += [label] * len(image)
        else:
            input_ids.append(token)
            labels.append(label)
    blocks = []
    for block in prompt.blocks:
        start = moved_to[block.query_positions.start]  # a block holds no image: it moves as one
        instruction = tuple(moved_to[position] for position in block.instruction_positions)
        blocks.append(QueryBlock(range(start, start + len(block.query_positions)), instruction))
    return EncodedPrompt(input_ids, labels, tuple(blocks), prompt.num_images)
