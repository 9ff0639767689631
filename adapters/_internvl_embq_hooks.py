"""EmbQ's per-call data on InternVL: each sample's images, every tile, as the projector gets them.

The LLaVA `CallRouter` finds the query blocks and hands the grafted decoder layer an
`EmbQCall`; this subclass changes where the raw vision features come from and how they
are grouped:

- EmbQ reads each tile's features as `multi_modal_projector` receives them, before any
  compressor graft: the vision tower's `vision_feature_layer` output (its last hidden
  state for -1, as `get_image_features` takes it), CLS dropped, pixel-shuffled by the
  model's own `pixel_shuffle` (width 4C for downsample_ratio 0.5). The tower's output
  is what `get_image_features` returns, so this works also when `generate` encodes the
  images before the prefill and passes them in `mm_encoder_outputs`;
- the processor writes each image as one run of placeholders between <img> and </img>
  (each video frame as a one-tile image), so a sample owns the images of its runs, and
  image i has run_length / tokens-per-tile tiles, the tokens per tile being those of the
  projected features (`pooler_output`, compressed under a compressor graft).
"""

from __future__ import annotations

import torch
from torch import nn

from ._embq_call import pack_images_of_rows
from ._embq_hooks import CallRouter, _CallState

__all__ = ["InternVLCallRouter", "placeholder_runs"]


def placeholder_runs(input_ids: torch.Tensor, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The runs of `image_token_id` in `input_ids`, row-major: each run's length and the
    number of runs of each row."""
    is_image = input_ids == image_token_id
    starts = is_image.clone()
    starts[:, 1:] &= ~is_image[:, :-1]
    run_of_token = torch.cumsum(starts.flatten(), 0) - 1  # the run each image token is in, row-major
    lengths = torch.bincount(run_of_token[is_image.flatten()], minlength=int(starts.sum()))
    return lengths, starts.sum(dim=1)


class InternVLCallRouter(CallRouter):
    """`CallRouter` for an InternVL core; `self.llava` is that core."""

    def _watch_vision(self, module: nn.Module, state: _CallState, kwargs: dict) -> None:
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            # generate() encodes the images before prefill and passes the outputs in.
            state.vision_output, state.encoded = encoded, True
        elif kwargs.get("pixel_values") is not None:
            state.capture_output_of(module.vision_tower)

    def _shuffled_tiles(self, state: _CallState) -> torch.Tensor:
        """(tiles, (H*r)*(W*r), C/r^2): each tile's features as the projector gets them."""
        output, layer = state.vision_output, state.feature_layer
        if layer == -1:
            hidden = output.last_hidden_state
        else:
            hidden = output.hidden_states[layer] if output.hidden_states is not None else None
        if hidden is None:
            raise ValueError(
                f"EmbQ needs the vision tower's output of vision_feature_layer {layer}, which this call's "
                "image features do not hold; pass pixel_values"
            )
        if state.select_strategy == "default":
            hidden = hidden[:, 1:]
        side = int(hidden.shape[1] ** 0.5)
        shuffled = self.llava.pixel_shuffle(hidden.reshape(hidden.shape[0], side, side, -1),
                                            scale_factor=self.llava.config.downsample_ratio)
        return shuffled.flatten(1, 2)

    def _vision(self, state: _CallState) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's images' tiles (raw, uncompressed), packed, and their cumulative lengths."""
        lengths, runs_per_row = placeholder_runs(state.input_ids, self.llava.config.image_token_id)
        dtype = next(self.embq.parameters()).dtype
        if state.vision_output is None:
            return pack_images_of_rows(runs_per_row, [], 0, self.embq.vision_dim, dtype)
        tiles = self._shuffled_tiles(state)
        per_tile = state.vision_output.pooler_output.shape[1]  # what the language model gets per tile
        tiles_of_run = lengths // per_tile
        if bool((lengths % per_tile).any()):
            raise ValueError(
                f"the prompt's image placeholder runs have lengths {lengths.tolist()}, not whole numbers of "
                f"tiles of {per_tile} tokens (was a prompt truncated through an image, or written for "
                "another compressor?)"
            )
        # generate() with beams repeats each row k times after encoding the images once.
        repeats = int(tiles_of_run.sum()) // tiles.shape[0] if tiles.shape[0] else 0
        batch = runs_per_row.shape[0]
        if repeats < 1 or repeats * tiles.shape[0] != int(tiles_of_run.sum()) or batch % repeats:
            raise ValueError(
                f"the prompt's image placeholders cover {int(tiles_of_run.sum())} tiles, but the call encoded "
                f"{tiles.shape[0]}"
            )
        first_run = torch.cumsum(runs_per_row, 0) - runs_per_row
        stored = torch.cat([
            tiles_of_run[start:start + count]
            for start, count in zip(first_run[::repeats].tolist(), runs_per_row[::repeats].tolist())
        ]) if batch else tiles_of_run
        images = [image.flatten(0, 1) for image in torch.split(tiles, stored.tolist())]
        return pack_images_of_rows(runs_per_row, images, int(lengths.numel()), self.embq.vision_dim, dtype)
