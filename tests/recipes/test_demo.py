"""The CPU demo (the README's first command) in its quick mode: every step runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.flashsloth.demo import main
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
    model = FlashSloth.from_pretrained(tmp_path / "stage2" / "model")
    assert model.num_image_tokens == 9 and len(model.query_token_ids) == 9
