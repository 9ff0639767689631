"""The CPU demo (the README's first command): every step runs (quick mode), and it learns (a short run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes.flashsloth.demo import DemoSizes, main, run_demo
from recipes.flashsloth.model import FlashSloth


@pytest.mark.slow
def test_quick_demo_trains_both_stages_and_reports_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "[4/4]" in printed and "held-out accuracy" in printed and "chance" in printed

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["stage1"]["steps"], summary["stage2"]["steps"]) == (3, 4)
    assert summary["eval"]["num_samples"] == 16
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0 and 0.0 < summary["eval"]["chance"] < 1.0
    assert len(summary["eval"]["examples"]) == 5
    assert summary["machine"]["torch"] == torch.__version__ and summary["machine"]["device"] == "cpu"
    model = FlashSloth.from_pretrained(tmp_path / "stage2" / "model")
    assert model.num_image_tokens == 9 and len(model.query_token_ids) == 9


# The full demo cut to about 40 s: a fifth of its pictures, and 400 stage-2 steps of 8
# samples instead of 1,500 of 16. One thread, so the run (and its accuracy) repeats exactly.
SHORT = DemoSizes(
    num_train=400,
    num_test=60,
    stage1=("training.max_steps=10",),
    stage2=("training.max_steps=400", "training.global_batch_size=8", "training.micro_batch_size=8"),
)


@pytest.mark.slow
@pytest.mark.usefixtures("one_cpu_thread")
def test_demo_model_answers_from_the_picture_above_the_answer_prior(tmp_path: Path) -> None:
    """The acceptance point of the recipe: after the two tiny stages, held-out answers beat
    not only uniform chance but the answer prior (each question type's most frequent
    answer), which a model reading only the question reaches."""
    summary = run_demo(tmp_path, sizes=SHORT)
    result = summary["eval"]
    assert result["num_samples"] == 60
    assert summary["stage2"]["last_loss"] < 0.5 * summary["stage2"]["first_loss"]
    assert result["accuracy"] > result["prior"] + 0.15, result
    # The shape's colour fills most of the picture: every variant of the ablation gets it.
    assert result["by_type"]["colour"] >= 0.9, result["by_type"]
