"""A sample's visuals as RGB images, with unreadable ones reported by sample id.

lmms-eval tasks give PIL images (most hub tasks) or file paths (our local tasks, so that
a corrupt file surfaces here, for one sample, rather than when the data set loads).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from tokencompress.images import read_rgb

__all__ = ["UnreadableImage", "load_visuals"]


class UnreadableImage(ValueError):
    """An image of sample `doc_id` (lmms-eval's index; `record_id`: the data set's own id,
    if it has one) of `task` that cannot be read."""

    def __init__(self, task: str, doc_id: Any, visual: Any, reason: str, record_id: Any = None) -> None:
        self.task, self.doc_id, self.visual, self.reason, self.record_id = task, doc_id, visual, reason, record_id
        shown = visual if isinstance(visual, (str, Path)) else type(visual).__name__
        sample = f"sample {doc_id!r}" + ("" if record_id is None else f" (id {record_id!r})")
        super().__init__(
            f"task {task!r}, {sample}: image {shown!r} cannot be read ({reason}); pass "
            "model_args on_bad_image=skip to skip such samples (counted by the task's 'skipped' metric)"
        )


def _load_one(visual: Any, task: str, doc_id: Any, record_id: Any) -> Image.Image:
    if isinstance(visual, Image.Image):
        try:
            return visual.convert("RGB")
        except OSError as error:  # a truncated file is decoded only now
            raise UnreadableImage(task, doc_id, visual, str(error), record_id) from None
    if isinstance(visual, (str, Path)):
        try:
            return read_rgb(visual)  # strict: lmms-eval turns on Pillow's silent truncation
        except (OSError, UnidentifiedImageError) as error:
            raise UnreadableImage(task, doc_id, visual, f"{type(error).__name__}: {error}", record_id) from None
    reason = f"expected a PIL image or an image path, got {type(visual).__name__}"
    raise UnreadableImage(task, doc_id, visual, reason, record_id)


def load_visuals(
    visuals: Sequence[Any] | None, task: str, doc_id: Any, record_id: Any = None
) -> list[Image.Image]:
    """Each visual of one sample as an RGB image ([] for a text-only sample).

    Raises:
        UnreadableImage: naming the task, the sample (and its record id) and the image.
    """
    return [_load_one(visual, task, doc_id, record_id) for visual in (visuals or []) if visual is not None]
