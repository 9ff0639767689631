"""FlashSloth's Table 3 ablation on CPU: no compression, AvgPool, SAP, SAP + EmbQ.

    python -m benchmarks.ablation --seeds 0 1 2 --jobs 2 --threads 1   # the full run (10-25 min on 2 cores)
    python -m benchmarks.ablation --quick                    # seconds: a smoke run (the test runs it)
    python -m benchmarks.ablation --variants sap sap_embq9 --seeds 3 4 --stage2-steps 1000

Every run uses the recipe's own code end to end: `synthetic` writes the "detail" task
(one large shape with a small dot, loose distractor dots: `synthetic_detail`), then the
training script (`recipes.flashsloth.train`) runs tiny stage 1 (compressor + projector
learn, on captions) and tiny stage 2 (compressor, projector, EmbQ and LLM learn, on the
questions) from the bundled ``tiny_stage1`` / ``tiny_stage2`` configs, and the saved
model answers the held-out questions (`recipes.flashsloth.evaluate`). The variants
differ only in ``model.compressor`` and ``model.num_queries``; data, sizes, schedule,
steps and seeds are the same for all, and so is the frozen random vision encoder (see
docs/benchmarks.md for why it stays frozen).

One run = one (variant, seed): the seed picks the data set (shared by all variants of
that seed) and the training seed (weights, data order, dropout), so variants of one
seed are paired. A run repeated with the same seed and settings, one thread per run
(the default; use ``--jobs`` for parallelism), gives the same accuracy bit for bit.
Results: ``ablation.json``, ``ablation.md`` and ``ablation.png`` under ``--out``
(`benchmarks.ablation_report`); checkpoints and data under ``--work``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import logging
import multiprocessing
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from recipes.flashsloth.chat import FlashSlothChat
from recipes.flashsloth.config import load_config
from recipes.flashsloth.data import load_llava_json
from recipes.flashsloth.evaluate import EvalResult, evaluate
from recipes.flashsloth.metric_log import read_metric_log
from recipes.flashsloth.model import FlashSloth
from recipes.flashsloth.synthetic import generate_dataset
from recipes.flashsloth.train import LOG_FILE, MODEL_DIR, FlashSlothRecipe
from tokencompress.environment import describe_environment

__all__ = ["FULL", "QUICK", "VARIANTS", "Settings", "Variant", "main", "run_ablation", "run_one"]


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: which compressor, how many EmbQ queries."""

    name: str
    label: str  # as the paper's Table 3 names the row
    compressor: str
    num_queries: int


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("none", "baseline (no compression)", "none", 0),
    Variant("avgpool", "+ Avg.Pool", "avgpool", 0),
    Variant("sap", "+ Att.Pool (SAP)", "sap", 0),
    Variant("sap_embq3", "+ SAP & EmbQ, 3 queries", "sap", 3),
    Variant("sap_embq9", "+ SAP & EmbQ, 9 queries", "sap", 9),
    # Not a Table 3 row: whether EmbQ's gain needs SAP (run it with --variants).
    Variant("avgpool_embq9", "+ Avg.Pool & EmbQ, 9 queries", "avgpool", 9),
)}
DEFAULT_VARIANTS = ("none", "avgpool", "sap", "sap_embq3", "sap_embq9")


@dataclass(frozen=True)
class Settings:
    """What every run shares. Sizes are the recipe's tiny preset (72 px, 9x9 patches)."""

    num_train: int  # training pictures (3 questions each at stage 2, a caption at stage 1)
    num_test: int  # held-out questions, the three types in turn
    stage1_steps: int
    stage2_steps: int
    batch_size: int  # global = micro batch: one forward per step
    num_distractors: int = 3
    image_size: int = 72  # 9x9 patches of 8 px; window 3: 3x3 pooled tokens of 24 px each
    eval_batch_size: int = 64
    # Held-out accuracy also at 1/n, 2/n, ... of stage 2 (a learning curve): is a variant
    # still climbing when the run ends? 1: at the end only.
    curve_points: int = 3
    stage2_lr: float | None = None  # None: the tiny_stage2 config's


# Full run: 15 runs, two at a time on 2 cores: 1-2 min each on an idle machine (the
# uncompressed variant about twice as long), 2-5 min each on a busy one (docs/benchmarks.md).
FULL = Settings(num_train=2000, num_test=240, stage1_steps=40, stage2_steps=500, batch_size=16, curve_points=4)
# Smoke run: a few steps, seconds per run; accuracy is meaningless (the test checks the files
# and that a rerun repeats it).
QUICK = Settings(num_train=16, num_test=12, stage1_steps=2, stage2_steps=10, batch_size=4, curve_points=2)


def data_dir(work: Path, seed: int) -> Path:
    return work / f"data-seed{seed}"


def run_dir(work: Path, variant: str, seed: int) -> Path:
    return work / f"{variant}-seed{seed}"


def _common_overrides(settings: Settings, seed: int, data: Path, output_dir: Path, steps: int) -> list[str]:
    return [
        f"data.image_folder={data / 'images'}",
        f"model.image_size={settings.image_size}",
        f"training.seed={seed}",
        f"training.max_steps={steps}",
        "training.epochs=1000",  # max_steps is what ends a run
        f"training.global_batch_size={settings.batch_size}",
        f"training.micro_batch_size={settings.batch_size}",
        "training.log_every_n_steps=10",
        f"checkpoint.output_dir={output_dir}",
        "checkpoint.resume=false",  # a rerun starts afresh (same seed: same result)
        "checkpoint.save_every_n_steps=1000000",  # the last step is saved anyway
        "checkpoint.keep_last=1",
    ]


def _evaluate(model: FlashSloth, data: Path, settings: Settings) -> EvalResult:
    """Held-out accuracy of `model` (greedy answers), whether it has EmbQ or not."""
    chat = FlashSlothChat(model, allow_no_queries=True)  # the no-EmbQ rows answer too
    return evaluate(chat, load_llava_json(data / "test.json"), data / "images", batch_size=settings.eval_batch_size)


def _curve_steps(settings: Settings) -> set[int]:
    return {settings.stage2_steps * k // settings.curve_points for k in range(1, settings.curve_points)}


def _train_stage(
    config_name: str,
    overrides: list[str],
    curve_at: Collection[int] = (),
    evaluate_model: Callable[[FlashSloth], EvalResult] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Set up and train one stage with the recipe; returns the training seconds (held-out
    evaluations excluded) and `evaluate_model`'s accuracy after the steps of `curve_at`."""
    recipe = FlashSlothRecipe(load_config(config_name, overrides))
    curve: list[dict[str, Any]] = []
    eval_seconds = 0.0

    def on_step_end(step: int) -> None:
        nonlocal eval_seconds
        if step not in curve_at or evaluate_model is None:
            return
        started = time.perf_counter()
        # Greedy decoding in eval mode draws no random numbers, but keep the training
        # stream untouched regardless: a run is the same with or without its curve.
        with torch.random.fork_rng():
            result = evaluate_model(recipe.raw_model)
        recipe.raw_model.train()
        curve.append({"step": step, "accuracy": result.accuracy, "by_type": result.by_type})
        eval_seconds += time.perf_counter() - started

    try:
        recipe.setup()
        started = time.perf_counter()
        recipe.train(on_step_end=on_step_end)
        seconds = time.perf_counter() - started - eval_seconds
    finally:
        recipe.cleanup()
    return seconds, curve


def _last_loss(output_dir: Path) -> float:
    return float(read_metric_log(output_dir / LOG_FILE)[-1]["loss"])


def run_one(variant: Variant, seed: int, settings: Settings, work: Path, threads: int = 1) -> dict[str, Any]:
    """Train stage 1 and stage 2 of one variant with one seed, then evaluate it."""
    torch.set_num_threads(threads)
    data, out = data_dir(work, seed), run_dir(work, variant.name, seed)
    # A rerun starts afresh (the recipe refuses to overwrite an earlier run's checkpoints).
    for stage in ("stage1", "stage2"):
        shutil.rmtree(out / stage, ignore_errors=True)
    stage1_dir, stage2_dir = out / "stage1", out / "stage2"
    model_choice = [f"model.compressor={variant.compressor}"]

    # Stage 1 has no instruction, so no EmbQ: num_queries 0 for every variant (as the recipe).
    stage1_seconds, _ = _train_stage("tiny_stage1", [
        *_common_overrides(settings, seed, data, stage1_dir, settings.stage1_steps), *model_choice,
        f"data.train_json={data / 'pretrain.json'}",
    ])
    stage2_seconds, curve = _train_stage("tiny_stage2", [
        *_common_overrides(settings, seed, data, stage2_dir, settings.stage2_steps), *model_choice,
        f"model.num_queries={variant.num_queries}",
        f"model.init_from={stage1_dir}",
        f"data.train_json={data / 'instruct.json'}",
        "data.eval_json=null",  # evaluated below, for every variant alike
        *([f"optimizer.lr={settings.stage2_lr}"] if settings.stage2_lr is not None else []),
    ], curve_at=_curve_steps(settings), evaluate_model=lambda model: _evaluate(model, data, settings))

    started = time.perf_counter()
    model = FlashSloth.from_pretrained(stage2_dir / MODEL_DIR)  # what the recipe saved
    result = _evaluate(model, data, settings)
    eval_seconds = time.perf_counter() - started
    curve.append({"step": settings.stage2_steps, "accuracy": result.accuracy, "by_type": result.by_type})
    counts = model.parameter_counts()
    return {
        "variant": variant.name,
        "seed": seed,
        "compressor": variant.compressor,
        "num_queries": variant.num_queries,
        "visual_tokens": model.num_image_tokens,
        "token_budget": model.config.token_budget,
        "accuracy": result.accuracy,
        "by_type": result.by_type,
        "chance": result.chance,
        "prior": result.prior,
        "num_test": result.num_samples,
        "examples": result.examples[:3],
        "curve": curve,
        "stage1_loss": _last_loss(stage1_dir),
        "stage2_loss": _last_loss(stage2_dir),
        "stage1_seconds": round(stage1_seconds, 2),
        "stage2_seconds": round(stage2_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "trainable_compressor_params": counts["compressor"],
        "embq_params": counts["embq"],
        "threads": threads,
    }


def _run_in_worker(variant: Variant, seed: int, settings: Settings, work: Path, threads: int) -> dict[str, Any]:
    """`run_one` in a pool process, its training log and bars in the run's own file."""
    log = run_dir(work, variant.name, seed) / "run.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as stream, contextlib.redirect_stderr(stream):
        return run_one(variant, seed, settings, work, threads)


def _write_data(settings: Settings, seeds: Sequence[int], work: Path) -> None:
    for seed in seeds:
        generate_dataset(data_dir(work, seed), task="detail", num_train=settings.num_train,
                         num_test=settings.num_test, seed=seed, image_size=settings.image_size,
                         num_distractors=settings.num_distractors, progress=False)


def _results(
    runs: list[tuple[Variant, int]], settings: Settings, work: Path, jobs: int, threads: int
) -> Iterator[dict[str, Any]]:
    """Each run's record as it finishes: in this process, or `jobs` fresh processes."""
    if jobs == 1:
        for variant, seed in runs:
            yield run_one(variant, seed, settings, work, threads)
        return
    # One fresh process per run, so no state (RNG, caches, thread pools) leaks from one run
    # into the next; spawn, as max_tasks_per_child requires (a few seconds of imports).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = [pool.submit(_run_in_worker, variant, seed, settings, work, threads) for variant, seed in runs]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def _machine() -> dict[str, Any]:
    """Versions, machine and device (the ablation trains on the CPU)."""
    return describe_environment("cpu")


def run_ablation(
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    seeds: Sequence[int] = (0, 1, 2),
    settings: Settings = FULL,
    work: str | Path = "outputs/ablation",
    jobs: int = 1,
    threads: int = 1,
    command: str = "",
) -> dict[str, Any]:
    """Every (variant, seed) run; returns the report (`ablation_report.write_report` writes it)."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got {jobs} and {threads}")
    work = Path(work)
    started = time.perf_counter()
    machine_before = _machine()
    _write_data(settings, seeds, work)
    runs = [(VARIANTS[name], seed) for seed in seeds for name in variants]
    records = []
    with tqdm(total=len(runs), desc="ablation runs", unit="run", dynamic_ncols=True) as progress:
        for record in _results(runs, settings, work, jobs, threads):
            records.append(record)
            progress.update(1)
            progress.write(f"{record['variant']:>14} seed {record['seed']}: accuracy {record['accuracy']:.1%} "
                           f"({', '.join(f'{k} {v:.0%}' for k, v in sorted(record['by_type'].items()))}), "
                           f"train {record['stage1_seconds'] + record['stage2_seconds']:.0f} s")
    order = {(name, seed): i for i, (name, seed) in enumerate((v.name, s) for v, s in runs)}
    records.sort(key=lambda r: order[(r["variant"], r["seed"])])
    return {
        "command": command,
        "settings": dataclasses.asdict(settings),
        "variants": [dataclasses.asdict(VARIANTS[name]) for name in variants],
        "seeds": list(seeds),
        "jobs": jobs,
        "threads": threads,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {**machine_before, "load_average_after": _machine()["load_average_1_5_15_min"]},
        "runs": records,
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per run (seconds; for tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (0 with --quick)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS),
                        metavar="NAME", help=f"some of {', '.join(VARIANTS)} (default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--stage2-steps", type=int, default=None, help="override the stage-2 steps of the mode")
    parser.add_argument("--stage2-lr", type=float, default=None, help="override the stage-2 learning rate")
    parser.add_argument("--out", default="benchmarks/results", help="folder for ablation.json/.md/.png")
    parser.add_argument("--work", default="outputs/ablation", help="folder for data sets and checkpoints")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: bit-for-bit reruns; with more, the CPU "
                             "backward may differ in the last bits)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from benchmarks.ablation_report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = QUICK if args.quick else FULL
    if args.stage2_steps is not None:
        settings = dataclasses.replace(settings, stage2_steps=args.stage2_steps)
    if args.stage2_lr is not None:
        settings = dataclasses.replace(settings, stage2_lr=args.stage2_lr)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    command = "python -m benchmarks.ablation " + " ".join(shlex.quote(a) for a in argv)
    report = run_ablation(variants=args.variants, seeds=seeds, settings=settings, work=args.work,
                          jobs=args.jobs, threads=args.threads, command=command.strip())
    for path in write_report(report, Path(args.out)):
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
