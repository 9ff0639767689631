"""benchmarks.ablation: quick runs write the report, and a rerun repeats its accuracy exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks import ablation  # noqa: E402
from benchmarks.ablation import DEFAULT_VARIANTS, QUICK, VARIANTS  # noqa: E402
from benchmarks.ablation_report import paired_differences, render_markdown, summarize  # noqa: E402
from tokencompress.environment import describe_environment  # noqa: E402

TOKENS = {"none": (81, 81), "avgpool": (9, 9), "sap": (9, 9), "sap_embq3": (9, 12), "sap_embq9": (9, 18)}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("ablation")
    report = ablation.main(["--quick", "--threads", "1", "--out", str(root / "results"), "--work", str(root / "work")])
    return report, root


def test_quick_run_writes_every_variant(quick_run: tuple[dict[str, Any], Path]) -> None:
    report, root = quick_run
    results = root / "results"
    saved = json.loads((results / "ablation.json").read_text())
    assert [(r["variant"], r["seed"]) for r in saved["runs"]] == [(name, 0) for name in DEFAULT_VARIANTS]
    for run in saved["runs"]:
        assert (run["visual_tokens"], run["token_budget"]) == TOKENS[run["variant"]]
        assert 0.0 <= run["accuracy"] <= 1.0 and set(run["by_type"]) == {"dot", "colour", "shape"}
        assert run["num_test"] == QUICK.num_test and run["curve"][-1]["step"] == QUICK.stage2_steps
        assert run["stage2_seconds"] > 0
    assert [row["name"] for row in saved["summary"]] == list(DEFAULT_VARIANTS)
    assert saved["command"].startswith("python -m benchmarks.ablation --quick")
    markdown = (results / "ablation.md").read_text()
    assert all(f"| {name} |" in markdown for name in DEFAULT_VARIANTS) and saved["command"] in markdown
    assert (results / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # SAP learns at both stages, AvgPool and "none" have nothing to learn, EmbQ only with queries.
    params = {r["variant"]: (r["trainable_compressor_params"], r["embq_params"]) for r in saved["runs"]}
    assert params["sap"][0] > 0 and params["avgpool"] == params["none"] == (0, 0)
    assert params["sap"][1] == 0 < params["sap_embq3"][1] < params["sap_embq9"][1]


def test_rerun_of_one_variant_repeats_its_accuracy(quick_run: tuple[dict[str, Any], Path]) -> None:
    report, root = quick_run
    first = next(r for r in report["runs"] if r["variant"] == "sap_embq9")
    again = ablation.main(["--quick", "--threads", "1", "--variants", "sap_embq9", "--seeds", "0",
                           "--out", str(root / "again"), "--work", str(root / "work")])
    (second,) = again["runs"]
    assert second["accuracy"] == first["accuracy"] and second["by_type"] == first["by_type"]
    assert second["curve"] == first["curve"] and second["examples"] == first["examples"]
    assert second["stage2_loss"] == first["stage2_loss"]  # bit for bit, not just the same score


def _fake_report() -> dict[str, Any]:
    accuracy = {("sap", 0): 0.6, ("sap", 1): 0.5, ("avgpool", 0): 0.4, ("avgpool", 1): 0.55}
    runs = [{"variant": v, "seed": s, "accuracy": a, "by_type": {"dot": a}, "visual_tokens": 9,
             "token_budget": 9, "stage1_seconds": 1.0, "stage2_seconds": 2.0, "eval_seconds": 0.5,
             "stage2_loss": 0.3, "prior": 0.25, "chance": 0.2, "curve": [{"step": 10, "accuracy": a}]}
            for (v, s), a in accuracy.items()]
    return {"command": "python -m benchmarks.ablation", "settings": vars(QUICK) | {}, "seeds": [0, 1],
            "variants": [vars(VARIANTS["avgpool"]), vars(VARIANTS["sap"])], "jobs": 1, "threads": 1,
            "wall_seconds": 1.0, "machine": describe_environment("cpu"), "runs": runs}


def test_summary_and_paired_differences() -> None:
    report = _fake_report()
    rows = {row["name"]: row for row in summarize(report)}
    assert rows["sap"]["accuracy"]["mean"] == pytest.approx(0.55)
    assert rows["sap"]["accuracy"]["std"] == pytest.approx(0.0707107, rel=1e-5)  # sample std, n - 1
    (sap_vs_avgpool,) = paired_differences(report)  # the other contrasts lack a variant
    assert (sap_vs_avgpool["a"], sap_vs_avgpool["b"]) == ("sap", "avgpool")
    assert sap_vs_avgpool["per_seed"] == pytest.approx([0.2, -0.05]) and sap_vs_avgpool["positive"] == 1
    assert "| sap - avgpool |" in render_markdown(report)


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown variants"):
        ablation.run_ablation(variants=["pixelshuffle"], seeds=[0], settings=QUICK, work=tmp_path)
