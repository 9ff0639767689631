"""Qwen2-VL's patch merger, wrapped with the compressor that runs on each image's output.

The merger itself maps each 2x2 window of ViT patches to one merged token; it never sees
an image as a whole (its input has no image boundaries, and in Qwen2.5-VL it is in
window-attention order, put back in row-major order only after the merger). So the
wrapper's `forward` is the merger's own, and the compression runs once
`get_image_features` has split the tower's output per image: `compress_images(images,
image_grid_thw)` groups the images by grid and runs the compressor once per distinct
grid on all images of that grid stacked (each of an image's t frames is one row of the
compressor's batch). The Python loop is over distinct grids, never over tokens. A
compressor that needs attention scores (VisionZip) gets each frame's row of its image's
scores (`_qwen2_vl_scores`) with the call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tokencompress.base import Grid, TokenCompressor

from ._qwen2_vl_grids import compressed_grid_thw, merged_grid_thw, rope_grid_thw, token_counts
from ._wrap import BaseLayerWrapper

__all__ = ["CompressedPatchMerger"]


class CompressedPatchMerger(BaseLayerWrapper):
    """The patch merger (`base_layer`), its compressor and, for a compressor that changes
    the width, a new projector back to the merger's width `dim`.

    Code that reads the merger's attributes (`hidden_size`, `ln_q`) still finds them.
    The grid methods answer without running; they take `image_grid_thw` rows (t, h, w)
    in patches, as the processor gives them.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        compressor: TokenCompressor,
        merge_size: int,
        dim: int,
        projector: nn.Module | None = None,
    ) -> None:
        super().__init__(base_layer)
        self.compressor = compressor
        self.projector = projector
        self.merge_size = int(merge_size)
        self.dim = int(dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.base_layer(hidden_states)

    # -- answered without running ---------------------------------------------------------
    def compressed_grid_thw(self, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """(t, H', W') per image, in compressed tokens."""
        return compressed_grid_thw(image_grid_thw, self.merge_size, self.compressor.out_grid)

    def rope_grid_thw(self, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """The `image_grid_thw` that `get_rope_index` must see for the compressed tokens."""
        return rope_grid_thw(self.compressed_grid_thw(image_grid_thw), self.merge_size)

    def token_counts(self, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Compressed tokens (= image placeholders) per image."""
        return token_counts(self.compressed_grid_thw(image_grid_thw))

    # -- running --------------------------------------------------------------------------
    def compress_images(
        self,
        images: Sequence[torch.Tensor],
        image_grid_thw: torch.Tensor,
        attention_scores: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Each image's merged tokens (t * h/m * w/m, dim) -> its compressed tokens (t * H' * W', dim)."""
        return self.compress_images_keeping(images, image_grid_thw, attention_scores)[0]

    def compress_images_keeping(
        self,
        images: Sequence[torch.Tensor],
        image_grid_thw: torch.Tensor,
        attention_scores: Sequence[torch.Tensor] | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
        """`compress_images`, and for a selecting compressor each image's kept positions
        (t, K): indices into each frame's row-major merged grid (None for other compressors).

        Args:
            attention_scores: for a compressor that needs them, each image's (t, h/m * w/m)
                scores of its merged tokens; each frame's row goes to the compressor with it.
        """
        merged = merged_grid_thw(image_grid_thw, self.merge_size)
        if len(images) != merged.shape[0]:
            raise ValueError(f"got the merged tokens of {len(images)} images for {merged.shape[0]} grids")
        if self.compressor.needs_attention_scores:
            if attention_scores is None:
                raise RuntimeError(
                    f"compressor={type(self.compressor).__name__} needs the attention each vision token receives, "
                    "which the graft computes while the model's get_image_features runs; call that (or the model) "
                    "rather than the merger"
                )
            if len(attention_scores) != len(images):
                raise ValueError(f"got the scores of {len(attention_scores)} images for {len(images)} images")
        groups: dict[tuple[int, int, int], list[int]] = {}
        for index, grid in enumerate(merged.tolist()):
            groups.setdefault(tuple(grid), []).append(index)
        # Every slot is filled below.
        compressed: list[torch.Tensor | None] = [None] * len(images)
        kept: list[torch.Tensor | None] = [None] * len(images)
        for (frames, height, width), members in groups.items():
            stacked = torch.stack([images[index] for index in members])
            if stacked.dim() != 3 or stacked.shape[1] != frames * height * width:
                raise ValueError(
                    f"an image of merged grid (t, h, w) = {(frames, height, width)} has "
                    f"{frames * height * width} merged tokens, got a tensor of shape {tuple(stacked.shape[1:])}"
                )
            frames_as_rows = stacked.reshape(len(members) * frames, height * width, stacked.shape[-1])
            scores = None
            if self.compressor.needs_attention_scores:
                scores = torch.stack([attention_scores[index] for index in members])  # type: ignore[index]
                if scores.shape[1:] != (frames, height * width):
                    raise ValueError(
                        f"the scores of an image of merged grid (t, h, w) = {(frames, height, width)} have shape "
                        f"{tuple(scores.shape[1:])}, not {(frames, height * width)}"
                    )
                scores = scores.reshape(len(members) * frames, height * width)  # rows as frames_as_rows
            tokens, positions = self._compress(frames_as_rows, (height, width), scores)
            tokens = tokens.reshape(len(members), -1, self.dim)
            for row, index in enumerate(members):
                compressed[index] = tokens[row]
                if positions is not None:
                    kept[index] = positions.reshape(len(members), frames, -1)[row]
        selects = self.compressor.selects_tokens
        return tuple(compressed), (tuple(kept) if selects else None)  # type: ignore[arg-type]

    def _compress(
        self, x: torch.Tensor, grid: Grid, scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        extra = {} if scores is None else {"attention_scores": scores}
        if self.compressor.selects_tokens:
            tokens, positions = self.compressor(x, grid, return_positions=True, **extra)
        else:
            out = self.compressor(x, grid, **extra)
            tokens, positions = (out[0] if isinstance(out, tuple) else out), None
        if self.projector is not None:
            tokens = self.projector(tokens)
        if tokens.shape[-1] != self.dim:
            raise ValueError(
                f"the grafted compressor gives tokens of width {tokens.shape[-1]}, but the language "
                f"model takes the merger's width {self.dim}"
            )
        return tokens, positions

    def extra_repr(self) -> str:
        return f"merge_size={self.merge_size}, dim={self.dim}"
