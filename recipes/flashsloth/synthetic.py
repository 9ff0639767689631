"""A small synthetic data set in LLaVA's formats, for CPU runs whose accuracy is measurable.

Each picture is a 3x3 grid of cells; a cell is empty or holds a coloured shape, and some
shapes carry a small dot of another colour (a detail that uniform pooling blurs away).
Questions need both the picture and the instruction, and every answer is one word from a
small vocabulary, so exact-match accuracy is meaningful::

    python -m recipes.flashsloth.synthetic --out data/synthetic --num-train 512 --num-test 128 --seed 0

writes, all deterministic given the arguments:

- ``images/``: PNG pictures (``train_000000.png``, ``test_000000.png``).
- ``pretrain.json``: stage 1, LLaVA-558k format, one caption per train picture.
- ``instruct.json``: stage 2, LLaVA-665k format, 1-3 question rounds per train picture,
  plus text-only samples (no "image" key).
- ``test.json``: held-out pictures, one question each, with "answer" and "question_type".
- ``info.json``: arguments, counts and the answer vocabulary.

``--task detail`` writes the compression ablation's task instead, in the same files: one
shape with a small dot among loose distractor dots (`synthetic_detail`). The CPU demo
trains on that task: the grid's questions name a cell, and the tiny from-scratch LLM
does not learn to bind a cell's name to its image token within minutes (it learns each
question type's answer prior; docs/flashsloth.md). The grid task still exercises every
part of the formats: several rounds per picture, text-only samples, LLaVA's answer
suffix.

Image paths in the JSON files are relative to ``images/`` (the config's ``image_folder``).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = [
    "ANSWER_SUFFIX",
    "CELLS",
    "COLOURS",
    "NUMBER_WORDS",
    "QUESTION_TYPES",
    "SHAPES",
    "TASKS",
    "Item",
    "Question",
    "Scene",
    "answer_vocabulary",
    "caption",
    "draw_scene",
    "generate_dataset",
    "questions",
    "random_scene",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 10),
}
SHAPES = ("circle", "square", "triangle", "diamond")
CELLS = (
    "top-left", "top-middle", "top-right",
    "middle-left", "centre", "middle-right",
    "bottom-left", "bottom-middle", "bottom-right",
)  # fmt: skip
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIDES = {"circle": "zero", "triangle": "three", "square": "four", "diamond": "four"}
QUESTION_TYPES = ("colour", "shape", "occupied", "count", "dot", "where")
ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."  # as in LLaVA-1.5
TASKS = ("grid", "detail")  # this module's grid questions; `synthetic_detail`'s task
BACKGROUND = (255, 255, 255)
MIN_IMAGE_SIZE = 24


@dataclass(frozen=True)
class Item:
    """What one cell holds."""

    shape: str
    colour: str
    dot: str | None = None  # colour of the small dot, if any


Scene = tuple["Item | None", ...]  # 9 cells, row-major


@dataclass(frozen=True)
class Question:
    type: str
    text: str
    answer: str


def random_scene(rng: random.Random, empty_prob: float = 0.3, dot_prob: float = 0.4) -> Scene:
    """Nine cells, each empty with ``empty_prob``, else a shape (with a dot: ``dot_prob``)."""
    cells: list[Item | None] = []
    colours = list(COLOURS)
    for _ in CELLS:
        if rng.random() < empty_prob:
            cells.append(None)
            continue
        colour = rng.choice(colours)
        dot = rng.choice([c for c in colours if c != colour]) if rng.random() < dot_prob else None
        cells.append(Item(rng.choice(SHAPES), colour, dot))
    return tuple(cells)


def draw_scene(scene: Scene, size: int) -> Image.Image:
    """Draw ``scene`` on a white size x size RGB picture."""
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be >= {MIN_IMAGE_SIZE} px, got {size}")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for index, item in enumerate(scene):
        if item is None:
            continue
        row, col = divmod(index, 3)
        margin = 0.15 * cell
        left, top = col * cell + margin, row * cell + margin
        right, bottom = (col + 1) * cell - margin, (row + 1) * cell - margin
        cx, cy = (left + right) / 2, (top + bottom) / 2
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif item.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        elif item.shape == "triangle":
            draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=fill)
        elif item.shape == "diamond":
            draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=fill)
        else:
            raise ValueError(f"unknown shape {item.shape!r}; known: {SHAPES}")
        if item.dot is not None:
            radius = max(1.5, 0.12 * cell)
            dy = 0.12 * cell if item.shape == "triangle" else 0.0  # a triangle is widest low
            draw.ellipse(
                (cx - radius, cy + dy - radius, cx + radius, cy + dy + radius),
                fill=COLOURS[item.dot],
            )
    return image


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe_item(item: Item, cell: str) -> str:
    dot = f" with {_article(item.dot)} {item.dot} dot" if item.dot else ""
    return f"{_article(item.colour)} {item.colour} {item.shape}{dot} in the {cell} cell"


def caption(scene: Scene, rng: random.Random) -> str:
    """A one-sentence description listing the cells row by row."""
    parts = [_describe_item(item, cell) for item, cell in zip(scene, CELLS) if item]
    if not parts:
        return "An empty grid."
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    opening = rng.choice(("A grid with", "This picture shows", "The cells hold"))
    return f"{opening} {listed}."


def questions(scene: Scene) -> list[Question]:
    """Every question this scene answers, in a fixed order."""
    found: list[Question] = []
    for item, cell in zip(scene, CELLS):
        found.append(
            Question("occupied", f"Is there a shape in the {cell} cell?", "yes" if item else "no")
        )
        if item is None:
            continue
        found.append(Question("colour", f"What colour is the shape in the {cell} cell?", item.colour))
        found.append(Question("shape", f"What shape is in the {cell} cell?", item.shape))
        if item.dot:
            found.append(Question("dot", f"What colour is the small dot in the {cell} cell?", item.dot))
    for colour in COLOURS:
        count = sum(1 for item in scene if item and item.colour == colour)
        found.append(Question("count", f"How many {colour} shapes are there?", NUMBER_WORDS[count]))
    kinds = [(item.colour, item.shape) for item in scene if item]
    for item, cell in zip(scene, CELLS):
        if item and kinds.count((item.colour, item.shape)) == 1:
            found.append(Question("where", f"Which cell holds the {item.colour} {item.shape}?", cell))
    return found


def answer_vocabulary() -> dict[str, list[str]]:
    """Every possible answer, by question type."""
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "occupied": ["yes", "no"],
        "count": list(NUMBER_WORDS),
        "dot": list(COLOURS),
        "where": list(CELLS),
        "text": list(NUMBER_WORDS),
    }


def _pick_questions(scene: Scene, rng: random.Random, count: int) -> list[Question]:
    """``count`` questions of different types (types drawn uniformly among those present)."""
    by_type: dict[str, list[Question]] = {}
    for q in questions(scene):
        by_type.setdefault(q.type, []).append(q)
    types = rng.sample(sorted(by_type), min(count, len(by_type)))
    return [rng.choice(by_type[t]) for t in types]


def _text_only_round(rng: random.Random) -> Question:
    kind = rng.choice(("plus", "minus", "sides"))
    if kind == "plus":
        a = rng.randrange(0, 10)
        b = rng.randrange(0, 10 - a)
        return Question("text", f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a + b])
    if kind == "minus":
        a = rng.randrange(0, 10)
        b = rng.randrange(0, a + 1)
        return Question("text", f"What is {NUMBER_WORDS[a]} minus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a - b])
    shape = rng.choice(SHAPES)
    return Question("text", f"How many sides does a {shape} have?", SIDES[shape])


def _conversation(qs: Sequence[Question], with_image: bool) -> list[dict[str, str]]:
    messages = []
    for i, q in enumerate(qs):
        prefix = "<image>\n" if with_image and i == 0 else ""
        messages.append({"from": "human", "value": prefix + q.text + ANSWER_SUFFIX})
        messages.append({"from": "gpt", "value": q.answer})
    return messages


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def generate_dataset(
    out_dir: str | Path,
    *,
    num_train: int,
    num_test: int,
    seed: int,
    image_size: int = 72,
    text_only_fraction: float = 0.1,
    max_rounds: int = 3,
    progress: bool = True,
    task: str = "grid",
    num_distractors: int = 3,
) -> dict:
    """Write the data set into ``out_dir`` (files overwritten); returns the info dict.

    ``task="detail"`` writes `synthetic_detail`'s task (with ``num_distractors`` loose
    dots per picture); ``text_only_fraction`` and ``max_rounds`` are the grid task's.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "detail":
        from .synthetic_detail import generate_detail_dataset  # it imports this module

        return generate_detail_dataset(out_dir, num_train=num_train, num_test=num_test, seed=seed,
                                       image_size=image_size, num_distractors=num_distractors, progress=progress)
    minimums = (("num_train", num_train, 1), ("num_test", num_test, 0), ("max_rounds", max_rounds, 1))
    for name, value, low in minimums:
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} px, got {image_size}")
    if not 0.0 <= text_only_fraction <= 1.0:
        raise ValueError(f"text_only_fraction must be in [0, 1], got {text_only_fraction}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    # One generator per split, so changing num_test leaves the training split unchanged.
    train_rng = random.Random(f"{seed}:train")
    test_rng = random.Random(f"{seed}:test")
    text_rng = random.Random(f"{seed}:text")

    pretrain, instruct, test = [], [], []
    for i in tqdm(range(num_train), desc="train pictures", disable=not progress):
        scene = random_scene(train_rng)
        name = f"train_{i:06d}.png"
        draw_scene(scene, image_size).save(images / name)
        sample_id = f"train-{i:06d}"
        pretrain.append({
            "id": sample_id,
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>"},
                {"from": "gpt", "value": caption(scene, train_rng)},
            ],
        })
        rounds = _pick_questions(scene, train_rng, train_rng.randint(1, max_rounds))
        instruct.append({"id": sample_id, "image": name, "conversations": _conversation(rounds, True)})

    num_text = round(num_train * text_only_fraction)
    for i in range(num_text):
        rounds = [_text_only_round(text_rng) for _ in range(text_rng.randint(1, 2))]
        instruct.append({"id": f"text-{i:06d}", "conversations": _conversation(rounds, False)})
    text_rng.shuffle(instruct)  # mix text-only samples in, as in the 665k mix

    for i in tqdm(range(num_test), desc="test pictures", disable=not progress):
        scene = random_scene(test_rng)
        name = f"test_{i:06d}.png"
        draw_scene(scene, image_size).save(images / name)
        # Round-robin over question types keeps the test set balanced; a scene without
        # the wanted type (no dot, no unique shape) falls back to the next type.
        available = {q.type for q in questions(scene)}
        wanted = next(
            QUESTION_TYPES[(i + k) % len(QUESTION_TYPES)]
            for k in range(len(QUESTION_TYPES))
            if QUESTION_TYPES[(i + k) % len(QUESTION_TYPES)] in available
        )
        q = test_rng.choice([q for q in questions(scene) if q.type == wanted])
        test.append({
            "id": f"test-{i:06d}",
            "image": name,
            "conversations": _conversation([q], True),
            "answer": q.answer,
            "question_type": q.type,
        })

    info = {
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_test": num_test,
        "num_text_only": num_text,
        "max_rounds": max_rounds,
        "text_only_fraction": text_only_fraction,
        "question_types": list(QUESTION_TYPES),
        "answers": answer_vocabulary(),
        "files": {
            "images": "images",
            "pretrain": "pretrain.json",
            "instruct": "instruct.json",
            "test": "test.json",
        },
    }
    _write_json(out / "pretrain.json", pretrain)
    _write_json(out / "instruct.json", instruct)
    _write_json(out / "test.json", test)
    _write_json(out / "info.json", info)
    return info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.flashsloth.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, required=True, help="training pictures")
    parser.add_argument("--num-test", type=int, required=True, help="held-out pictures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=72, help="side in pixels (>= 24)")
    parser.add_argument("--text-only-fraction", type=float, default=0.1,
                        help="text-only samples, as a fraction of --num-train")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--task", choices=TASKS, default="grid",
                        help="grid: the recipe's grid questions; detail: the compression ablation's task")
    parser.add_argument("--num-distractors", type=int, default=3, help="loose dots per picture (--task detail)")
    args = parser.parse_args(argv)
    try:
        info = generate_dataset(
            args.out,
            num_train=args.num_train,
            num_test=args.num_test,
            seed=args.seed,
            image_size=args.image_size,
            text_only_fraction=args.text_only_fraction,
            progress=not args.no_progress,
            task=args.task,
            num_distractors=args.num_distractors,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(
        f"wrote {info['num_train']} train pictures, {info['num_text_only']} text-only samples "
        f"and {info['num_test']} test pictures to {args.out}"
    )


if __name__ == "__main__":
    main()
