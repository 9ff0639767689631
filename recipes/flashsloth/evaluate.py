"""Held-out accuracy on the synthetic set (or any LLaVA JSON with an "answer" per sample).

    python -m recipes.flashsloth.evaluate --model outputs/tiny-stage2/model \\
        --data data/synthetic/test.json --image-folder data/synthetic/images

Each test sample is one picture and one question (its first human turn, without the
``<image>`` marker). Answers come from `FlashSlothChat` (greedy, batched, a few new
tokens) and count as correct when they equal the reference after `normalize_answer`.
Two baselines come with the accuracy: chance, the expected accuracy of guessing
uniformly among the possible answers of each question's type
(`synthetic.answer_vocabulary`); and the prior, the accuracy of always giving each
type's most frequent test answer (what a model that ignores the picture can reach).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from .chat import FlashSlothChat
from .data import load_llava_json
from .synthetic import answer_vocabulary
from .template import IMAGE_MARKER

__all__ = ["EvalResult", "chance_accuracy", "evaluate", "evaluate_folder", "normalize_answer", "prior_accuracy",
           "main"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s-]")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces (VQA-style exact match)."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def chance_accuracy(question_types: Sequence[str]) -> float:
    """Expected accuracy of a uniform guess among each question type's answers."""
    vocabulary = answer_vocabulary()
    if not question_types:
        return 0.0
    return sum(1.0 / len(vocabulary[kind]) for kind in question_types) / len(question_types)


def prior_accuracy(question_types: Sequence[str], references: Sequence[str]) -> float:
    """Accuracy of answering every question with its type's most frequent reference."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for kind, reference in zip(question_types, references):
        by_type[kind].append(normalize_answer(reference))
    hits = sum(max(answers.count(a) for a in set(answers)) for answers in by_type.values())
    return hits / max(len(references), 1)


@dataclass
class EvalResult:
    accuracy: float
    chance: float
    prior: float
    num_samples: int
    by_type: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)  # the first few, for a look

    def summary(self) -> str:
        types = ", ".join(f"{kind} {acc:.0%}" for kind, acc in sorted(self.by_type.items()))
        return (
            f"held-out accuracy {self.accuracy:.1%} on {self.num_samples} questions "
            f"(chance {self.chance:.1%}, most-frequent-answer prior {self.prior:.1%}); by type: {types}"
        )


def _question(record: dict[str, Any]) -> str:
    return record["conversations"][0]["value"].replace(IMAGE_MARKER, "").strip()


def evaluate(
    chat: FlashSlothChat,
    records: Sequence[dict[str, Any]],
    image_folder: str | Path,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    num_examples: int = 5,
) -> EvalResult:
    """Accuracy of ``chat`` on ``records`` (each with "image", "conversations", "answer")."""
    folder = Path(image_folder)
    correct_by_type: dict[str, list[bool]] = defaultdict(list)
    references: dict[str, list[str]] = defaultdict(list)
    examples: list[dict[str, str]] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = []
        for record in chunk:
            with Image.open(folder / record["image"]) as image:
                images.append(image.convert("RGB"))
        questions = [_question(record) for record in chunk]
        answers = chat.answer(images, questions, max_new_tokens=max_new_tokens)
        for record, question, answer in zip(chunk, questions, answers):
            correct = normalize_answer(answer) == normalize_answer(record["answer"])
            correct_by_type[record.get("question_type", "all")].append(correct)
            references[record.get("question_type", "all")].append(record["answer"])
            if len(examples) < num_examples:
                examples.append({"question": question.split("\n")[0], "answer": answer,
                                 "reference": record["answer"]})
    outcomes = [c for values in correct_by_type.values() for c in values]
    types = [kind for kind, values in correct_by_type.items() for _ in values]
    known_types = set(answer_vocabulary())
    return EvalResult(
        accuracy=sum(outcomes) / max(len(outcomes), 1),
        chance=chance_accuracy(types) if set(types) <= known_types else float("nan"),
        prior=prior_accuracy(types, [r for values in references.values() for r in values]),
        num_samples=len(outcomes),
        by_type={kind: sum(values) / len(values) for kind, values in correct_by_type.items()},
        examples=examples,
    )


def evaluate_folder(model_folder: str | Path, data_json: str | Path, image_folder: str | Path,
                    **kwargs: Any) -> EvalResult:
    """`evaluate` a saved model folder on a LLaVA JSON test file (on CPU)."""
    return evaluate(FlashSlothChat(model_folder), load_llava_json(data_json), image_folder, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder written by FlashSloth.save_pretrained")
    parser.add_argument("--data", required=True, help="test JSON (with 'answer' per sample)")
    parser.add_argument("--image-folder", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = evaluate_folder(args.model, args.data, args.image_folder, batch_size=args.batch_size)
    print(result.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
