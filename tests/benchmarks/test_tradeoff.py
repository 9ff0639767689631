"""benchmarks.tradeoff: the quick run's report, the tokens each variant really feeds, the
lmms-eval accuracy against the recipe's own evaluation, and reuse of trained models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("lmms_eval")

from benchmarks import tradeoff
from benchmarks.ablation import data_dir
from benchmarks.tradeoff import (
    FASTV_LAYER,
    QUICK_SETTINGS,
    build_variants,
    model_folder,
    train_models,
)
from benchmarks.tradeoff_report import render_markdown
from recipes.flashsloth.chat import FlashSlothChat
from recipes.flashsloth.data import load_llava_json
from recipes.flashsloth.evaluate import evaluate
from tokencompress.evaluation.model_args import parse_model_args

# What each variant's budget says the LLM gets per picture: (tokens fed, tokens after
# FastV's layer or None, EmbQ queries). Written out, not derived from the code under test.
EXPECTED_TOKENS = {
    "none": (81, None, 0),
    "tome-36": (36, None, 0), "tome-18": (18, None, 0), "tome-9": (9, None, 0),
    "dart-36": (36, None, 0), "dart-18": (18, None, 0), "dart-9": (9, None, 0),
    "visionzip-36": (36, None, 0), "visionzip-18": (18, None, 0), "visionzip-9": (9, None, 0),
    "avgpool-9": (9, None, 0),
    "fastv-k1-50%": (81, 41, 0), "fastv-k1-25%": (81, 20, 0),  # 81 x keep, rounded half up
    "sap (trained)": (9, None, 0), "sap_embq9 (trained)": (9, None, 9),
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("tradeoff")
    report = tradeoff.main(["--quick", "--out", str(root / "results"), "--work", str(root / "work")])
    return report, root


def _run(report: dict[str, Any], variant: str) -> dict[str, Any]:
    return next(r for r in report["runs"] if r["variant"] == variant)


def test_quick_run_writes_a_report_that_renders_from_its_json(quick_run: tuple[dict[str, Any], Path]) -> None:
    _, root = quick_run
    results = root / "results"
    saved = json.loads((results / "tradeoff_quick.json").read_text())
    assert (results / "tradeoff_quick.md").read_text() == render_markdown(saved)
    assert (results / "tradeoff_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["command"].startswith("python -m benchmarks.tradeoff --quick")
    for key in ("python", "torch", "transformers", "tokencompress", "device", "lmms_eval"):
        assert isinstance(saved["machine"][key], str) and saved["machine"][key], key
    names = [v["name"] for v in saved["variants"]]
    assert names == list(EXPECTED_TOKENS)
    assert [r["variant"] for r in saved["runs"]] == names and [row["name"] for row in saved["summary"]] == names
    assert all(r["num_questions"] == QUICK_SETTINGS.num_test and 0 <= r["accuracy"] <= 1 for r in saved["runs"])
    assert all(len(saved["first_token_s"][name]["runs"]) == 1 for name in names)  # --quick: one round
    assert all(saved["first_token_s"][name]["median"] > 0 for name in names)


def test_every_variant_feeds_what_its_budget_says(quick_run: tuple[dict[str, Any], Path]) -> None:
    """Counted with hooks while lmms-eval scored: placeholders, projector outputs, and the
    image tokens each of the 4 decoder layers ran on (FastV: all in layers 1..K)."""
    report, _ = quick_run
    for variant in report["variants"]:
        fed, kept, queries = EXPECTED_TOKENS[variant["name"]]
        run = _run(report, variant["name"])
        assert (run["placeholders"], run["features"]) == (fed, fed), variant["name"]
        layers = run["image_tokens_per_layer"]
        assert layers == ([fed] * 4 if kept is None else [fed] * FASTV_LAYER + [kept] * (4 - FASTV_LAYER))
        assert (variant["image_tokens"], variant["kept_tokens"], variant["query_tokens"]) == (fed, kept, queries)


def test_lmms_eval_accuracy_equals_the_recipes_evaluation(quick_run: tuple[dict[str, Any], Path]) -> None:
    """The uncompressed model scored by lmms-eval on the local task, and by
    `recipes.flashsloth.evaluate` on the same questions, give the same answers and score."""
    report, root = quick_run
    work = root / "work"
    records = load_llava_json(data_dir(work, 0) / "test.json")
    chat = FlashSlothChat(model_folder(work, "none", 0), allow_no_queries=True)
    result = evaluate(chat, records, data_dir(work, 0) / "images", batch_size=QUICK_SETTINGS.eval_batch_size)
    run = _run(report, "none")
    assert run["num_questions"] == result.num_samples == len(records)
    assert run["accuracy"] == result.accuracy == run["recipe_accuracy"]
    assert run["examples"] == result.examples
    assert any(example["answer"] for example in result.examples), "the quick model answers nothing: a weak check"


def test_model_args_parse_as_the_plugin_reads_them(quick_run: tuple[dict[str, Any], Path]) -> None:
    _, root = quick_run
    for variant in build_variants():
        folder = model_folder(root / "work", variant.model, 0)
        args = dict(pair.split("=", 1) for pair in variant.model_args(folder).split(","))
        # lmms-eval turns numbers into ints and floats before the model sees them.
        args = {key: _number(value) for key, value in args.items()}
        assert "batch_size" not in args  # the command line's --batch_size gives it
        spec = parse_model_args(args)
        assert spec.pretrained == folder
        assert (spec.compressor is None) == (variant.method not in ("tome", "dart", "visionzip", "avgpool"))
        assert (spec.fastv_layer is not None) == (variant.method == "fastv")


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def test_trained_models_are_reused(quick_run: tuple[dict[str, Any], Path]) -> None:
    _, root = quick_run
    again = train_models(["none", "sap", "sap_embq9"], [0], QUICK_SETTINGS, root / "work")
    assert all(again[name][0]["reused"] for name in again)
    report, _ = quick_run
    first = {t["model"]: t for t in report["training"]}
    assert not any(t["reused"] for t in first.values())
    assert {name: again[name][0]["accuracy"] for name in again} == {name: t["accuracy"] for name, t in first.items()}
