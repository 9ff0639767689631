"""Reading an image file strictly: a truncated or corrupt file is an error, whatever else runs.

Pillow can be told to fill truncated images silently (`ImageFile.LOAD_TRUNCATED_IMAGES`), a
process-wide switch that some libraries turn on when imported (lmms-eval does). Data sets
and evaluations here must report such a file with the sample it belongs to instead, so
they read images through `read_rgb`, which decodes with the switch off.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageFile

__all__ = ["read_rgb"]


def read_rgb(path: str | Path) -> Image.Image:
    """The image at `path`, fully decoded, as RGB.

    Raises:
        OSError: unreadable, truncated or not an image (PIL's `UnidentifiedImageError` is one).
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes fully, so truncation shows here
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
