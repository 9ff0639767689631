"""Synthetic data set: determinism, LLaVA formats, and answers that match the pictures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from recipes.flashsloth.synthetic import (
    ANSWER_SUFFIX,
    CELLS,
    COLOURS,
    QUESTION_TYPES,
    Item,
    answer_vocabulary,
    caption,
    draw_scene,
    generate_dataset,
    main,
    questions,
    random_scene,
)

SIZE = 48


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load(root: Path, name: str):
    return json.loads((root / name).read_text())


def cell_point(index: int, size: int, dy: float = -0.15) -> tuple[int, int]:
    """A pixel inside any shape of cell ``index``, away from its dot."""
    cell = size / 3
    row, col = divmod(index, 3)
    return int((col + 0.5) * cell), int((row + 0.5 + dy) * cell)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    kwargs = dict(num_train=6, num_test=3, image_size=SIZE, progress=False)
    generate_dataset(tmp_path / "a", seed=5, **kwargs)
    generate_dataset(tmp_path / "b", seed=5, **kwargs)
    generate_dataset(tmp_path / "c", seed=6, **kwargs)
    a, b, c = files_of(tmp_path / "a"), files_of(tmp_path / "b"), files_of(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a["pretrain.json"] != c["pretrain.json"]


def test_test_split_does_not_change_the_training_split(tmp_path):
    generate_dataset(tmp_path / "a", num_train=5, num_test=2, seed=1, image_size=SIZE, progress=False)
    generate_dataset(tmp_path / "b", num_train=5, num_test=9, seed=1, image_size=SIZE, progress=False)
    assert load(tmp_path / "a", "instruct.json") == load(tmp_path / "b", "instruct.json")


def test_pretrain_file_is_llava_558k_format(synthetic_dir):
    records = load(synthetic_dir, "pretrain.json")
    assert len(records) == 8
    for record in records:
        assert set(record) == {"id", "image", "conversations"}
        human, gpt = record["conversations"]
        assert human == {"from": "human", "value": "<image>"}
        assert gpt["from"] == "gpt" and gpt["value"].endswith(".")
        assert (synthetic_dir / "images" / record["image"]).is_file()


def test_instruct_file_is_llava_665k_format(synthetic_dir):
    records = load(synthetic_dir, "instruct.json")
    with_image = [r for r in records if "image" in r]
    text_only = [r for r in records if "image" not in r]
    assert len(with_image) == 8 and len(text_only) == 2  # 25% of 8
    assert any(len(r["conversations"]) > 2 for r in records)  # multi-turn samples exist
    for record in records:
        conversation = record["conversations"]
        assert len(conversation) % 2 == 0
        assert [t["from"] for t in conversation] == ["human", "gpt"] * (len(conversation) // 2)
        markers = sum(t["value"].count("<image>") for t in conversation)
        assert markers == (1 if "image" in record else 0)
        if "image" in record:
            assert conversation[0]["value"].startswith("<image>\n")
        for human in conversation[0::2]:
            assert human["value"].endswith(ANSWER_SUFFIX)
        vocabulary = {w for words in answer_vocabulary().values() for w in words}
        for gpt in conversation[1::2]:
            assert gpt["value"] in vocabulary  # single-word answers, measurable by exact match


def test_test_file_has_answers_and_balanced_types(tmp_path):
    generate_dataset(tmp_path, num_train=1, num_test=24, seed=0, image_size=SIZE, progress=False)
    records = load(tmp_path, "test.json")
    assert len(records) == 24
    for record in records:
        assert record["conversations"][1]["value"] == record["answer"]
        assert record["answer"] in answer_vocabulary()[record["question_type"]]
    types = [r["question_type"] for r in records]
    assert set(types) == set(QUESTION_TYPES)


def test_info_file(synthetic_dir):
    info = load(synthetic_dir, "info.json")
    assert (info["seed"], info["image_size"], info["num_train"], info["num_test"]) == (0, SIZE, 8, 4)
    assert info["answers"]["colour"] == list(COLOURS)


def test_drawn_pixels_match_the_scene():
    scene = (
        Item("circle", "red", dot="blue"), None, Item("triangle", "green"),
        None, Item("square", "yellow", dot="purple"), None,
        Item("diamond", "orange"), None, Item("triangle", "blue", dot="red"),
    )  # fmt: skip
    image = draw_scene(scene, 72)
    assert image.size == (72, 72) and image.mode == "RGB"
    for index, item in enumerate(scene):
        body = image.getpixel(cell_point(index, 72))
        if item is None:
            assert body == (255, 255, 255)
            continue
        assert body == COLOURS[item.colour], (index, item)
        if item.dot:
            cell = 72 / 3
            row, col = divmod(index, 3)
            dy = 0.12 * cell if item.shape == "triangle" else 0.0
            centre = (int((col + 0.5) * cell), int((row + 0.5) * cell + dy))
            assert image.getpixel(centre) == COLOURS[item.dot]


def test_questions_answer_from_the_scene():
    scene = (
        Item("circle", "red"), Item("circle", "red", dot="green"), None,
        None, Item("square", "blue"), None,
        None, None, None,
    )  # fmt: skip
    found = {(q.type, q.text): q.answer for q in questions(scene)}
    assert found[("colour", "What colour is the shape in the top-middle cell?")] == "red"
    assert found[("shape", "What shape is in the centre cell?")] == "square"
    assert found[("occupied", "Is there a shape in the top-right cell?")] == "no"
    assert found[("count", "How many red shapes are there?")] == "two"
    assert found[("count", "How many green shapes are there?")] == "zero"
    assert found[("dot", "What colour is the small dot in the top-middle cell?")] == "green"
    assert found[("where", "Which cell holds the blue square?")] == "centre"
    # Two red circles: "which cell" would be ambiguous, so it is not asked.
    assert ("where", "Which cell holds the red circle?") not in found


def test_caption_lists_cells_in_order():
    scene = (Item("circle", "orange", dot="red"),) + (None,) * 7 + (Item("square", "blue"),)
    text = caption(scene, random.Random(0))
    assert text.endswith(
        "an orange circle with a red dot in the top-left cell and a blue square in the bottom-right cell."
    )
    assert caption((None,) * 9, random.Random(0)) == "An empty grid."


def test_random_scene_is_deterministic_and_valid():
    a, b = random_scene(random.Random(3)), random_scene(random.Random(3))
    assert a == b and len(a) == len(CELLS)
    for item in a:
        assert item is None or (item.colour in COLOURS and item.dot != item.colour)


@pytest.mark.parametrize("size", [24, 96])
def test_image_size_is_configurable(tmp_path, size):
    generate_dataset(tmp_path, num_train=2, num_test=1, seed=0, image_size=size, progress=False)
    for path in (tmp_path / "images").iterdir():
        with Image.open(path) as image:
            assert image.size == (size, size)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_train=0, num_test=1), "num_train must be >= 1, got 0"),
        (dict(num_train=1, num_test=-1), "num_test must be >= 0, got -1"),
        (dict(num_train=1, num_test=1, image_size=10), "image_size must be >= 24 px, got 10"),
        (dict(num_train=1, num_test=1, text_only_fraction=2.0),
         "text_only_fraction must be in \\[0, 1\\], got 2.0"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_dataset(tmp_path, seed=0, progress=False, **kwargs)


def test_cli_writes_the_files(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num-train", "3", "--num-test", "2", "--seed", "1",
          "--image-size", "32", "--no-progress"])
    written = {p.name for p in tmp_path.iterdir()}
    assert {"pretrain.json", "instruct.json", "test.json", "info.json", "images"} <= written
    assert "wrote 3 train pictures" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--num-train", "3", "--num-test", "2", "--image-size", "8",
              "--no-progress"])
    assert "image_size must be >= 24" in capsys.readouterr().err
