"""The "detail" task: one large shape carrying a small dot, plus loose distractor dots.

The synthetic task of the compression ablation (`benchmarks.ablation`). A picture holds
one coloured shape (circle, square, triangle or diamond) of random size and position,
large enough to reach into most of the 3x3 pooling windows of the vision grid; a small
dot of another colour sits at a random place on it; and a few loose dots of any colour,
the same size, sit on the white background. Three questions, each answered by one word:

- "dot": the colour of the dot on the shape. A detail of about one vision patch (6 px
  across; a patch is 8 px at the default 72 px picture) in one window whose other
  patches hold the shape's colour: averaging the window dilutes it ninefold, and the
  loose dots are distractors of the same size and kind.
- "colour": the colour of the shape (most of the picture: survives any pooling).
- "shape": the outline, spread over the windows at the shape's edge.

So the instruction decides which part of the picture matters, and the picture decides
where the detail is. Nothing is looked up by name: an earlier design that named a cell of
a grid in each question left the tiny from-scratch LLM of the CPU recipe at the answer
prior within the ablation's budget, whatever the compressor (docs/benchmarks.md).

Files and formats are those of `synthetic.generate_dataset` (``images/``,
``pretrain.json``, ``instruct.json``, ``test.json``, ``info.json``); every training
picture gets the three questions in a random order, the test pictures one question each,
the types in turn.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from .synthetic import COLOURS, NUMBER_WORDS, SHAPES, Question

__all__ = [
    "DETAIL_QUESTION_TYPES",
    "DetailScene",
    "Dot",
    "detail_caption",
    "detail_questions",
    "draw_detail_scene",
    "generate_detail_dataset",
    "random_detail_scene",
]

DETAIL_QUESTION_TYPES = ("dot", "colour", "shape")
DOT_RADIUS = 3 / 72  # of the picture side: 3 px at 72 px, a 6-7 px dot inside an 8 px patch
SIZE_RANGE = (0.6, 0.78)  # the shape's side, of the picture side
JITTER = 0.05  # the shape's centre moves this far (of the side) from the picture's centre
MIN_IMAGE_SIZE = 24
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Dot:
    """A dot of `colour` centred at (x, y), in pixels."""

    x: int
    y: int
    colour: str


@dataclass(frozen=True)
class DetailScene:
    """The shape (kind, colour, bounding box in pixels), its dot, the loose dots, the size."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]  # left, top, right, bottom
    dot: Dot
    loose: tuple[Dot, ...]
    size: int


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: object) -> None:
    left, top, right, bottom = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _valid_centres(mask: Image.Image, clearance: int) -> list[tuple[int, int]]:
    """Pixels at least `clearance` px (in both axes) inside the white part of `mask`."""
    eroded = mask.filter(ImageFilter.MinFilter(2 * clearance + 1))
    width, height = eroded.size
    data = eroded.tobytes()  # "L": one byte per pixel, row-major
    return [(x, y) for y in range(clearance, height - clearance) for x in range(clearance, width - clearance)
            if data[y * width + x]]


def _radius(size: int) -> int:
    return max(1, round(DOT_RADIUS * size))


def random_detail_scene(rng: random.Random, size: int = 72, num_distractors: int = 3) -> DetailScene:
    """A shape with a dot, and `num_distractors` loose dots, for a size x size picture."""
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be >= {MIN_IMAGE_SIZE} px, got {size}")
    if not 0 <= num_distractors <= 4:
        raise ValueError(f"num_distractors must be in [0, 4], got {num_distractors}")
    shape = rng.choice(SHAPES)
    colour = rng.choice(list(COLOURS))
    side = round(rng.uniform(*SIZE_RANGE) * size)
    cx = round(size / 2 + rng.uniform(-JITTER, JITTER) * size)
    cy = round(size / 2 + rng.uniform(-JITTER, JITTER) * size)
    box = (cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side)
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, box, 255)
    radius = _radius(size)
    # The dot lies wholly on the shape, with a pixel of the shape's colour around it.
    x, y = rng.choice(_valid_centres(mask, radius + 1))
    dot = Dot(x, y, rng.choice([c for c in COLOURS if c != colour]))
    # Loose dots: on the background, clear of the shape and of each other.
    background = Image.eval(mask, lambda v: 255 - v)
    free = ImageDraw.Draw(background)
    loose = []
    for _ in range(num_distractors):
        centres = _valid_centres(background, radius + 2)
        if not centres:
            break  # a large square leaves no room: fewer distractors
        lx, ly = rng.choice(centres)
        loose.append(Dot(lx, ly, rng.choice(list(COLOURS))))
        reach = 3 * radius + 2
        free.rectangle((lx - reach, ly - reach, lx + reach, ly + reach), fill=0)
    return DetailScene(shape, colour, box, dot, tuple(loose), size)


def _disc(draw: ImageDraw.ImageDraw, dot: Dot, radius: int) -> None:
    draw.ellipse((dot.x - radius, dot.y - radius, dot.x + radius, dot.y + radius), fill=COLOURS[dot.colour])


def draw_detail_scene(scene: DetailScene) -> Image.Image:
    """Draw `scene` on a white RGB picture of its size."""
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    _draw_shape(draw, scene.shape, scene.box, COLOURS[scene.colour])
    radius = _radius(scene.size)
    for dot in (scene.dot, *scene.loose):
        _disc(draw, dot, radius)
    return image


def detail_questions(scene: DetailScene) -> list[Question]:
    """The three questions about the picture, in `DETAIL_QUESTION_TYPES` order."""
    return [
        Question("dot", "What colour is the small dot on the shape?", scene.dot.colour),
        Question("colour", "What colour is the shape?", scene.colour),
        Question("shape", "What kind of shape is it?", scene.shape),
    ]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def detail_caption(scene: DetailScene) -> str:
    """A one-sentence description (the stage-1 alignment target)."""
    loose = len(scene.loose)
    tail = f", and {NUMBER_WORDS[loose]} loose dot{'s' if loose != 1 else ''}" if loose else ""
    dot = scene.dot.colour
    return f"{_article(scene.colour).capitalize()} {scene.colour} {scene.shape} with {_article(dot)} {dot} dot{tail}."


def _conversation(questions: list[Question]) -> list[dict[str, str]]:
    turns = []
    for i, q in enumerate(questions):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q.text})
        turns.append({"from": "gpt", "value": q.answer})
    return turns


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def generate_detail_dataset(
    out_dir: str | Path,
    *,
    num_train: int,
    num_test: int,
    seed: int,
    image_size: int = 72,
    num_distractors: int = 3,
    progress: bool = True,
) -> dict:
    """Write the detail data set into `out_dir` (files overwritten); returns the info dict."""
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train} and {num_test}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} px, got {image_size}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    # One generator per split, so changing num_test leaves the training split unchanged.
    train_rng, test_rng = random.Random(f"{seed}:detail:train"), random.Random(f"{seed}:detail:test")

    pretrain, instruct, test = [], [], []
    for i in tqdm(range(num_train), desc="train pictures", disable=not progress):
        scene = random_detail_scene(train_rng, image_size, num_distractors)
        name = f"train_{i:06d}.png"
        draw_detail_scene(scene).save(images / name)
        sample_id = f"train-{i:06d}"
        pretrain.append({"id": sample_id, "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": detail_caption(scene)}]})
        rounds = detail_questions(scene)
        train_rng.shuffle(rounds)
        instruct.append({"id": sample_id, "image": name, "conversations": _conversation(rounds)})
    for i in tqdm(range(num_test), desc="test pictures", disable=not progress):
        scene = random_detail_scene(test_rng, image_size, num_distractors)
        name = f"test_{i:06d}.png"
        draw_detail_scene(scene).save(images / name)
        question = detail_questions(scene)[i % len(DETAIL_QUESTION_TYPES)]  # balanced types
        test.append({"id": f"test-{i:06d}", "image": name, "conversations": _conversation([question]),
                     "answer": question.answer, "question_type": question.type})

    info = {
        "task": "detail",
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_test": num_test,
        "num_text_only": 0,
        "num_distractors": num_distractors,
        "question_types": list(DETAIL_QUESTION_TYPES),
        "answers": {"dot": list(COLOURS), "colour": list(COLOURS), "shape": list(SHAPES)},
        "files": {"images": "images", "pretrain": "pretrain.json", "instruct": "instruct.json", "test": "test.json"},
    }
    _write_json(out / "pretrain.json", pretrain)
    _write_json(out / "instruct.json", instruct)
    _write_json(out / "test.json", test)
    _write_json(out / "info.json", info)
    return info
