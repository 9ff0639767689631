"""Packed (varlen) <-> padded layouts, vectorized (no Python loop over samples).

Packed tensors are (total, ...) with segment i in rows cu_seqlens[i]:cu_seqlens[i + 1]
(flash-attn's convention); padded tensors are (S, max_seqlen, ...) plus a (S, max_seqlen)
bool mask with True = real token.
"""

from __future__ import annotations

import torch

__all__ = ["segment_positions", "pad_packed", "unpad_padded"]


def segment_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the `total` packed rows: its segment index and its position in it."""
    cu_seqlens = cu_seqlens.long()
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    # output_size keeps repeat_interleave from syncing with the device to learn it.
    segment = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=total
    )
    position = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[segment]
    return segment, position


def pad_packed(
    x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, ...) packed -> (S, max_seqlen, ...) zero-padded, and the (S, max_seqlen) mask."""
    num_segments = cu_seqlens.numel() - 1
    segment, position = segment_positions(cu_seqlens, x.shape[0])
    padded = x.new_zeros(num_segments, max_seqlen, *x.shape[1:])
    padded = padded.index_put((segment, position), x)  # out of place: autograd flows to x
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    mask = torch.arange(max_seqlen, device=segment.device) < lengths[:, None]
    return padded, mask


def unpad_padded(padded: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(S, max_seqlen, ...) padded -> (total, ...) packed; the inverse of `pad_packed`."""
    segment, position = segment_positions(cu_seqlens, total)
    return padded[segment, position]
