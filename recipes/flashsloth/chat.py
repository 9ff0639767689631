"""Answer questions about images with a FlashSloth model: batched greedy decoding.

    chat = FlashSlothChat("outputs/flashsloth")             # a saved folder, or a FlashSloth
    chat.answer([Image.open("cat.png")], ["What is on the mat?"], max_new_tokens=32)

    python -m recipes.flashsloth.chat --model outputs/flashsloth --image cat.png \\
        --question "What is on the mat?" [--question "And its colour?"] [--device cuda]

Prompts are encoded by the recipe's own Vicuna-v1 template (the one the model was trained
with: one query block after each question), images by its image processor (SigLIP, or
HD's 5 views), and batched by its collator with left padding, so every prompt ends at
the last column and generation runs on the whole batch at once with the KV cache. EmbQ
runs once, on the prefill; decoding steps reuse the query tokens' cached keys/values.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .data import DataCollator
from .model import FlashSloth
from .template import IMAGE_MARKER

__all__ = ["FlashSlothChat", "main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FlashSlothChat:
    """One-turn visual question answering with a FlashSloth model.

    Args:
        model: a `FlashSloth`, or the folder `FlashSloth.save_pretrained` wrote.
        device, dtype: where to load a folder (ignored for a model object, used as is).
        max_length: refuse prompts longer than this many tokens (default: no limit).
        allow_no_queries: accept a model without EmbQ. By default one is refused as a
            stage-1 checkpoint; a stage-2 model trained with ``num_queries=0`` (the
            paper's Table 3 rows without EmbQ) answers questions too.
    """

    def __init__(
        self,
        model: FlashSloth | str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
        allow_no_queries: bool = False,
    ) -> None:
        if not isinstance(model, FlashSloth):
            model = FlashSloth.from_pretrained(model, device=device, dtype=dtype)
        if model.embq_graft is None and not allow_no_queries:
            raise ValueError("this model has no EmbQ (a stage-1 checkpoint): it was not trained to answer questions")
        self.model = model.eval()
        self.template = model.make_template("vicuna_v1", max_length=max_length)
        self.image_processor = model.image_processor
        self.collate = DataCollator(pad_token_id=model.pad_token_id, padding_side="left")

    def encode(self, image: Image.Image | None, question: str) -> dict[str, Any]:
        """One sample as the collator takes it: the prompt and the picture's pixel values."""
        if IMAGE_MARKER in question:
            raise ValueError(f"the question contains {IMAGE_MARKER!r}; pass the image separately")
        text = question if image is None else f"{IMAGE_MARKER}\n{question}"
        prompt = self.template.encode(
            [{"from": "human", "value": text}], num_images=0 if image is None else 1, add_generation_prompt=True
        )
        pixel_values = None if image is None else self.image_processor(image).unsqueeze(0)
        return {"id": question, "prompt": prompt, "pixel_values": pixel_values}

    @torch.no_grad()
    def generate_ids(
        self, images: Sequence[Image.Image | None], questions: Sequence[str], *, max_new_tokens: int = 128
    ) -> list[list[int]]:
        """The generated token ids of each answer, up to (without) the end-of-sequence token."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        if not questions:
            return []
        batch = self.collate([self.encode(image, question) for image, question in zip(images, questions)])
        device = self.model.device
        generated = self.model.generate(
            batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            pixel_values=None if batch["pixel_values"] is None else batch["pixel_values"].to(device),
            embq_instruction_map=batch["embq_instruction_map"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=self.model.pad_token_id,
            eos_token_id=self.model.tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1]:].tolist()
        return [_until_eos(ids, self.model.tokenizer.eos_token_id) for ids in new_tokens]

    def answer(
        self,
        images: Sequence[Image.Image | None],
        questions: Sequence[str],
        *,
        max_new_tokens: int = 128,
        batch_size: int | None = None,
    ) -> list[str]:
        """Greedy answers, one per (image, question); None as an image asks without one.

        `batch_size` splits long lists into batches of that many (default: one batch).
        """
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        step = batch_size or max(len(questions), 1)
        answers: list[str] = []
        for start in range(0, len(questions), step):
            ids = self.generate_ids(images[start:start + step], questions[start:start + step],
                                    max_new_tokens=max_new_tokens)
            answers += [self.model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
        return answers


def _until_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    return ids[: ids.index(eos_token_id)] if eos_token_id in ids else ids


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ask a FlashSloth model about an image.")
    parser.add_argument("--model", required=True, help="folder written by FlashSloth.save_pretrained")
    parser.add_argument("--image", help="image file (omit to ask without an image)")
    parser.add_argument("--question", action="append", required=True, help="repeat to ask several, batched")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    chat = FlashSlothChat(args.model, device=args.device, dtype=dtype)
    image = None
    if args.image:
        with Image.open(args.image) as opened:
            image = opened.convert("RGB")
    answers = chat.answer([image] * len(args.question), args.question, max_new_tokens=args.max_new_tokens)
    for question, answer in zip(args.question, answers):
        print(f"Q: {question}\nA: {answer}")


if __name__ == "__main__":
    main()
