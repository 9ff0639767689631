"""`tokencompress` as an lmms-eval model: any grafted model, or a FlashSloth folder.

    pip install -e ".[eval]"
    lmms-eval --model tokencompress --model_args pretrained=PATH,compressor=tome,compressor.num_tokens=64 \
        --tasks gqa --batch_size 4

lmms-eval finds the class through this package's entry point (group `lmms_eval.models`,
`tokencompress.evaluation.plugin:manifest`). `model_args` are checked before any model
loads (`model_args.parse_model_args`). Requests are answered in batches of `batch_size`
with left padding and the KV cache, grouped by their generation kwargs (so one batch
never mixes greedy and sampled decoding), and returned in the order they came.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from loguru import logger
from tqdm import tqdm

from .backends import Sample, build_backend, generation_settings
from .model_args import parse_model_args
from .task_functions import SKIPPED_ANSWER
from .visuals import UnreadableImage, load_visuals

__all__ = ["TokenCompressLMM"]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class TokenCompressLMM(lmms):
    """An lmms-eval model over `backends.FlashSlothBackend` or `backends.HFBackend`.

    Attributes:
        spec: the checked `model_args` (`EvalSpec`).
        skipped: (task, doc_id) of each sample skipped for an unreadable image.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, batch_size: int | str = 1, device: str | None = None,
                 **model_args: Any) -> None:
        super().__init__()
        # lmms-eval passes --batch_size and --device next to the model_args (as strings from the CLI).
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)
        args = {"batch_size": batch_size, **model_args}
        if pretrained is not None:  # absent: parse_model_args says what is missing (a ValueError)
            args["pretrained"] = pretrained
        if device is not None:
            args["device"] = device
        self.spec = parse_model_args(args)
        self.backend = build_backend(self.spec)
        self.skipped: list[tuple[str, Any]] = []

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> "TokenCompressLMM":
        """As lmms-eval's, but `batch_size=` or `device=` in `model_args` win over the CLI's
        `--batch_size` / `--device` (always passed, so they would otherwise clash)."""
        args = simple_parse_args_string(arg_string)
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None and key not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    def _sample(self, request: Instance) -> Sample | None:
        """The request's question and images; None if skipped for an unreadable image."""
        context, _, doc_to_visual, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
        # lmms-eval's doc_id is an index: name the data set's own id too, where it has one.
        record_id = doc.get("id") if isinstance(doc, Mapping) else None
        try:
            return Sample(context, load_visuals(visuals, task, doc_id, record_id))
        except UnreadableImage as error:
            if self.spec.on_bad_image == "stop":
                raise
            logger.warning(f"skipped: {error}")
            self.skipped.append((task, doc_id))
            return None

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        progress = tqdm(total=len(requests), desc="tokencompress answering", disable=self.rank != 0)
        for indices in groups.values():
            settings = generation_settings(dict(requests[indices[0]].args[1]), self.spec.max_new_tokens)
            for chunk in _batches(indices, self.batch_size):
                samples = {index: self._sample(requests[index]) for index in chunk}
                for index in [index for index, sample in samples.items() if sample is None]:
                    answers[index] = SKIPPED_ANSWER
                ready = [index for index, sample in samples.items() if sample is not None]
                if ready:
                    for index, answer in zip(ready, self.backend.generate([samples[i] for i in ready], settings)):
                        answers[index] = answer
                progress.update(len(chunk))
        progress.close()
        if self.skipped:
            logger.warning(f"tokencompress skipped {len(self.skipped)} samples with unreadable images: {self.skipped}")
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        scores = []
        for request in tqdm(requests, desc="tokencompress scoring", disable=self.rank != 0):
            _, doc_to_target, _, doc_id, task, split = request.args
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(
                self.task_dict[task][split][doc_id])
            sample = self._sample(request)
            # A skipped sample cannot be scored: the lowest score, never the greedy choice.
            scores.append((float("-inf"), False) if sample is None else self.backend.loglikelihood(sample, continuation))
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the tokencompress lmms-eval model answers single-round tasks only")
