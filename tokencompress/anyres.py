"""How many tokens LLaVA-NeXT's AnyRes layout gives one image, from its size alone.

    layout = anyres_layout((672, 672), LLAVA_NEXT_PINPOINTS, tile_pixels=336, tile_grid=(24, 24))
    layout.views, layout.tokens        # 5 (base view + 2x2 tiles), 2928

LLaVA-NeXT encodes an image as a base view (the whole image resized to one tile) and the
tiles of the grid resolution that `grid_pinpoints` chooses for the image's size. Its
language model gets the base view's tokens, then the tiles joined into one picture and
cropped back to the image's aspect ratio ("unpadding"), with one `image_newline` token
after each row of the picture.

`tile_grid` is the token grid of one view: the vision tower's (image_size / patch_size per
side), or a compressor's `out_grid` of it. tokencompress's LLaVA-NeXT graft lays compressed
views out exactly as an uncompressed model lays out views of that grid, so one count serves
both. The rule is transformers' `LlavaNextProcessor._get_number_of_features` (resolution by
`select_best_resolution`, unpadding with its rounding); this module only does the
arithmetic and imports no model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers.image_processing_utils import select_best_resolution

__all__ = ["AnyResLayout", "anyres_layout", "LLAVA_NEXT_PINPOINTS"]

#: The grid resolutions (height, width) of the llava-v1.6 checkpoints (336 px tiles).
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class AnyResLayout:
    """One image's AnyRes layout, in tokens.

    Attributes:
        tiles: (rows, cols) of tiles the image is cut into (besides the base view).
        tile_grid: (height, width) in tokens of one view.
        picture: (height, width) in tokens of the joined tiles after unpadding.
    """

    tiles: tuple[int, int]
    tile_grid: tuple[int, int]
    picture: tuple[int, int]

    @property
    def views(self) -> int:
        """Views the vision tower encodes: the base view and every tile."""
        return 1 + self.tiles[0] * self.tiles[1]

    @property
    def base_tokens(self) -> int:
        return self.tile_grid[0] * self.tile_grid[1]

    @property
    def newlines(self) -> int:
        """One `image_newline` token after each row of the picture."""
        return self.picture[0]

    @property
    def tokens(self) -> int:
        """What the language model gets: base view + unpadded picture + newlines."""
        return self.base_tokens + self.picture[0] * self.picture[1] + self.newlines


def anyres_layout(
    image_size: Sequence[int],
    grid_pinpoints: Sequence[Sequence[int]],
    tile_pixels: int,
    tile_grid: Sequence[int],
) -> AnyResLayout:
    """The AnyRes layout of an image of `image_size` (height, width) pixels.

    Args:
        image_size: the image's original (height, width) in pixels.
        grid_pinpoints: the (height, width) resolutions the image may be tiled at, each a
            multiple of `tile_pixels` (LLaVA-NeXT's `image_grid_pinpoints`).
        tile_pixels: the side of one (square) tile in pixels: the vision tower's image size.
        tile_grid: (height, width) in tokens of one view.
    """
    height, width = _positive_pair("image_size", image_size)
    rows, cols = _positive_pair("tile_grid", tile_grid)
    if not isinstance(tile_pixels, int) or tile_pixels < 1:
        raise ValueError(f"tile_pixels must be a positive int, got {tile_pixels!r}")
    pinpoints = [_positive_pair("grid_pinpoints entry", point) for point in grid_pinpoints]
    if not pinpoints:
        raise ValueError("grid_pinpoints is empty; expected at least one (height, width) resolution")
    uneven = [point for point in pinpoints if point[0] % tile_pixels or point[1] % tile_pixels]
    if uneven:
        raise ValueError(f"grid_pinpoints {uneven} are not multiples of tile_pixels={tile_pixels}")
    best_height, best_width = select_best_resolution([height, width], [list(point) for point in pinpoints])
    tiles = (best_height // tile_pixels, best_width // tile_pixels)
    picture = _unpadded(height, width, tiles[0] * rows, tiles[1] * cols)
    return AnyResLayout(tiles=tiles, tile_grid=(rows, cols), picture=picture)


def _unpadded(height: int, width: int, picture_height: int, picture_width: int) -> tuple[int, int]:
    """The (height, width) left of a picture of tokens once the padding that fitted the
    image's aspect ratio into it is cropped, with the processor's rounding (to 7 decimals,
    then down) and an equal crop on both sides."""
    if width / height > picture_width / picture_height:  # wider than the picture: bands above and below
        kept = int(round(height * (picture_width / width), 7))
        return picture_height - 2 * ((picture_height - kept) // 2), picture_width
    kept = int(round(width * (picture_height / height), 7))
    return picture_height, picture_width - 2 * ((picture_width - kept) // 2)


def _positive_pair(name: str, value: Sequence[int]) -> tuple[int, int]:
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be two positive ints (height, width), got {value!r}")
    return pair  # type: ignore[return-value]
