"""Rotary positions for the tokens a selecting compressor kept (Qwen2-VL's mRoPE layout).

A selecting compressor (ToMe, DART) keeps K of an image's merged tokens, in their
original order, and says which (`positions`: indices into each frame's merged grid). Each
kept token must keep the 3-D position (t, row, column) it had in the uncompressed image,
and the text after the image must start where it started: so the layout is
transformers' own `get_rope_index`, run on the *expanded* prompt (each image's K
placeholders put back to its full t * h/m * w/m) with the original grids, and read back
at the kept tokens. The rope delta that decoding adds to text positions grows by the
tokens removed from each sample.

Where the kept positions come from: in a forward, `get_image_features` runs before the
positions are laid out, and records them in a slot that belongs to that forward call
(`kept_positions_scope`, a context variable set only while the core's forward runs);
`generate` lays out the positions before it encodes the images, so there the grafted
`get_rope_index` encodes them itself (`pixel_values` is among its arguments). Nothing
is kept in module state between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

__all__ = ["kept_positions_scope", "record_kept_positions", "recorded_kept_positions", "rope_index_at_kept"]

#: The token type of image placeholders in `mm_token_type_ids` (text 0, image 1, video 2).
IMAGE_TYPE = 1

_SLOT: ContextVar[list[tuple[torch.Tensor, ...]] | None] = ContextVar("tokencompress_kept_positions", default=None)


@contextmanager
def kept_positions_scope() -> Iterator[None]:
    """Within the block (one forward of the core), `record_kept_positions` keeps what the
    image encoding kept, for `recorded_kept_positions` in the same call."""
    token = _SLOT.set([])
    try:
        yield
    finally:
        _SLOT.reset(token)


def record_kept_positions(positions: tuple[torch.Tensor, ...]) -> None:
    """Record the kept positions of this call's images (no-op outside a scope)."""
    slot = _SLOT.get()
    if slot is not None:
        slot.append(positions)


def recorded_kept_positions() -> tuple[torch.Tensor, ...] | None:
    """The kept positions recorded in this call's scope (the latest encoding), if any."""
    slot = _SLOT.get()
    return slot[-1] if slot else None


def _expansion(
    length: int, image_slots: torch.Tensor, kept: Sequence[torch.Tensor], frame_tokens: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample of `length` tokens whose image placeholders are at `image_slots`
    (ascending), for its images' kept positions `kept` (each (t, K)) of frames of
    `frame_tokens` merged tokens: (copies of each token in the expanded prompt, the
    expanded index that each token's rotary position is read from)."""
    repeats = torch.ones(length, dtype=torch.long, device=image_slots.device)
    firsts, offset = [], 0
    for positions, per_frame in zip(kept, frame_tokens):
        frames, count = positions.shape
        first = int(image_slots[offset])
        firsts.append(first)
        repeats[first] += frames * (per_frame - count)  # the first placeholder stands for the removed ones
        offset += frames * count
    starts = torch.cumsum(repeats, 0) - repeats  # where each token's copies begin
    index, offset = starts.clone(), 0
    for first, positions, per_frame in zip(firsts, kept, frame_tokens):
        frames, count = positions.shape
        frame_starts = torch.arange(frames, device=positions.device)[:, None] * per_frame
        within_image = (positions + frame_starts).reshape(-1).to(starts.device)
        index[image_slots[offset: offset + frames * count]] = starts[first] + within_image
        offset += frames * count
    return repeats, index


def rope_index_at_kept(
    original: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    arguments: dict[str, Any],
    merged_grids: torch.Tensor,
    kept: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`original(**arguments)` (a `get_rope_index` taking `input_ids`, `mm_token_type_ids`,
    `attention_mask` and the images' original `image_grid_thw`) for the compressed prompt
    in `arguments`: every image laid out uncompressed, each kept token read at its place.

    Args:
        merged_grids: (num_images, 3) rows (t, h/m, w/m), the images' merged grids.
        kept: per image, its kept positions (t, K) into each frame's row-major merged grid.

    Returns:
        position_ids (3, B, L) and the rope deltas (B, 1) of the compressed prompt.
    """
    input_ids, types = arguments["input_ids"], arguments["mm_token_type_ids"]
    if types is None:
        raise ValueError("placing kept image tokens needs mm_token_type_ids (the processor gives them)")
    batch, length = input_ids.shape
    mask = arguments.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    frame_tokens = (merged_grids[:, 1] * merged_grids[:, 2]).tolist()
    expansions, next_image = [], 0
    for row in range(batch):
        slots = torch.nonzero((types[row] == IMAGE_TYPE) & mask[row].bool()).flatten()
        first_image, used = next_image, 0
        while used < len(slots) and next_image < len(kept):
            used += kept[next_image].numel()
            next_image += 1
        if used != len(slots):
            raise ValueError(
                f"row {row} of the prompt has {len(slots)} image placeholders, but its images keep "
                f"{used} tokens; build prompts with the processor passed to graft_compressor"
            )
        images = slice(first_image, next_image)
        expansions.append(_expansion(length, slots, kept[images], frame_tokens[images]))
    if next_image != len(kept):
        raise ValueError(f"the prompt has placeholders for {next_image} images, but {len(kept)} were encoded")

    # The expanded prompt, left-padded to its longest row (padding: type text, mask 0).
    sizes = [int(repeats.sum()) for repeats, _ in expansions]
    longest = max(sizes)
    expanded = {name: value.new_zeros(batch, longest) for name, value in
                (("input_ids", input_ids), ("mm_token_type_ids", types), ("attention_mask", mask))}
    for row, (repeats, _) in enumerate(expansions):
        for name, value in (("input_ids", input_ids), ("mm_token_type_ids", types), ("attention_mask", mask)):
            expanded[name][row, longest - sizes[row]:] = value[row].repeat_interleave(repeats)
    positions, deltas = original(**{**arguments, **expanded})
    picked = torch.stack(
        [positions[:, row, longest - sizes[row] + index] for row, (_, index) in enumerate(expansions)], dim=1
    )
    # Decoding adds the delta to text positions: it grows by the tokens each row lost.
    removed = deltas.new_tensor([size - length for size in sizes]).reshape(deltas.shape)
    return picked, deltas + removed
