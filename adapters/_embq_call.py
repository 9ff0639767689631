"""What EmbQ needs for one forward call, worked out from that call's inputs.

`plan_query_blocks` finds the query blocks in `input_ids` and the instruction tokens each
one reads (from the instruction map that came with the call), and checks them.
`select_raw_vision` takes the features LLaVA hands its projector from the vision tower's
output, and `group_vision` lays them out per sample. `EmbQCall`
bundles both; it is created per forward call and handed to the grafted decoder layer
as a keyword argument, so a gradient-checkpointing re-run of a layer sees the very same
object and nothing is read twice from module state.

Everything is vectorised over the batch: no Python loop over samples or blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .prompt import INSTRUCTION_MAP_KEY

__all__ = [
    "BlockPlan",
    "EmbQCall",
    "plan_query_blocks",
    "select_raw_vision",
    "group_vision",
    "images_of_rows",
    "images_per_row_by_length",
    "pack_images_of_rows",
]


@dataclass(frozen=True)
class BlockPlan:
    """The query blocks of one call, in row-major order (block i of the batch).

    query_rows, query_positions: (S, n) batch row and position of each query token.
    text_rows, text_positions: (total_text,) the instruction tokens, grouped by block.
    cu_seqlens_text: (S + 1,) block i reads text tokens cu[i]:cu[i+1].
    """

    query_rows: torch.Tensor
    query_positions: torch.Tensor
    text_rows: torch.Tensor
    text_positions: torch.Tensor
    cu_seqlens_text: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.query_rows.shape[0]


@dataclass(frozen=True)
class EmbQCall:
    """A `BlockPlan` plus the raw vision features, packed per batch row.

    vision: (total_vision, vision_dim): the raw features of every image, in batch order.
    cu_seqlens_vision: (B + 1,) row b's images are vision[cu[b]:cu[b+1]] (maybe none).
    """

    plan: BlockPlan
    vision: torch.Tensor
    cu_seqlens_vision: torch.Tensor


def _block_error(row: int, position: int, num_queries: int, query_tokens: str) -> ValueError:
    return ValueError(
        f"the prompt holds an incomplete query block (batch row {row}, near position {position}): "
        f"a block is the {num_queries} query tokens {query_tokens}, in this order and all together. "
        "Was the prompt truncated through a block, or its tokens edited? Build prompts with "
        "tokencompress.adapters.build_prompt, whose max_length refuses such cuts"
    )


def plan_query_blocks(
    input_ids: torch.Tensor,
    instruction_map: torch.Tensor | None,
    query_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> BlockPlan | None:
    """The query blocks of this call and their instructions; None if it has no block.

    Args:
        input_ids: (B, L) the tokens of this call.
        instruction_map: (B, L) k >= 1 marks an instruction token of the row's k-th
            block, 0 anything else; only read when the call holds query tokens (a
            decoding step holds none, whatever map comes along).
        query_ids: (n,) the query token ids, in block order.
        attention_mask: (B, L) 0 for padding, if given: instruction tokens must be real.
    """
    num_queries = query_ids.numel()
    is_query = torch.isin(input_ids, query_ids)
    if not bool(is_query.any()):
        if (
            instruction_map is not None
            and instruction_map.shape == input_ids.shape
            and bool((instruction_map != 0).any())
        ):
            raise ValueError(
                f"{INSTRUCTION_MAP_KEY} marks instruction tokens, but input_ids holds no query block for them; "
                "were the prompts built with this graft's query tokens?"
            )
        return None
    if instruction_map is None:
        raise ValueError(
            f"input_ids holds EmbQ query blocks but no {INSTRUCTION_MAP_KEY} came with the call: pass the "
            "batch from tokencompress.adapters.pad_prompts (its instruction map says which "
            "tokens each block reads)"
        )
    if instruction_map.shape != input_ids.shape:
        raise ValueError(
            f"{INSTRUCTION_MAP_KEY} has shape {tuple(instruction_map.shape)}, but input_ids has "
            f"{tuple(input_ids.shape)}: the map must be aligned with the tokens of this call "
            "(pad it like input_ids)"
        )
    instruction_map = instruction_map.to(device=input_ids.device, dtype=torch.long)

    # Query blocks: n consecutive query tokens with the ids in order.
    rows, positions = is_query.nonzero(as_tuple=True)  # row-major: blocks stay in order
    query_text = f"with the ids {query_ids.tolist()}"
    counts = is_query.sum(dim=1)
    bad_rows = (counts % num_queries).nonzero()
    if bad_rows.numel():
        row = int(bad_rows[0])
        raise _block_error(row, int(positions[rows == row][-1]), num_queries, query_text)
    num_blocks = rows.numel() // num_queries
    query_rows = rows.view(num_blocks, num_queries)
    query_positions = positions.view(num_blocks, num_queries)
    slots = (input_ids[rows, positions].unsqueeze(-1) == query_ids).int().argmax(-1)
    expected = torch.arange(num_queries, device=input_ids.device)
    well_formed = (
        (query_rows == query_rows[:, :1]).all(dim=1)
        & (query_positions == query_positions[:, :1] + expected).all(dim=1)
        & (slots.view(num_blocks, num_queries) == expected).all(dim=1)
    )
    if not bool(well_formed.all()):
        block = int((~well_formed).nonzero()[0])
        raise _block_error(int(query_rows[block, 0]), int(query_positions[block, 0]), num_queries, query_text)

    # Instruction tokens: map value k in row b -> the row's k-th block.
    blocks_per_row = counts // num_queries
    if bool((instruction_map < 0).any()) or bool((instruction_map[is_query] != 0).any()):
        raise ValueError(f"{INSTRUCTION_MAP_KEY} must be 0 on query tokens and never negative")
    text_rows, text_positions = (instruction_map > 0).nonzero(as_tuple=True)
    numbers = instruction_map[text_rows, text_positions]
    over = numbers > blocks_per_row[text_rows]
    if bool(over.any()):
        index = int(over.nonzero()[0])
        row = int(text_rows[index])
        raise ValueError(
            f"{INSTRUCTION_MAP_KEY} names block {int(numbers[index])} in batch row {row}, which has only "
            f"{int(blocks_per_row[row])} query block(s)"
        )
    if attention_mask is not None and attention_mask.dim() == 2:
        if bool((attention_mask.to(input_ids.device)[text_rows, text_positions] == 0).any()):
            raise ValueError(
                f"{INSTRUCTION_MAP_KEY} marks padding tokens as instruction; pad it with 0 like input_ids"
            )
    first_block_of_row = torch.cumsum(blocks_per_row, 0) - blocks_per_row
    block_of_token = first_block_of_row[text_rows] + numbers - 1
    if bool((text_positions >= query_positions[block_of_token, 0]).any()):
        raise ValueError(
            f"{INSTRUCTION_MAP_KEY} marks tokens after a query block as that block's instruction; a block "
            "reads only the instruction before it (causal order)"
        )
    order = torch.argsort(block_of_token, stable=True)
    text_lengths = torch.bincount(block_of_token, minlength=num_blocks)
    if bool((text_lengths == 0).any()):
        block = int((text_lengths == 0).nonzero()[0])
        raise ValueError(
            f"query block {block} of the batch (batch row {int(query_rows[block, 0])}) has no "
            f"instruction tokens in {INSTRUCTION_MAP_KEY}; every block reads the instruction of its turn"
        )
    cu_seqlens_text = torch.zeros(num_blocks + 1, dtype=torch.long, device=input_ids.device)
    cu_seqlens_text[1:] = torch.cumsum(text_lengths, 0)
    return BlockPlan(query_rows, query_positions, text_rows[order], text_positions[order], cu_seqlens_text)


def select_raw_vision(vision_output: Any, feature_layer: int | list[int], select_strategy: str) -> torch.Tensor:
    """The vision features LLaVA hands its projector, from the vision tower's output.

    transformers' `LlavaModel.get_image_features` takes the hidden states of
    `vision_feature_layer` (several layers: concatenated along the width) and drops the
    CLS token under the "default" strategy, then projects. These are the features before
    the projector and before any compressor graft (which wraps the projector).
    """
    hidden_states = getattr(vision_output, "hidden_states", None)
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    if hidden_states is None or any(hidden_states[layer] is None for layer in layers):
        raise ValueError(
            "EmbQ needs the vision tower's hidden states of vision_feature_layer "
            f"{feature_layer}, which this call's image encoder outputs do not hold; pass pixel_values"
        )
    selected = [hidden_states[layer] for layer in layers]
    if select_strategy == "default":
        selected = [features[:, 1:] for features in selected]
    return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)


def group_vision(
    input_ids: torch.Tensor,
    image_token_id: int,
    raw_features: torch.Tensor | None,
    num_call_images: int,
    vision_dim: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw vision features packed per batch row, and their cumulative lengths (B + 1,).

    LLaVA fills the image placeholders in row-major order, one image after another, so
    row b owns the next `placeholders_b / placeholders_per_image` of the call's
    `num_call_images` images. A row without placeholders owns none (its blocks then read
    no vision). `generate` with beams or several sequences per prompt repeats each row k
    times after encoding the images once: then `raw_features` holds the images of the
    rows before that expansion (1/k of them), and row b reads those of row b // k.
    """
    placeholders = (input_ids == image_token_id).sum(dim=1)
    batch = input_ids.shape[0]
    cu = torch.zeros(batch + 1, dtype=torch.long, device=input_ids.device)
    if raw_features is None:
        if bool(placeholders.any()):
            raise ValueError(
                "the prompt has image placeholders but EmbQ saw no raw vision features in this "
                "call: pass pixel_values (EmbQ reads the uncompressed features, which "
                "precomputed mm_encoder_outputs do not carry)"
            )
        return torch.zeros(0, vision_dim, dtype=dtype, device=input_ids.device), cu
    total = int(placeholders.sum())
    per_image = total // num_call_images if num_call_images else 0
    if per_image == 0 or per_image * num_call_images != total or bool((placeholders % per_image).any()):
        raise ValueError(
            f"cannot tell which of the {num_call_images} images belongs to which sample: the batch rows "
            f"hold {placeholders.tolist()} image placeholders, which is not a whole number of "
            "images per row (was a prompt truncated through an image's placeholders?)"
        )
    images_per_row = placeholders // per_image
    repeats = num_call_images // raw_features.shape[0] if raw_features.shape[0] else 0
    if repeats < 1 or repeats * raw_features.shape[0] != num_call_images or batch % repeats:
        raise ValueError(
            f"the call has {num_call_images} images but {raw_features.shape[0]} raw vision features"
        )
    _, image_index = images_of_rows(images_per_row, repeats)
    tokens_per_image = raw_features.shape[1]
    cu[1:] = torch.cumsum(images_per_row * tokens_per_image, 0)
    return raw_features[image_index.to(raw_features.device)].reshape(-1, raw_features.shape[-1]), cu


def images_of_rows(images_per_row: torch.Tensor, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image slot of the batch, row after row: its row (`owner`) and the image it reads.

    Row b has `images_per_row[b]` slots. `generate` repeats each row k = `repeats` times
    after encoding the images once: the images are those of the rows before that
    expansion, in row order, and row b reads those of row b // k.
    """
    device = images_per_row.device
    # Where each row's images start among the stored ones (rows repeated `repeats` times).
    unique_counts = images_per_row[::repeats]
    starts = (torch.cumsum(unique_counts, 0) - unique_counts).repeat_interleave(repeats)
    owner = torch.repeat_interleave(torch.arange(images_per_row.shape[0], device=device), images_per_row)
    first_of_owner = (torch.cumsum(images_per_row, 0) - images_per_row)[owner]
    return owner, starts[owner] + torch.arange(owner.numel(), device=device) - first_of_owner


def images_per_row_by_length(placeholders: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """How many of the call's images each batch row holds, when image i fills the next
    `lengths[i]` placeholders (in row-major order, as `masked_scatter` fills them) and
    row b has `placeholders[b]` of them. Every row must end where an image ends."""
    ends = torch.cumsum(lengths.to(placeholders.device), 0)
    row_ends = torch.cumsum(placeholders, 0)
    last = torch.searchsorted(ends, row_ends, right=True)  # images ending within rows 0..b
    # Where a row ends: 0 before any image, else the end of the last image within it.
    reached = torch.where(last > 0, ends[(last - 1).clamp(min=0)], 0) if ends.numel() else torch.zeros_like(last)
    if int(row_ends[-1]) != int(ends[-1] if ends.numel() else 0) or not bool((reached == row_ends).all()):
        raise ValueError(
            f"cannot tell which image belongs to which sample: the batch rows hold {placeholders.tolist()} "
            f"image placeholders, the call's images fill {lengths.tolist()} (was a prompt truncated "
            "through an image's placeholders, or written for another image size?)"
        )
    return torch.diff(last, prepend=last.new_zeros(1))


def pack_images_of_rows(
    images_per_row: torch.Tensor,
    images: list[torch.Tensor],
    num_call_images: int,
    vision_dim: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's images' tokens packed in batch order, and their cumulative lengths (B + 1,).

    `images[i]` is (tokens_i, vision_dim); `generate` with beams or several sequences per
    prompt repeats each row k times after encoding the images once: then `images` holds
    those of the rows before that expansion (1/k of the call's `num_call_images`).
    """
    device = images_per_row.device
    batch = images_per_row.shape[0]
    cu = torch.zeros(batch + 1, dtype=torch.long, device=device)
    if not images:
        if bool(images_per_row.any()):
            raise ValueError("the prompt has image placeholders but EmbQ saw no vision tokens in this call")
        return torch.zeros(0, vision_dim, dtype=dtype, device=device), cu
    repeats = num_call_images // len(images)
    if repeats < 1 or repeats * len(images) != num_call_images or batch % repeats:
        raise ValueError(f"the call has {num_call_images} images but the vision tokens of {len(images)}")
    owner, image_index = images_of_rows(images_per_row, repeats)
    chosen = [images[index] for index in image_index.tolist()]
    lengths = torch.tensor([tokens.shape[0] for tokens in chosen], dtype=torch.long, device=device)
    row_lengths = torch.zeros(batch, dtype=torch.long, device=device).index_add_(0, owner, lengths)
    cu[1:] = torch.cumsum(row_lengths, 0)
    return torch.cat(chosen).to(dtype), cu
