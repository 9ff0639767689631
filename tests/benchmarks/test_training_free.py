"""benchmarks.training_free: the quick run's report, the tokens each method really feeds,
selection of every token as the identity, and reuse of the trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks import training_free  # noqa: E402
from benchmarks.training_free import (  # noqa: E402
    ALL_TOKENS,
    METHODS,
    QUICK,
    checkpoint_dir,
    evaluate_compressed,
    grafted,
    visionzip_split,
)
from benchmarks.training_free_report import paired_differences, render_markdown, summarize  # noqa: E402
from recipes.flashsloth.chat import FlashSlothChat  # noqa: E402
from recipes.flashsloth.data import load_llava_json  # noqa: E402
from recipes.flashsloth.model import FlashSloth  # noqa: E402
from tokencompress import AvgPool  # noqa: E402
from tokencompress.environment import describe_environment  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("training_free")
    report = training_free.main(["--quick", "--out", str(root / "results"), "--work", str(root / "work")])
    return report, root


@pytest.fixture(scope="module")
def trained(quick_run: tuple[dict[str, Any], Path]) -> tuple[FlashSloth, list[dict[str, Any]], Path]:
    """The quick run's uncompressed model of seed 0, its held-out records and images."""
    _, root = quick_run
    data = root / "work" / "data-seed0"
    model = FlashSloth.from_pretrained(checkpoint_dir(root / "work", 0))
    return model, load_llava_json(data / "test.json"), data / "images"


def test_quick_run_writes_the_report(quick_run: tuple[dict[str, Any], Path]) -> None:
    _, root = quick_run
    results = root / "results"
    saved = json.loads((results / "training_free.json").read_text())
    expected = [("none", ALL_TOKENS)] + [(m.name, b) for m in METHODS.values() for b in m.budgets]
    assert [(r["method"], r["budget"]) for r in saved["runs"]] == expected
    assert all(r["seed"] == 0 and r["num_test"] == QUICK.num_test for r in saved["runs"])
    assert all(0.0 <= r["accuracy"] <= 1.0 and set(r["by_type"]) == {"dot", "colour", "shape"} for r in saved["runs"])
    for key in ("python", "torch", "transformers", "tokencompress", "device"):
        assert saved["machine"][key]
    assert saved["command"].startswith("python -m benchmarks.training_free --quick")
    assert saved["settings"]["visionzip_splits"] == {"36": [30, 6], "18": [15, 3], "9": [8, 1]}
    assert (results / "training_free.md").read_text() == render_markdown(saved)
    assert (results / "training_free.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(row["method"], row["budget"]) for row in saved["summary"]] == expected


def test_every_method_feeds_its_budget(quick_run: tuple[dict[str, Any], Path]) -> None:
    """Counted while answering: placeholders in the prompts and features from the graft."""
    report, _ = quick_run
    for run in report["runs"]:
        assert run["visual_tokens"] == run["placeholders"] == run["budget"], run


def test_a_graft_after_building_sets_the_placeholders(trained: tuple[FlashSloth, Any, Path]) -> None:
    """FlashSloth.num_image_tokens follows a graft added to its LLaVA, and its removal."""
    model, records, images = trained
    assert model.num_image_tokens == ALL_TOKENS
    picture = _picture(images / records[0]["image"])
    with grafted(model, AvgPool(3)):
        assert model.num_image_tokens == 9
        prompt = FlashSlothChat(model, allow_no_queries=True).encode(picture, "Which colour?")["prompt"]
        assert sum(token == model.image_token_id for token in prompt.input_ids) == 9
        run = evaluate_compressed(model, None, records[:2], images)  # None: the model as it is, grafted
        assert (run["visual_tokens"], run["placeholders"]) == (9, 9)
    assert model.num_image_tokens == ALL_TOKENS
    prompt = FlashSlothChat(model, allow_no_queries=True).encode(picture, "Which colour?")["prompt"]
    assert sum(token == model.image_token_id for token in prompt.input_ids) == ALL_TOKENS


@pytest.mark.parametrize("name", ["tome", "dart"])
def test_selecting_every_token_is_the_identity(name: str, trained: tuple[FlashSloth, Any, Path]) -> None:
    """Kept in input order, all 81 tokens give the ungrafted model's logits and answers."""
    model, records, images = trained
    chat = FlashSlothChat(model, allow_no_queries=True)
    questions = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in records]
    pictures = [_picture(images / r["image"]) for r in records]
    samples = [chat.encode(p, q) for p, q in zip(pictures, questions)]
    inputs = chat.collate(samples)
    with torch.no_grad():
        plain = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits
        answers = chat.answer(pictures, questions, max_new_tokens=4)
        with grafted(model, METHODS[name].make(ALL_TOKENS)):
            chat_all = FlashSlothChat(model, allow_no_queries=True)
            inputs_all = chat_all.collate([chat_all.encode(p, q) for p, q in zip(pictures, questions)])
            assert torch.equal(inputs_all["input_ids"], inputs["input_ids"])
            kept = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits
            answers_all = chat_all.answer(pictures, questions, max_new_tokens=4)
    torch.testing.assert_close(kept, plain, rtol=1e-5, atol=1e-5)
    assert answers_all == answers


def _picture(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def test_rerun_reuses_the_checkpoint(quick_run: tuple[dict[str, Any], Path]) -> None:
    first, root = quick_run
    again = training_free.main(["--quick", "--methods", "avgpool", "--out", str(root / "again"),
                                "--work", str(root / "work")])
    (training,) = again["training"]
    assert training["reused"] and not first["training"][0]["reused"]
    before = {(r["method"], r["budget"]): r["accuracy"] for r in first["runs"]}
    assert {(r["method"], r["budget"]): r["accuracy"] for r in again["runs"]} == {
        key: before[key] for key in (("none", ALL_TOKENS), ("avgpool", 9))}


def test_visionzip_split_keeps_the_budget() -> None:
    assert [visionzip_split(b) for b in (36, 18, 9)] == [(30, 6), (15, 3), (8, 1)]
    assert all(sum(visionzip_split(b)) == b for b in range(2, 82))
    with pytest.raises(ValueError, match="at least 2"):
        visionzip_split(1)
    with pytest.raises(ValueError, match="9 only"):
        METHODS["avgpool"].make(36)


def _fake_report() -> dict[str, Any]:
    accuracy = {("none", 81, 0): 0.6, ("none", 81, 1): 0.7, ("tome", 9, 0): 0.5, ("tome", 9, 1): 0.4,
                ("avgpool", 9, 0): 0.45, ("avgpool", 9, 1): 0.45}
    runs = [{"seed": s, "method": m, "budget": b, "compressor": None if m == "none" else f"{m}()",
             "visual_tokens": b, "placeholders": b, "accuracy": a, "by_type": {"shape": a}, "num_test": 10,
             "prior": 0.25, "chance": 0.2, "examples": [], "eval_seconds": 0.1}
            for (m, b, s), a in accuracy.items()]
    training = [{"seed": s, "accuracy": 0.6, "stage1_seconds": 1.0, "stage2_seconds": 2.0, "stage1_loss": 1.0,
                 "stage2_loss": 0.5, "threads": 1, "reused": False} for s in (0, 1)]
    settings = {**vars(QUICK), "budgets": [9], "all_tokens": 81, "visionzip_splits": {"9": [8, 1]}}
    return {"command": "python -m benchmarks.training_free", "settings": settings, "seeds": [0, 1],
            "methods": [METHODS["tome"].describe(), METHODS["avgpool"].describe()], "jobs": 1, "threads": 1,
            "wall_seconds": 1.0, "machine": describe_environment("cpu"), "training": training, "runs": runs}


def test_summary_and_paired_differences() -> None:
    report = _fake_report()
    rows = {(row["method"], row["budget"]): row for row in summarize(report)}
    assert rows[("tome", 9)]["accuracy"]["mean"] == pytest.approx(0.45)
    assert rows[("tome", 9)]["change_vs_uncompressed"]["per_seed"] == pytest.approx([-0.1, -0.3])
    assert rows[("none", 81)]["change_vs_uncompressed"] is None
    (tome_vs_avgpool,) = paired_differences(report)
    assert tome_vs_avgpool["per_seed"] == pytest.approx([0.05, -0.05]) and tome_vs_avgpool["positive"] == 1
    markdown = render_markdown(report)
    assert "| none | 65.0% ± 7.1% |  |" in markdown  # the wide table: 81 tokens, then 9
    assert "| tome - avgpool | 9 | +0.0 ± 7.1 | +5.0, -5.0 | 1/2 seeds |" in markdown
