"""What answers the questions: a FlashSloth folder, or a Hugging Face model with grafts.

Both backends take a batch of samples (a question and its images) and give greedy (or
sampled, for Hugging Face models) answers, batched with left padding and the KV cache,
and the log-likelihood of a continuation for multiple-choice tasks. They know nothing of
lmms-eval: `lmms_model` turns its requests into `Sample`s and back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from .model_args import EvalSpec
from .task_functions import load_recipe_module

__all__ = ["Backend", "FlashSlothBackend", "GenerationSettings", "HFBackend", "Sample", "build_backend",
           "generation_settings", "cut_at_stop"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The image marker some tasks put in their prompts; the backends place images themselves.
IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class Sample:
    """One question and its images (none for a text-only sample)."""

    context: str
    images: list[Image.Image]

    @property
    def text(self) -> str:
        return self.context.replace(IMAGE_MARKER, "").strip()


@dataclass(frozen=True)
class GenerationSettings:
    """lmms-eval's generation kwargs, checked: stop strings, length, sampling."""

    until: tuple[str, ...]
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float | None
    num_beams: int

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                  "num_beams": self.num_beams}
        if self.do_sample:
            kwargs["temperature"] = self.temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        return kwargs


def generation_settings(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> GenerationSettings:
    """`GenerationSettings` from a task's `generation_kwargs` (ValueError naming a bad one)."""
    until = gen_kwargs.get("until", ())
    until = (until,) if isinstance(until, str) else tuple(until or ())
    if not all(isinstance(stop, str) for stop in until):
        raise ValueError(f"generation kwarg until must be a string or a list of strings, got {until!r}")
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    if temperature < 0 or math.isnan(temperature):
        raise ValueError(f"generation kwarg temperature must be >= 0, got {temperature!r}")
    do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
    max_new_tokens = gen_kwargs.get("max_new_tokens", default_max_new_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generation kwarg max_new_tokens must be a positive int, got {max_new_tokens!r}")
    num_beams = gen_kwargs.get("num_beams", 1) or 1
    return GenerationSettings(until, max_new_tokens, do_sample, temperature, gen_kwargs.get("top_p"), int(num_beams))


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the first stop string (as lmms-eval's own models cut it), stripped."""
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


class Backend(Protocol):
    def generate(self, samples: Sequence[Sample], settings: GenerationSettings) -> list[str]:
        """One answer per sample, cut at the stop strings."""

    def loglikelihood(self, sample: Sample, continuation: str) -> tuple[float, bool]:
        """log p(continuation | sample), and whether greedy decoding would give it."""


def _continuation_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """Sum of the log-probabilities of `targets` (n,) under the `logits` (n, vocab) that
    predict them, and whether each is the argmax."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    total = log_probs.gather(-1, targets[:, None]).sum()
    return float(total), bool((logits.argmax(dim=-1) == targets).all())


def _graft_extras(spec: EvalSpec, model: torch.nn.Module, processor: Any | None) -> list[Any]:
    """The compressor (or saved compressor graft) and FastV grafts the spec asks for."""
    from tokencompress.adapters import graft_compressor, graft_fastv, load_compressor_graft
    from tokencompress.registry import create_compressor

    grafts = []
    if spec.compressor is not None:
        grafts.append(graft_compressor(model, create_compressor(spec.compressor, **spec.compressor_kwargs),
                                       processor=processor))
    if spec.graft is not None:
        grafts.append(load_compressor_graft(model, spec.graft, processor=processor))
    if spec.fastv_layer is not None:
        grafts.append(graft_fastv(model, layer=spec.fastv_layer, keep=spec.fastv_keep))
    return grafts


class FlashSlothBackend:
    """A FlashSloth folder, answering with the recipe's `FlashSlothChat` (its Vicuna-v1
    template, one picture per question, greedy decoding)."""

    def __init__(self, spec: EvalSpec) -> None:
        model = load_recipe_module("model").FlashSloth.from_pretrained(spec.pretrained, device=spec.device,
                                                                       dtype=_DTYPES[spec.dtype])
        # Before the chat: its template writes as many placeholders as the grafted LLaVA takes.
        self.grafts = _graft_extras(spec, model.llava, None)
        self.chat = load_recipe_module("chat").FlashSlothChat(model, allow_no_queries=True)

    @staticmethod
    def _picture(sample: Sample) -> Image.Image | None:
        if len(sample.images) > 1:
            raise ValueError(f"FlashSloth answers about one picture per question; this sample has {len(sample.images)}")
        return sample.images[0] if sample.images else None

    def generate(self, samples: Sequence[Sample], settings: GenerationSettings) -> list[str]:
        if settings.do_sample or settings.num_beams != 1:
            raise ValueError(
                f"FlashSloth decodes greedily; the task asks do_sample with temperature={settings.temperature} "
                f"and num_beams={settings.num_beams}"
            )
        ids = self.chat.generate_ids([self._picture(s) for s in samples], [s.text for s in samples],
                                     max_new_tokens=settings.max_new_tokens)
        tokenizer = self.chat.model.tokenizer
        return [cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), settings.until) for row in ids]

    @torch.no_grad()
    def loglikelihood(self, sample: Sample, continuation: str) -> tuple[float, bool]:
        chat, model = self.chat, self.chat.model
        batch = chat.collate([chat.encode(self._picture(sample), sample.text)])
        targets = torch.tensor(model.tokenizer(continuation, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if targets.numel() == 0:
            raise ValueError(f"the continuation {continuation!r} has no tokens")
        count = targets.numel()
        input_ids = torch.cat([batch["input_ids"], targets[None]], dim=1)
        instruction_map = batch["embq_instruction_map"]
        instruction_map = torch.cat([instruction_map, instruction_map.new_zeros(1, count)], dim=1)
        device = model.device
        logits = model(
            input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
            pixel_values=None if batch["pixel_values"] is None else batch["pixel_values"].to(device),
            embq_instruction_map=instruction_map.to(device),
        ).logits[0]
        # The last positions predict the continuation (a pruning graft keeps every text token).
        return _continuation_scores(logits[-count - 1:-1], targets.to(logits.device))


class HFBackend:
    """A Hugging Face model folder of a supported family, with the spec's grafts."""

    def __init__(self, spec: EvalSpec) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.spec = spec
        self.model = AutoModelForImageTextToText.from_pretrained(spec.pretrained, dtype=_DTYPES[spec.dtype])
        self.model.to(spec.device).eval()
        self.processor = AutoProcessor.from_pretrained(spec.pretrained)
        if not hasattr(self.processor, "image_processor") or not hasattr(self.processor, "tokenizer"):
            raise ValueError(
                f"pretrained={str(spec.pretrained)!r}: AutoProcessor gives a {type(self.processor).__name__}, not a "
                "processor with an image processor and a tokenizer; save the model's processor in the folder"
            )
        self.processor.tokenizer.padding_side = "left"  # every prompt ends at the last column
        self.grafts = _graft_extras(spec, self.model, self.processor)
        tokenizer = self.processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        config = self.model.config
        self.image_token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)

    def prompt(self, sample: Sample) -> str:
        """The model's chat template (or the plain LLaVA one) around the images and question."""
        template = getattr(self.processor, "chat_template", None)
        if self.spec.chat_template == "auto" and template:
            content = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.text}]
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"USER: {self.processor.image_token * len(sample.images)}\n{sample.text} ASSISTANT:"

    def _inputs(self, samples: Sequence[Sample], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        images = [image for sample in samples for image in sample.images]
        inputs = self.processor(images=images or None, text=list(texts), return_tensors="pt", padding=True)
        dtype = self.model.dtype
        return {key: value.to(self.spec.device, dtype) if value.is_floating_point() else value.to(self.spec.device)
                for key, value in inputs.items()}

    def _image_token_count(self, sample: Sample) -> int:
        ids = self.processor(images=sample.images or None, text=[self.prompt(sample)], return_tensors="pt")["input_ids"]
        return int((ids == self.image_token_id).sum())

    def _groups(self, samples: Sequence[Sample]) -> list[list[int]]:
        """Batches to run: all samples at once, or with FastV (which keeps one number of
        tokens per batch row) the samples of each image-token count together."""
        if self.spec.fastv_layer is None:
            return [list(range(len(samples)))]
        groups: dict[int, list[int]] = {}
        for index, sample in enumerate(samples):
            groups.setdefault(self._image_token_count(sample), []).append(index)
        return list(groups.values())

    @torch.no_grad()
    def generate(self, samples: Sequence[Sample], settings: GenerationSettings) -> list[str]:
        answers: list[str] = [""] * len(samples)
        for group in self._groups(samples):
            inputs = self._inputs([samples[i] for i in group], [self.prompt(samples[i]) for i in group])
            generated = self.model.generate(**inputs, **settings.generate_kwargs(), pad_token_id=self.pad_token_id)
            texts = self.processor.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:],
                                                          skip_special_tokens=True)
            for index, text in zip(group, texts):
                answers[index] = cut_at_stop(text, settings.until)
        return answers

    @torch.no_grad()
    def loglikelihood(self, sample: Sample, continuation: str) -> tuple[float, bool]:
        prompt = self.prompt(sample)
        context = self._inputs([sample], [prompt])["input_ids"]
        whole = self._inputs([sample], [prompt + continuation])
        count = whole["input_ids"].shape[1] - context.shape[1]
        if count < 1:
            raise ValueError(f"the continuation {continuation!r} has no tokens")
        logits = self.model(**whole).logits[0]
        targets = whole["input_ids"][0, -count:]
        # The last positions predict the continuation (a pruning graft keeps every text token).
        return _continuation_scores(logits[-count - 1:-1], targets)


def build_backend(spec: EvalSpec) -> FlashSlothBackend | HFBackend:
    """Load the spec's model and graft what it asks for."""
    return FlashSlothBackend(spec) if spec.kind == "flashsloth" else HFBackend(spec)
