"""The ablation's "detail" task: determinism, formats, and pictures that match their answers."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from recipes.flashsloth.synthetic import COLOURS, SHAPES, generate_dataset, main
from recipes.flashsloth.synthetic_detail import (
    DETAIL_QUESTION_TYPES,
    detail_caption,
    detail_questions,
    draw_detail_scene,
    random_detail_scene,
)

SIZE = 72  # the ablation's pictures: 9x9 patches of 8 px, 3x3 pooling windows of 24 px
PATCH = 8
WHITE = (255, 255, 255)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_splits_independent(tmp_path: Path) -> None:
    kwargs = dict(task="detail", num_train=5, image_size=SIZE, progress=False)
    generate_dataset(tmp_path / "a", num_test=3, seed=4, **kwargs)
    generate_dataset(tmp_path / "b", num_test=3, seed=4, **kwargs)
    generate_dataset(tmp_path / "c", num_test=3, seed=5, **kwargs)
    generate_dataset(tmp_path / "d", num_test=7, seed=4, **kwargs)
    a, b, c, d = (files_of(tmp_path / n) for n in "abcd")
    assert a == b and a["instruct.json"] != c["instruct.json"]
    assert a["instruct.json"] == d["instruct.json"]  # more test pictures, same training split


def test_files_and_balanced_test_types(tmp_path: Path) -> None:
    info = generate_dataset(tmp_path, task="detail", num_train=4, num_test=9, seed=0, image_size=SIZE,
                            progress=False)
    assert info["task"] == "detail" and info["question_types"] == list(DETAIL_QUESTION_TYPES)
    assert json.loads((tmp_path / "info.json").read_text()) == info
    instruct = json.loads((tmp_path / "instruct.json").read_text())
    for sample in instruct:
        turns = sample["conversations"]
        assert len(turns) == 6 and turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
    pretrain = json.loads((tmp_path / "pretrain.json").read_text())
    assert [s["image"] for s in pretrain] == [s["image"] for s in instruct]
    test = json.loads((tmp_path / "test.json").read_text())
    assert Counter(s["question_type"] for s in test) == {t: 3 for t in DETAIL_QUESTION_TYPES}
    assert all((tmp_path / "images" / s["image"]).is_file() for s in test)


def test_pictures_match_the_answers() -> None:
    rng = random.Random(0)
    for _ in range(40):
        scene = random_detail_scene(rng, SIZE)
        image = draw_detail_scene(scene)
        pixels = image.load()
        radius = 3
        # The dot: its own colour (never the shape's), about one patch, ringed by the shape.
        x, y = scene.dot.x, scene.dot.y
        dot = [(i, j) for i in range(x - radius - 1, x + radius + 2) for j in range(y - radius - 1, y + radius + 2)
               if pixels[i, j] == COLOURS[scene.dot.colour]]
        assert scene.dot.colour != scene.colour and 15 <= len(dot) <= PATCH * PATCH
        assert max(i for i, _ in dot) - min(i for i, _ in dot) < PATCH
        for i, j in ((x - radius - 1, y), (x + radius + 1, y), (x, y - radius - 1), (x, y + radius + 1)):
            assert pixels[i, j] == COLOURS[scene.colour]
        # The shape's colour is the picture's most frequent non-white colour, in 5+ of 9 windows.
        colours = Counter(pixels[i, j] for i in range(SIZE) for j in range(SIZE)) - Counter({WHITE: SIZE * SIZE})
        assert colours.most_common(1)[0][0] == COLOURS[scene.colour]
        shape = COLOURS[scene.colour]
        windows = {(i // 24, j // 24) for i in range(SIZE) for j in range(SIZE) if pixels[i, j] == shape}
        assert len(windows) >= 5
        # Loose dots: on the white background, in their colours.
        for loose in scene.loose:
            assert pixels[loose.x, loose.y] == COLOURS[loose.colour]
            assert pixels[loose.x + radius + 1, loose.y] == WHITE and pixels[loose.x, loose.y - radius - 1] == WHITE


def test_questions_and_caption_read_the_scene() -> None:
    scene = random_detail_scene(random.Random(3), SIZE, num_distractors=2)
    answers = {q.type: q.answer for q in detail_questions(scene)}
    assert answers == {"dot": scene.dot.colour, "colour": scene.colour, "shape": scene.shape}
    assert scene.dot.colour != scene.colour and scene.shape in SHAPES
    assert detail_caption(scene).endswith("and two loose dots.")
    assert scene.colour in detail_caption(scene) and scene.shape in detail_caption(scene)


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task must be one of"):
        generate_dataset(tmp_path, task="maze", num_train=1, num_test=0, seed=0)
    with pytest.raises(ValueError, match="num_distractors"):
        generate_dataset(tmp_path, task="detail", num_train=1, num_test=0, seed=0, num_distractors=5)
    with pytest.raises(ValueError, match="image_size"):
        generate_dataset(tmp_path, task="detail", num_train=1, num_test=0, seed=0, image_size=8)


def test_cli_writes_the_detail_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path), "--num-train", "2", "--num-test", "3", "--task", "detail",
          "--num-distractors", "3", "--no-progress"])
    assert "wrote 2 train pictures" in capsys.readouterr().out
    info = json.loads((tmp_path / "info.json").read_text())
    assert (info["task"], info["num_distractors"], info["image_size"]) == ("detail", 3, 72)
