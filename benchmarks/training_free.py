"""Training-free token reduction on the tiny FlashSloth: accuracy against tokens kept.

    python -m benchmarks.training_free --seeds 0 1 2 --jobs 2 --threads 1   # the full run
    python -m benchmarks.training_free --quick                               # seconds: a smoke run (the test runs it)

Per seed the recipe's tiny model is trained once, uncompressed: the ablation's ``none``
variant (`benchmarks.ablation.run_ablation`, its settings, seeds and data), so all 81
vision tokens of the 9x9 grid reach the LLM. Then, without any further training, each
training-free method is grafted onto its LLaVA at inference (`graft_compressor`) and the
model answers the held-out questions of the synthetic "detail" set:

- ToMe (`ToMe(n)`), DART (`DART(n)`, default pivots) and VisionZip
  (`VisionZip(dominant, contextual)`) at 36, 18 and 9 tokens; VisionZip's budget is split
  in its default ratio of 54 dominant to 10 contextual tokens (`visionzip_split`:
  36 = 30 + 6, 18 = 15 + 3, 9 = 8 + 1), its scores the attention each token receives in the
  vision layer the features come from (computed by the graft);
- AvgPool(3) at 9 tokens (the 3x3 means of the 9x9 grid), which the model was not trained
  with either: the training-free baseline the selection methods have to beat;
- nothing (81 tokens): the reference.

One trained model per seed serves every (method, budget), so the comparisons are paired
by seed. Checkpoints and data stay under ``--work`` (one folder per seed, as the ablation
lays them out); a rerun with the same settings reuses them and only evaluates again
(``--retrain`` trains anew). Results: ``training_free.json``, ``.md`` and ``.png`` under
``--out`` (`benchmarks.training_free_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks import ablation
from benchmarks.ablation import Settings, data_dir, run_dir
from recipes.flashsloth.chat import FlashSlothChat
from recipes.flashsloth.data import load_llava_json
from recipes.flashsloth.evaluate import evaluate
from recipes.flashsloth.model import CONFIG_NAME, FlashSloth
from recipes.flashsloth.train import MODEL_DIR
from tokencompress import DART, AvgPool, ToMe, TokenCompressor, VisionZip
from tokencompress.adapters import graft_compressor
from tokencompress.environment import describe_environment

__all__ = [
    "ALL_TOKENS",
    "BUDGETS",
    "FULL",
    "METHODS",
    "QUICK",
    "Method",
    "TokenCounter",
    "checkpoint_dir",
    "evaluate_compressed",
    "grafted",
    "main",
    "run_training_free",
    "train_uncompressed",
    "visionzip_split",
]

#: The trained variant every method is applied to (the ablation's, uncompressed).
VARIANT = ablation.VARIANTS["none"]
#: Tokens kept per picture by the selection methods (of 81): 4/9, 2/9 and 1/9.
BUDGETS = (36, 18, 9)
#: The uncompressed model's token count, the reference every budget is compared with.
ALL_TOKENS = 81

# The ablation's settings without its learning curve: nothing here reads the curve, and
# each curve point would evaluate the 81-token model again during training. Training is
# otherwise the ablation's, bit for bit (same seed, same settings, one thread per run).
FULL = dataclasses.replace(ablation.FULL, curve_points=1)
QUICK = dataclasses.replace(ablation.QUICK, curve_points=1)
_MARKER = "training_free.json"  # beside a seed's checkpoints: what trained them


def visionzip_split(budget: int) -> tuple[int, int]:
    """(dominant, contextual) tokens for a `budget`, in VisionZip's default ratio 54:10
    (its LLaVA-1.5 setting at 64 tokens), at least one contextual: 36 -> (30, 6),
    18 -> (15, 3), 9 -> (8, 1)."""
    if budget < 2:
        raise ValueError(f"VisionZip needs a budget of at least 2 (1 dominant + 1 contextual), got {budget}")
    contextual = max(1, round(budget * 10 / 64))
    return budget - contextual, contextual


def _visionzip(budget: int) -> TokenCompressor:
    return VisionZip(*visionzip_split(budget))


def _avgpool(budget: int) -> TokenCompressor:
    window = {9: 3}.get(budget)  # ceil(9 / w)^2 tokens: only w = 3 lands on a budget
    if window is None:
        raise ValueError(f"AvgPool on the 9x9 grid gives no {budget} tokens; it runs at 9 only (window 3)")
    return AvgPool(window)


@dataclass(frozen=True)
class Method:
    """A training-free method: how to build it for a budget, and the budgets it runs at."""

    name: str
    label: str
    budgets: tuple[int, ...]
    make: Callable[[int], TokenCompressor]

    def describe(self) -> dict[str, Any]:
        """The JSON-able part (the factory is code)."""
        return {"name": self.name, "label": self.label, "budgets": list(self.budgets)}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("tome", "ToMe (merge similar tokens)", BUDGETS, ToMe),
    Method("dart", "DART (drop duplicates of pivots)", BUDGETS, DART),  # its default pivots
    Method("visionzip", "VisionZip (attention + merged context)", BUDGETS, _visionzip),
    Method("avgpool", "AvgPool(3) (3x3 means)", (9,), _avgpool),
)}


# ----------------------------------------------------------------------------- training


def checkpoint_dir(work: Path, seed: int) -> Path:
    """The saved uncompressed model of one seed (stage 2's output, as the recipe writes it)."""
    return run_dir(work, VARIANT.name, seed) / "stage2" / MODEL_DIR


def reusable_record(marker: Path, checkpoint: Path, data: Path, seed: int, settings: Settings) -> dict[str, Any] | None:
    """The training record that `marker` keeps of an earlier run of `seed` with `settings`,
    if its `checkpoint` and `data` are still there; None when it has to be trained."""
    if not marker.is_file() or not (checkpoint / CONFIG_NAME).is_file():
        return None
    if not (data / "test.json").is_file():
        return None
    saved = json.loads(marker.read_text(encoding="utf-8"))
    if saved.get("settings") != dataclasses.asdict(settings) or saved.get("seed") != seed:
        return None
    return saved["record"]


def _reusable(work: Path, seed: int, settings: Settings) -> dict[str, Any] | None:
    marker = run_dir(work, VARIANT.name, seed) / _MARKER
    return reusable_record(marker, checkpoint_dir(work, seed), data_dir(work, seed), seed, settings)


def train_uncompressed(
    seeds: Sequence[int],
    settings: Settings,
    work: Path,
    *,
    jobs: int = 1,
    threads: int = 1,
    retrain: bool = False,
) -> dict[int, dict[str, Any]]:
    """Train (or reuse) the uncompressed model of each seed; returns each seed's training
    record (`ablation.run_one`'s, with "reused" saying whether it was trained now)."""
    records: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        saved = None if retrain else _reusable(work, seed, settings)
        if saved is not None:
            records[seed] = {**saved, "reused": True}
    missing = [seed for seed in seeds if seed not in records]
    if missing:
        # The ablation's own driver: its data, its training, and `jobs` seeds at a time.
        report = ablation.run_ablation(variants=[VARIANT.name], seeds=missing, settings=settings,
                                       work=work, jobs=jobs, threads=threads)
        for record in report["runs"]:
            marker = run_dir(work, VARIANT.name, record["seed"]) / _MARKER
            marker.write_text(json.dumps({"seed": record["seed"], "settings": dataclasses.asdict(settings),
                                          "record": record}, indent=2) + "\n", encoding="utf-8")
            records[record["seed"]] = {**record, "reused": False}
    return {seed: records[seed] for seed in seeds}


# ----------------------------------------------------------------------------- evaluation


@contextmanager
def grafted(model: FlashSloth, compressor: TokenCompressor | None) -> Iterator[FlashSloth]:
    """`model` with `compressor` grafted onto its LLaVA for the block (None: as it is).

    The graft sets the LLaVA's image token count, which `FlashSloth.num_image_tokens`
    reads, so a template or `FlashSlothChat` made inside the block writes the compressed
    number of placeholders per picture. The graft is removed on exit, also on an error.
    """
    if compressor is None:
        yield model
        return
    graft = graft_compressor(model.llava, compressor)
    try:
        yield model
    finally:
        graft.remove()


class TokenCounter:
    """Counts what a LLaVA really takes per picture, while installed (a context manager):
    the image placeholders of each prefill prompt and the image features the (grafted)
    projector gives. transformers checks that the two agree; both are recorded."""

    def __init__(self, model: FlashSloth) -> None:
        self.model = model
        self.placeholders: set[int] = set()
        self.features: set[int] = set()
        self._handles: list[Any] = []

    def _count_placeholders(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return
        per_row = (input_ids == self.model.image_token_id).sum(dim=1)
        # Decoding steps see one new token and no placeholders: only prefills count.
        self.placeholders.update(int(n) for n in per_row.tolist() if n > 0)

    def _count_features(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        tokens = output[0] if isinstance(output, tuple) else output
        self.features.add(int(tokens.shape[1]))  # (images, tokens per image, width)

    def __enter__(self) -> TokenCounter:
        llava = self.model.llava
        # Looked up now, inside any graft: the module LLaVA calls is then the graft's.
        projector = llava.model.multi_modal_projector
        self._handles = [
            llava.register_forward_pre_hook(self._count_placeholders, with_kwargs=True),
            projector.register_forward_hook(self._count_features),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def per_picture(self) -> tuple[int, int]:
        """(placeholders, features) per picture; a RuntimeError unless each was one number."""
        if len(self.placeholders) != 1 or len(self.features) != 1:
            raise RuntimeError(f"expected one token count per picture, saw placeholders {sorted(self.placeholders)} "
                               f"and features {sorted(self.features)}")
        return next(iter(self.placeholders)), next(iter(self.features))


def evaluate_compressed(
    model: FlashSloth,
    compressor: TokenCompressor | None,
    records: Sequence[Mapping[str, Any]],
    image_folder: Path,
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Held-out accuracy of `model` with `compressor` grafted (None: uncompressed), and the
    image tokens it really took per picture."""
    started = time.perf_counter()
    with grafted(model, compressor), TokenCounter(model) as counter:
        chat = FlashSlothChat(model, allow_no_queries=True)  # made inside: the grafted count
        result = evaluate(chat, records, image_folder, batch_size=batch_size)
    placeholders, features = counter.per_picture()
    return {
        "compressor": repr(compressor) if compressor is not None else None,
        "visual_tokens": features,
        "placeholders": placeholders,
        "accuracy": result.accuracy,
        "by_type": result.by_type,
        "num_test": result.num_samples,
        "prior": result.prior,
        "chance": result.chance,
        "examples": result.examples[:3],
        "eval_seconds": round(time.perf_counter() - started, 2),
    }


def _evaluations(methods: Sequence[Method]) -> list[tuple[Method | None, int]]:
    """(method, budget) in report order; None is the uncompressed reference."""
    return [(None, ALL_TOKENS)] + [(method, budget) for method in methods for budget in method.budgets]


def run_training_free(
    *,
    methods: Sequence[str] = tuple(METHODS),
    seeds: Sequence[int] = (0, 1, 2),
    settings: Settings = FULL,
    work: str | Path = "outputs/training_free",
    jobs: int = 1,
    threads: int = 1,
    retrain: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Train (or reuse) each seed's uncompressed model and evaluate every (method, budget)
    on it; returns the report (`training_free_report.write_report` writes it)."""
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got {jobs} and {threads}")
    work = Path(work)
    started = time.perf_counter()
    machine_before = describe_environment("cpu")
    training = train_uncompressed(seeds, settings, work, jobs=jobs, threads=threads, retrain=retrain)
    torch.set_num_threads(threads)
    chosen = [METHODS[name] for name in methods]
    plan = _evaluations(chosen)
    runs = []
    with tqdm(total=len(seeds) * len(plan), desc="evaluations", unit="eval", dynamic_ncols=True) as progress:
        for seed in seeds:
            model = FlashSloth.from_pretrained(checkpoint_dir(work, seed))
            records = load_llava_json(data_dir(work, seed) / "test.json")
            for method, budget in plan:
                compressor = method.make(budget) if method is not None else None
                run = evaluate_compressed(model, compressor, records, data_dir(work, seed) / "images",
                                          batch_size=settings.eval_batch_size)
                name = method.name if method is not None else "none"
                runs.append({"seed": seed, "method": name, "budget": budget, **run})
                progress.update(1)
                types = ", ".join(f"{k} {v:.0%}" for k, v in sorted(run["by_type"].items()))
                progress.write(f"seed {seed} {name:>9} @ {budget:>2} tokens: accuracy {run['accuracy']:.1%} ({types})")
    train_keys = ("stage1_seconds", "stage2_seconds", "stage1_loss", "stage2_loss", "threads", "reused")
    return {
        "command": command,
        "settings": {**dataclasses.asdict(settings), "budgets": list(BUDGETS), "all_tokens": ALL_TOKENS,
                     "visionzip_splits": {str(b): list(visionzip_split(b)) for b in BUDGETS}},
        "methods": [method.describe() for method in chosen],
        "seeds": list(seeds),
        "jobs": jobs,
        "threads": threads,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {**machine_before, "load_average_after": describe_environment("cpu")["load_average_1_5_15_min"]},
        "training": [{"seed": seed, "accuracy": record["accuracy"], **{k: record[k] for k in train_keys}}
                     for seed, record in training.items()],
        "runs": runs,
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training_free", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the ablation's smoke settings (seconds; for tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (0 with --quick)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="NAME",
                        help=f"some of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for training_free.json/.md/.png")
    parser.add_argument("--work", default="outputs/training_free", help="folder for data sets and checkpoints")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per training run and for evaluation (default 1: bit-for-bit reruns)")
    parser.add_argument("--retrain", action="store_true", help="train even where a checkpoint can be reused")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from benchmarks.training_free_report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    command = "python -m benchmarks.training_free " + " ".join(shlex.quote(a) for a in argv)
    report = run_training_free(methods=args.methods, seeds=seeds, settings=QUICK if args.quick else FULL,
                               work=args.work, jobs=args.jobs, threads=args.threads, retrain=args.retrain,
                               command=command.strip())
    for path in write_report(report, Path(args.out)):
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
