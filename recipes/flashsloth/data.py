"""LLaVA-format data on disk, the padding collator, and a resumable sharded sampler.

A LLaVA JSON file is a list of samples ``{"id", "image" (optional), "conversations":
[{"from": "human" | "gpt", "value": str}, ...]}``; "image" is a path relative to the
image folder, and samples without it are text-only.

Data flow::

    record --(PIL + image processor)--> pixel_values (num_images, num_views, 3, S, S)
           --(template)---------------> EncodedPrompt: input_ids, labels, query blocks
    samples --(DataCollator)----------> padded batch (see `DataCollator`)

Unreadable images raise `SampleError` naming the file and the sample; with
``on_bad_image="skip"`` the data set instead checks every image once when it is built
and leaves out (and lists in ``skipped``) the samples whose image cannot be read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from tokencompress.adapters.prompt import pad_prompts
from tokencompress.images import read_rgb

from .template import Template

__all__ = [
    "DataCollator",
    "LlavaDataset",
    "ResumableSampler",
    "SampleError",
    "SkippedSample",
    "conversation_texts",
    "load_llava_json",
]

logger = logging.getLogger(__name__)

ImageProcessor = Callable[[Image.Image], torch.Tensor]


class SampleError(ValueError):
    """A sample that cannot be read or encoded; the message names the sample and file."""


# ----------------------------------------------------------------------------- reading


def _sample_name(record: Mapping[str, Any], index: int) -> str:
    return str(record.get("id", f"#{index}")) if isinstance(record, Mapping) else f"#{index}"


def load_llava_json(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a LLaVA JSON file; errors name the file and the sample."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except FileNotFoundError:
        raise SampleError(f"data file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise SampleError(f"data file {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise SampleError(f"data file {str(path)!r}: expected a JSON list of samples")
    for index, record in enumerate(records):
        where = f"{path}: sample {_sample_name(record, index)!r} (index {index})"
        if not isinstance(record, dict):
            raise SampleError(f"{where}: expected an object, got {type(record).__name__}")
        conversations = record.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise SampleError(f"{where}: 'conversations' must be a non-empty list")
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise SampleError(f"{where}: 'image' must be a path string, got {image!r}")
    return records


def conversation_texts(records: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """Every message text, e.g. to train a tiny tokenizer on a data set."""
    for record in records:
        for message in record["conversations"]:
            yield message["value"]


def _open_image(path: Path) -> Image.Image:
    return read_rgb(path)  # strict: a truncated file is an error even if a library allowed them


@dataclass(frozen=True)
class SkippedSample:
    index: int
    sample_id: str
    path: str
    reason: str


class LlavaDataset(Dataset):
    """A LLaVA JSON file and its image folder, encoded with a template.

    ``__getitem__`` returns a dict: ``id``; ``prompt``, the template's `EncodedPrompt`
    (token ids, labels, query blocks); ``pixel_values`` (num_images, num_views, 3, S, S)
    float32, or None for a text-only sample.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path,
        *,
        template: Template,
        image_processor: ImageProcessor,
        on_bad_image: Literal["raise", "skip"] = "raise",
        progress: bool = True,
    ) -> None:
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.json_path = Path(json_path)
        self.image_folder = Path(image_folder)
        self.template = template
        self.image_processor = image_processor
        self.records = load_llava_json(self.json_path)
        self.skipped: list[SkippedSample] = []
        if on_bad_image == "skip":
            self._drop_unreadable(progress)

    def _image_path(self, record: Mapping[str, Any]) -> Path:
        return self.image_folder / record["image"]

    def _drop_unreadable(self, progress: bool) -> None:
        kept = []
        for index, record in enumerate(tqdm(self.records, desc="checking images", disable=not progress)):
            if "image" in record:
                path = self._image_path(record)
                try:
                    _open_image(path)
                except (OSError, ValueError) as exc:
                    name = _sample_name(record, index)
                    self.skipped.append(SkippedSample(index, name, str(path), str(exc)))
                    continue
            kept.append(record)
        if self.skipped:
            logger.warning(
                "%s: skipped %d sample(s) with unreadable images, first: %s",
                self.json_path, len(self.skipped), self.skipped[0],
            )
        self.records = kept

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        sample_id = _sample_name(record, index)
        pixel_values = None
        if "image" in record:
            path = self._image_path(record)
            try:
                image = _open_image(path)
            except (OSError, ValueError) as exc:
                raise SampleError(
                    f"sample {sample_id!r} of {self.json_path}: cannot read image "
                    f"{str(path)!r}: {exc}"
                ) from exc
            pixel_values = self.image_processor(image).unsqueeze(0)
        prompt = self.template.encode(
            record["conversations"],
            num_images=0 if pixel_values is None else 1,
            sample_id=sample_id,
        )
        return {"id": sample_id, "prompt": prompt, "pixel_values": pixel_values}


# ----------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class DataCollator:
    """Pads samples into a batch: right padding for training, left for generation.

    Returns what `tokencompress.adapters.prompt.pad_prompts` gives (``input_ids`` padded
    with ``pad_token_id``, ``attention_mask``, ``labels`` padded with -100, and the EmbQ
    instruction map under ``embq_instruction_map``), plus ``pixel_values``
    (N, num_views, 3, S, S), the images of all samples in batch order, or None when no
    sample has one; ``image_sample_index`` (N,) long, the batch row of each image; ``ids``.
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        batch: dict[str, Any] = pad_prompts(
            [s["prompt"] for s in samples],
            pad_token_id=self.pad_token_id,
            padding_side=self.padding_side,
            labels=True,
        )
        images = [(row, s["pixel_values"]) for row, s in enumerate(samples) if s["pixel_values"] is not None]
        if images:
            shapes = {tuple(p.shape[1:]) for _, p in images}
            if len(shapes) > 1:
                raise ValueError(f"cannot batch images of different shapes {sorted(shapes)}")
            batch["pixel_values"] = torch.cat([p for _, p in images])
            batch["image_sample_index"] = torch.tensor(
                [row for row, p in images for _ in range(p.shape[0])], dtype=torch.long
            )
        else:
            batch["pixel_values"] = None
            batch["image_sample_index"] = torch.zeros(0, dtype=torch.long)
        batch["ids"] = [s["id"] for s in samples]
        return batch


# ----------------------------------------------------------------------------- sampling


class ResumableSampler(Sampler[int]):
    """Seeded shuffling that resumes exactly, sharded across ranks.

    The epoch's global order is a permutation seeded by ``seed + epoch`` (trimmed with
    ``drop_last``, else padded by wrapping around, to a multiple of ``world_size``).
    Rank ``r`` takes positions ``r, r + world_size, ...``: the ranks' slices are disjoint,
    and each group of ``world_size * b`` consecutive positions is one global batch, the
    same samples one process would see with batch ``world_size * b``.

    Because DataLoader workers prefetch, the sampler cannot know what was trained on; the
    loop reports it: after each micro-batch call ``mark_consumed(len(batch))`` (samples
    this rank consumed). ``state_dict()`` then records the global position, and after
    ``load_state_dict`` iteration continues from exactly there (also with another
    world size that divides the position). ``set_epoch`` starts the next epoch.
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last and dataset_size < world_size:
            raise ValueError(f"dataset_size={dataset_size} is smaller than world_size={world_size}")
        self.dataset_size = dataset_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # global samples consumed in this epoch
        self._yielded = 0  # global positions handed out since the last reset

    def global_order(self) -> list[int]:
        """This epoch's order of dataset indices, across all ranks."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        remainder = len(order) % self.world_size
        if remainder and self.drop_last:
            order = order[: len(order) - remainder]
        elif remainder:
            pad = self.world_size - remainder
            order += (order * (pad // len(order) + 1))[:pad]
        return order

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        start = self.position
        self._yielded = start
        for position in range(start + self.rank, len(order), self.world_size):
            self._yielded = position - self.rank + self.world_size
            yield order[position]

    def _epoch_length(self) -> int:
        """Length of `global_order()`, without drawing the permutation."""
        if self.drop_last:
            return self.dataset_size - self.dataset_size % self.world_size
        return -(-self.dataset_size // self.world_size) * self.world_size

    def __len__(self) -> int:
        """Indices this rank still yields in this epoch."""
        return (self._epoch_length() - self.position) // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch = epoch
        self.position = 0
        self._yielded = 0

    def mark_consumed(self, num_samples: int) -> None:
        """Record that this rank trained on ``num_samples`` more samples (same on every rank)."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        position = self.position + num_samples * self.world_size
        if position > self._yielded:
            raise ValueError(
                f"mark_consumed({num_samples}) goes past the samples handed out "
                f"(position {position} > {self._yielded}); call it once per batch taken"
            )
        self.position = position

    def state_dict(self) -> dict[str, Any]:
        return {
            "dataset_size": self.dataset_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("dataset_size", "seed", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{getattr(self, key)!r}: the data order would not match"
                )
        if state["position"] % self.world_size:
            raise ValueError(
                f"sampler position {state['position']} is not a multiple of "
                f"world_size={self.world_size}; resume with a world size that divides it"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._yielded = self.position
