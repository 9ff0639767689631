"""Image preprocessing for SigLIP (FlashSloth) and FlashSloth-HD.

SigLIP: bicubic "squash" resize to size x size (no crop, no pad), rescale by 1/255,
normalise with mean = std = 0.5 per channel.

FlashSloth-HD: pad the image to a square with the mean colour (centred, as LLaVA's
``expand2square``), resize that to 2*size, cut 2x2 tiles of size x size (row-major: TL,
TR, BL, BR), and put first a thumbnail of the *unpadded* image squashed to size x size:
order [thumbnail, TL, TR, BL, BR]. Each view then gets the SigLIP preprocessing.

Both return float32 tensors of shape (num_views, 3, size, size): 1 view, or 5 with HD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = [
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "FlashSlothHDProcessor",
    "SiglipProcessor",
    "build_image_processor",
    "hd_views",
    "normalize",
    "pad_to_square",
    "split_2x2",
    "squash_resize",
]

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
HD_NUM_VIEWS = 5


def squash_resize(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to size x size, ignoring the aspect ratio (SigLIP's own preprocessing)."""
    return image.convert("RGB").resize((size, size), resample=Image.Resampling.BICUBIC)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of its longer side, filled with ``fill``."""
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def split_2x2(image: Image.Image) -> list[Image.Image]:
    """Four equal tiles of a square image with an even side, row-major: TL, TR, BL, BR."""
    width, height = image.size
    if width != height or width % 2:
        raise ValueError(f"split_2x2 needs a square image with an even side, got {image.size}")
    half = width // 2
    return [
        image.crop((left, top, left + half, top + half))
        for top in (0, half)
        for left in (0, half)
    ]


def hd_views(image: Image.Image, size: int, fill: tuple[int, int, int]) -> list[Image.Image]:
    """FlashSloth-HD's five views of ``image``: [thumbnail, TL, TR, BL, BR], each size x size."""
    thumbnail = squash_resize(image, size)
    padded = squash_resize(pad_to_square(image, fill), 2 * size)
    return [thumbnail, *split_2x2(padded)]


def normalize(
    image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """RGB uint8 image -> float32 (3, H, W): ``(x / 255 - mean) / std``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) * np.float32(1 / 255)
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _check_image(image: object) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has an empty size {image.size}")
    return image


@dataclass(frozen=True)
class SiglipProcessor:
    """SigLIP preprocessing: PIL image -> (1, 3, size, size) float32."""

    size: int = 384
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")

    @property
    def num_views(self) -> int:
        return 1

    @property
    def fill(self) -> tuple[int, int, int]:
        """The mean colour as 8-bit RGB (LLaVA's ``int(mean * 255)``)."""
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        view = squash_resize(_check_image(image), self.size)
        return normalize(view, self.mean, self.std).unsqueeze(0)


@dataclass(frozen=True)
class FlashSlothHDProcessor(SiglipProcessor):
    """FlashSloth-HD preprocessing: PIL image -> (5, 3, size, size) float32."""

    @property
    def num_views(self) -> int:
        return HD_NUM_VIEWS

    def __call__(self, image: Image.Image) -> torch.Tensor:
        views = hd_views(_check_image(image), self.size, self.fill)
        return torch.stack([normalize(v, self.mean, self.std) for v in views])


def build_image_processor(size: int, hd: bool = False) -> SiglipProcessor:
    """The processor a model config asks for (``model.image_size``, ``model.hd``)."""
    return FlashSlothHDProcessor(size) if hd else SiglipProcessor(size)
