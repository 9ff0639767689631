"""The whole FlashSloth recipe on a CPU in a few minutes, on tiny models and synthetic data.

    python -m recipes.flashsloth.demo                 # about 4 minutes on 2 cores
    python -m recipes.flashsloth.demo --quick         # a smoke run of a few seconds

1. writes the synthetic "detail" data set (`recipes.flashsloth.synthetic_detail`: one
   coloured shape carrying a small dot, among loose dots; three question types);
2. trains tiny stage 1 (SAP + projector, the rest frozen) with the ``tiny_stage1`` config;
3. trains tiny stage 2 (everything but the vision encoder, from stage 1's SAP and
   projector) with the ``tiny_stage2`` config;
4. answers a few held-out questions with the saved model (`FlashSlothChat`) and prints
   the held-out accuracy next to uniform chance and the answer prior (each question
   type's most frequent answer: what a model that ignores the picture reaches).

The same training script and configs as the paper-size runs: only the data paths and
output folders are overridden here (and, with ``--quick``, the sizes of the run).
Everything goes under ``--out`` (default ``outputs/demo``); ``summary.json`` there holds
the figures printed at the end.

Why the detail task and not the grid task (`recipes.flashsloth.synthetic`'s default):
the grid's questions name one of nine cells, and the tiny LLM, trained from scratch,
does not learn to bind a cell's name to its image token within minutes; it learns the
answer prior instead. The detail questions need the picture without a lookup by name,
and the tiny model learns them (docs/flashsloth.md has both runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from tokencompress.environment import describe_environment

from .config import load_config
from .metric_log import read_metric_log
from .synthetic import generate_dataset
from .train import EVAL_FILE, FlashSlothRecipe

__all__ = ["FULL", "QUICK", "DemoSizes", "main", "run_demo"]


@dataclass(frozen=True)
class DemoSizes:
    """How big a demo run is: pictures, and overrides of the tiny configs per stage."""

    num_train: int
    num_test: int
    stage1: tuple[str, ...] = ()  # `key=value` overrides of tiny_stage1
    stage2: tuple[str, ...] = ()  # and of tiny_stage2


# The data set of the ablation (`benchmarks.ablation`, seed 0); the configs' epochs make
# 125 stage-1 and 1500 stage-2 steps of 16 samples: about 4 minutes on 2 cores.
FULL = DemoSizes(num_train=2000, num_test=240)
# Smoke run (the test suite runs it): a few steps of each stage.
QUICK = DemoSizes(num_train=48, num_test=16, stage1=("training.max_steps=3",), stage2=("training.max_steps=4",))


def _train(config_name: str, overrides: list[str]) -> FlashSlothRecipe:
    recipe = FlashSlothRecipe(load_config(config_name, overrides))
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def _loss_curve(output_dir: Path) -> dict[str, Any]:
    records = read_metric_log(output_dir / "log.jsonl")
    head, tail = records[: max(1, len(records) // 10)], records[-max(1, len(records) // 10):]
    return {
        "steps": records[-1]["step"],
        "first_loss": sum(r["loss"] for r in head) / len(head),  # mean of the first 10% of logged steps
        "last_loss": sum(r["loss"] for r in tail) / len(tail),  # and of the last 10%
        "seconds": records[-1]["elapsed"],
    }


def run_demo(
    out: str | Path, *, quick: bool = False, seed: int = 0, sizes: DemoSizes | None = None
) -> dict[str, Any]:
    """Run the four steps under ``out``; returns the summary (also in ``out/summary.json``).

    ``sizes`` (default: `QUICK` with ``quick``, else `FULL`) sets the run's size.
    """
    if sizes is None:
        sizes = QUICK if quick else FULL
    out = Path(out)
    data, stage1_dir, stage2_dir = out / "data", out / "stage1", out / "stage2"
    for stage_dir in (stage1_dir, stage2_dir):  # the demo starts afresh every time
        shutil.rmtree(stage_dir, ignore_errors=True)
    started = time.perf_counter()

    print(f"[1/4] synthetic detail data set: {sizes.num_train} train and {sizes.num_test} test pictures "
          f"-> {data}")
    generate_dataset(data, task="detail", num_train=sizes.num_train, num_test=sizes.num_test, seed=seed,
                     progress=False)
    paths = [f"data.image_folder={data / 'images'}"]

    print("[2/4] stage 1: SAP + projector learn, the LLM and vision encoder are frozen")
    _train("tiny_stage1", [*paths, f"data.train_json={data / 'pretrain.json'}",
                           f"checkpoint.output_dir={stage1_dir}", *sizes.stage1])

    print("[3/4] stage 2: everything but the vision encoder, from stage 1's SAP and projector")
    stage2 = _train("tiny_stage2", [*paths, f"data.train_json={data / 'instruct.json'}",
                                    f"data.eval_json={data / 'test.json'}", f"model.init_from={stage1_dir}",
                                    f"checkpoint.output_dir={stage2_dir}", *sizes.stage2])

    print("[4/4] held-out questions, answered by the saved model")
    result = stage2.evaluate()
    for example in result.examples:
        print(f"  Q: {example['question']}\n     model: {example['answer']!r}   reference: {example['reference']!r}")

    summary = {
        "machine": describe_environment("cpu"),  # the figures depend on the torch version
        "quick": quick,
        "sizes": asdict(sizes),
        "seconds": round(time.perf_counter() - started, 1),
        "stage1": _loss_curve(stage1_dir),
        "stage2": _loss_curve(stage2_dir),
        "eval": asdict(result),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for stage in ("stage1", "stage2"):
        curve = summary[stage]
        print(f"{stage}: {curve['steps']} steps, loss {curve['first_loss']:.3f} -> {curve['last_loss']:.3f} "
              f"({curve['seconds']:.0f} s)")
    print(result.summary())
    margin = result.accuracy - result.prior
    verdict = "the answers use the picture" if margin > 0 else "no better than answering without the picture"
    print(f"held-out accuracy minus the answer prior: {100 * margin:+.1f} points ({verdict})")
    print(f"total {summary['seconds']:.0f} s; model in {stage2_dir / 'model'}, results in {out / 'summary.json'} "
          f"and {stage2_dir / EVAL_FILE}")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipes.flashsloth.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="folder for data, checkpoints and models")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_demo(args.out, quick=args.quick, seed=args.seed)


if __name__ == "__main__":
    main()
