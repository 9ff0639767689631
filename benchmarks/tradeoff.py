"""Accuracy against first-token time on the tiny FlashSloth, scored by lmms-eval.

    python -m benchmarks.tradeoff --seeds 0 1 2 --jobs 2   # the full run
    python -m benchmarks.tradeoff --quick                   # seconds: a smoke run (the test runs it)

Each variant is a model folder plus the `tokencompress` lmms-eval model's ``model_args``
(`tokencompress.evaluation`), so every figure comes from the same grafted model a user
gets with ``lmms-eval --model tokencompress --model_args ...``:

- the recipe's tiny FlashSloth trained uncompressed (81 tokens per picture; the ablation's
  ``none`` variant, trained or reused by `benchmarks.training_free`);
- the same model reduced at inference, without retraining: ``compressor=tome``, ``dart``
  and ``visionzip`` at 36, 18 and 9 tokens (VisionZip split as in
  `benchmarks.training_free.visionzip_split`), ``compressor=avgpool,compressor.window=3``
  (9 tokens), and FastV (``fastv_layer=1``, ``fastv_keep=0.5`` / ``0.25``: the 4-layer LLM
  sees all 81 image tokens in layer 1, the kept ones after it);
- the ablation's models trained with SAP (9 tokens) and with SAP + EmbQ (9 tokens and
  9 queries: FlashSloth), trained here with the same settings, data and seeds, or reused.

Per variant:

- accuracy: lmms-eval's own `evaluator.simple_evaluate` on a local task written from the
  seed's held-out synthetic questions (`local_task.write_local_task`; exact match after
  the recipe's normalisation), mean over seeds. The model instance is made the way
  lmms-eval makes it from ``--model_args`` (its registry's `create_from_arg_string`) and
  handed to the evaluator, so that hooks can count the tokens the LLM really gets
  during the scored run (placeholders, projector outputs, and the image tokens each
  decoder layer runs on);
- time to first token: `generate` from pixel values and prompt ids to the first answer
  token, batch 1, on the first seed's grafted models (the ones lmms-eval just scored),
  round-robin over the variants after warm-up rounds, median over rounds
  (`benchmarks.end_to_end`'s clock and statistics). Round r asks every variant the same
  question r, so a question that is slower for all is slower for all alike.

Checkpoints and data live under ``--work`` (shared with `benchmarks.training_free` and
laid out as the ablation lays them out), so a rerun only evaluates and times. Results:
``tradeoff.json``, ``.md`` and ``.png`` under ``--out`` (`benchmarks.tradeoff_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from benchmarks import ablation
from benchmarks.ablation import Settings, data_dir, run_dir
from benchmarks.end_to_end import TokenClock, generate_greedy, synchronize, timing_stats
from benchmarks.training_free import (
    ALL_TOKENS,
    BUDGETS,
    FULL,
    QUICK,
    TokenCounter,
    reusable_record,
    train_uncompressed,
    visionzip_split,
)
from recipes.flashsloth.chat import FlashSlothChat
from recipes.flashsloth.data import load_llava_json
from recipes.flashsloth.evaluate import _question, evaluate
from recipes.flashsloth.model import FlashSloth
from recipes.flashsloth.train import MODEL_DIR
from tokencompress.environment import describe_environment

__all__ = [
    "FASTV_KEEPS",
    "FASTV_LAYER",
    "QUICK_SETTINGS",
    "TRAINED",
    "LayerImageTokens",
    "Variant",
    "build_variants",
    "evaluate_variant",
    "fastv_kept",
    "first_token_seconds",
    "main",
    "model_folder",
    "run_tradeoff",
    "time_first_tokens",
    "train_models",
]

#: FastV's K on the tiny LLM (4 decoder layers): layer 1 sees every image token and ranks
#: them; layers 2-4 run on the kept ones. K = 2, the paper's LLaVA setting, would leave
#: half of this LLM unpruned.
FASTV_LAYER = 1
FASTV_KEEPS = (0.5, 0.25)
#: Ablation variants trained with their compressor (beside the uncompressed ``none``).
TRAINED = ("sap", "sap_embq9")
#: SAP's 3x3 windows on the 9x9 grid: the trained models' image tokens per picture.
SAP_TOKENS = 9
TASK_PREFIX = "tokencompress_tradeoff"
#: The smoke run's training: the ablation's quick settings give a model that answers only
#: the end-of-sequence token, and every accuracy check would then compare zeros; 150
#: stage-2 steps on 48 pictures (seconds) give words, about a quarter of them right.
QUICK_SETTINGS = dataclasses.replace(QUICK, num_train=48, num_test=24, stage2_steps=150)
_MARKER = "tradeoff.json"  # beside a trained variant's checkpoints: what trained them


def fastv_kept(tokens: int, keep: float) -> int:
    """Image tokens FastV keeps of `tokens` for a ratio `keep`: rounded half up, at least 1
    (as `graft_fastv` documents): 81 x 0.5 -> 41, 81 x 0.25 -> 20."""
    return max(1, math.floor(tokens * keep + 0.5))


@dataclass(frozen=True)
class Variant:
    """One point of the trade-off: which trained model, and the ``model_args`` on top.

    `image_tokens` is what the LLM is fed per picture (its placeholders); `kept_tokens`
    what the decoder layers after FastV's layer run on (None: no FastV, all layers see
    `image_tokens`); `query_tokens` the EmbQ queries in each prompt.
    """

    name: str
    method: str  # one marker and colour per method in the plot
    model: str  # the ablation variant whose checkpoint is used
    args: tuple[tuple[str, Any], ...] = ()
    image_tokens: int = ALL_TOKENS
    kept_tokens: int | None = None
    query_tokens: int = 0

    @property
    def tokens_label(self) -> str:
        """The point's label: tokens per picture, FastV's before -> after, + queries."""
        label = str(self.image_tokens) if self.kept_tokens is None else f"{self.image_tokens}→{self.kept_tokens}"
        return label + (f" + {self.query_tokens}q" if self.query_tokens else "")

    def model_args(self, folder: str | Path) -> str:
        """The lmms-eval ``--model_args`` string of this variant for a model `folder`
        (without ``batch_size``: the lmms-eval command line always passes its own
        ``--batch_size``, and the model then refuses a second one in ``model_args``)."""
        return ",".join(f"{key}={value}" for key, value in [("pretrained", str(folder)), *self.args])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "model": self.model,
                "args": ",".join(f"{k}={v}" for k, v in self.args), "image_tokens": self.image_tokens,
                "kept_tokens": self.kept_tokens, "query_tokens": self.query_tokens,
                "tokens_label": self.tokens_label}


def build_variants(trained: Sequence[str] = TRAINED) -> list[Variant]:
    """Every variant, in report order: uncompressed, the training-free ones, then `trained`."""
    variants = [Variant("none", "none", "none")]
    for budget in BUDGETS:
        variants.append(Variant(f"tome-{budget}", "tome", "none",
                                (("compressor", "tome"), ("compressor.num_tokens", budget)), budget))
    for budget in BUDGETS:
        variants.append(Variant(f"dart-{budget}", "dart", "none",
                                (("compressor", "dart"), ("compressor.num_tokens", budget)), budget))
    for budget in BUDGETS:
        dominant, contextual = visionzip_split(budget)
        variants.append(Variant(f"visionzip-{budget}", "visionzip", "none",
                                (("compressor", "visionzip"), ("compressor.dominant", dominant),
                                 ("compressor.contextual", contextual)), budget))
    variants.append(Variant("avgpool-9", "avgpool", "none", (("compressor", "avgpool"), ("compressor.window", 3)), 9))
    for keep in FASTV_KEEPS:
        variants.append(Variant(f"fastv-k{FASTV_LAYER}-{keep:.0%}", "fastv", "none",
                                (("fastv_layer", FASTV_LAYER), ("fastv_keep", keep)),
                                kept_tokens=fastv_kept(ALL_TOKENS, keep)))
    unknown = [name for name in trained if name not in ablation.VARIANTS or name == "none"]
    if unknown:
        raise ValueError(f"unknown trained variants {unknown}; expected ablation variants other than 'none'")
    for name in trained:
        spec = ablation.VARIANTS[name]
        if spec.compressor != "sap":
            raise ValueError(f"trained variant {name!r} uses {spec.compressor!r}; only SAP's token count is known here")
        method = "flashsloth" if spec.num_queries else "sap"
        variants.append(Variant(f"{name} (trained)", method, name, image_tokens=SAP_TOKENS,
                                query_tokens=spec.num_queries))
    return variants


# ----------------------------------------------------------------------------- training


def model_folder(work: Path, model: str, seed: int) -> Path:
    """The saved stage-2 model of ablation variant `model` and `seed` under `work`."""
    return run_dir(work, model, seed) / "stage2" / MODEL_DIR


def _reusable(work: Path, model: str, seed: int, settings: Settings) -> dict[str, Any] | None:
    """The record of an earlier training of (`model`, `seed`) with `settings`, if still usable."""
    marker = run_dir(work, model, seed) / _MARKER
    return reusable_record(marker, model_folder(work, model, seed), data_dir(work, seed), seed, settings)


def train_models(
    models: Sequence[str],
    seeds: Sequence[int],
    settings: Settings,
    work: Path,
    *,
    jobs: int = 1,
    threads: int = 1,
    retrain: bool = False,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Train (or reuse) each ablation variant in `models` for each seed; returns
    {model: {seed: record}}, each record `ablation.run_one`'s plus "reused".

    ``none`` goes through `benchmarks.training_free.train_uncompressed`, so both
    benchmarks share (and reuse) one checkpoint per seed; the others through the
    ablation's driver, with the same settings, marked here for reuse.
    """
    records: dict[str, dict[int, dict[str, Any]]] = {}
    if "none" in models:
        records["none"] = train_uncompressed(seeds, settings, work, jobs=jobs, threads=threads, retrain=retrain)
    others = [name for name in models if name != "none"]
    found = {(name, seed): None if retrain else _reusable(work, name, seed, settings)
             for name in others for seed in seeds}
    missing = [key for key, record in found.items() if record is None]
    trained: dict[tuple[str, int], dict[str, Any]] = {}
    if missing:
        # One call for every missing (variant, seed): `jobs` of them train at once. It
        # trains the product of the lists, so a partly reused set trains a few again.
        names = list(dict.fromkeys(name for name, _ in missing))
        missing_seeds = list(dict.fromkeys(seed for _, seed in missing))
        report = ablation.run_ablation(variants=names, seeds=missing_seeds, settings=settings, work=work,
                                       jobs=jobs, threads=threads)
        for record in report["runs"]:
            marker = run_dir(work, record["variant"], record["seed"]) / _MARKER
            marker.write_text(json.dumps({"seed": record["seed"], "settings": dataclasses.asdict(settings),
                                          "record": record}, indent=2) + "\n", encoding="utf-8")
            trained[(record["variant"], record["seed"])] = {**record, "reused": False}
    for name in others:
        records[name] = {seed: trained.get((name, seed)) or {**found[(name, seed)], "reused": True} for seed in seeds}
    return records


# ----------------------------------------------------------------------------- counting


def _innermost(module: nn.Module) -> nn.Module:
    """The decoder layer under any graft's wrappers (they keep it as `base_layer`)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


class LayerImageTokens:
    """Image tokens each decoder layer runs on in every prefill, while installed.

    The hooks sit on the layers under any wrapper, so they see what a layer itself
    computes on: after FastV's pruning, the kept tokens only. Text tokens (and padding,
    and EmbQ's queries) are never pruned, so a layer's image tokens are its sequence
    length minus the prompt's non-image positions.
    """

    def __init__(self, model: FlashSloth) -> None:
        self.model = model
        self.per_layer: list[set[int]] = []
        self._other: int | None = None  # non-image positions of the prefill running now
        self._seen: set[int] = set()
        self._handles: list[Any] = []

    def _start(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._other, self._seen = None, set()
        if input_ids is None:
            return
        per_row = (input_ids == self.model.image_token_id).sum(dim=1)
        # Decoding steps see one new token and no placeholders: only prefills count.
        if int(per_row.max()) == 0:
            return
        if int(per_row.min()) != int(per_row.max()):
            raise RuntimeError(f"rows of one batch hold different image token counts {per_row.tolist()}")
        self._other = input_ids.shape[1] - int(per_row[0])

    def _note(self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._other is None or index in self._seen:
            return
        self._seen.add(index)
        hidden_states = args[0] if args else kwargs["hidden_states"]
        self.per_layer[index].add(int(hidden_states.shape[1]) - self._other)

    def __enter__(self) -> Self:
        llava = self.model.llava
        layers = llava.model.language_model.layers
        self.per_layer = [set() for _ in layers]
        self._handles = [llava.register_forward_pre_hook(self._start, with_kwargs=True)]
        for index, layer in enumerate(layers):
            hook = functools.partial(self._note, index)
            self._handles.append(_innermost(layer).register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def counts(self) -> list[int]:
        """Image tokens per decoder layer; a RuntimeError unless each layer saw one count."""
        if any(len(seen) != 1 for seen in self.per_layer):
            raise RuntimeError(f"expected one image token count per layer, saw {[sorted(s) for s in self.per_layer]}")
        return [next(iter(seen)) for seen in self.per_layer]


# ----------------------------------------------------------------------------- lmms-eval


def _write_task(records: Sequence[Mapping[str, Any]], images: Path, folder: Path, task_name: str) -> Any:
    """The held-out questions as a local lmms-eval task; its `TaskManager`."""
    from lmms_eval.tasks import TaskManager

    from tokencompress.evaluation.local_task import write_local_task

    write_local_task(records, images, folder, task_name=task_name)
    # Only this folder: the task index is then built in milliseconds, not seconds, and no
    # built-in task can shadow the local one.
    return TaskManager(verbosity="WARNING", include_path=str(folder), include_defaults=False)


def _make_lmm(model_args: str, batch_size: int) -> Any:
    """The lmms-eval model, made as `simple_evaluate` makes it from ``--model_args`` and
    ``--batch_size``."""
    from lmms_eval import models

    from tokencompress.evaluation.plugin import MODEL_ID

    extra = {"batch_size": batch_size, "max_batch_size": None, "device": None}
    return models.get_model(MODEL_ID).create_from_arg_string(model_args, extra)


def evaluate_variant(
    variant: Variant, folder: Path, task_name: str, task_manager: Any, batch_size: int
) -> tuple[dict[str, Any], FlashSlothChat]:
    """Score `variant` with lmms-eval on `task_name`, counting the tokens the LLM gets;
    returns the run's record and the chat (grafted model) that answered, for timing.

    The chat is the lmms-eval backend's own (its recipe modules are the ``recipes.flashsloth``
    ones imported here: `load_recipe_module` uses the copy a caller already imported).
    """
    from lmms_eval import evaluator

    model_args = variant.model_args(folder)
    started = time.perf_counter()
    lmm = _make_lmm(model_args, batch_size)
    chat = lmm.backend.chat
    model = chat.model  # the FlashSloth, with the model_args' grafts on its LLaVA
    with TokenCounter(model) as counter, LayerImageTokens(model) as layers:
        output = evaluator.simple_evaluate(model=lmm, tasks=[task_name], task_manager=task_manager,
                                           log_samples=True, verbosity="WARNING")
    scores, samples = output["results"][task_name], output["samples"][task_name]
    accuracy = float(scores["exact_match,none"])
    # The aggregate is lmms-eval's; the samples give the per-type split and a check of it.
    correct = [float(s["exact_match"]) for s in samples]
    if not math.isclose(accuracy, sum(correct) / len(correct)):
        raise RuntimeError(f"{variant.name}: lmms-eval's exact_match {accuracy} is not the mean of its samples")
    by_type: dict[str, list[float]] = {}
    for sample in samples:
        by_type.setdefault(sample["doc"]["question_type"], []).append(float(sample["exact_match"]))
    placeholders, features = counter.per_picture()
    return {
        "variant": variant.name,
        "model_args": model_args,
        "accuracy": accuracy,
        "stderr": float(scores["exact_match_stderr,none"]),
        "skipped": float(scores["skipped,none"]),
        "by_type": {kind: sum(values) / len(values) for kind, values in sorted(by_type.items())},
        "num_questions": len(samples),
        "placeholders": placeholders,
        "features": features,
        "image_tokens_per_layer": layers.counts(),
        "examples": [{"question": s["doc"]["question"], "answer": s["filtered_resps"][0], "reference": s["target"]}
                     for s in samples[:5]],  # as many as the recipe's evaluate keeps
        "eval_seconds": round(time.perf_counter() - started, 2),
    }, chat


# ----------------------------------------------------------------------------- timing


def first_token_seconds(model: FlashSloth, inputs: Mapping[str, torch.Tensor]) -> float:
    """Seconds from calling `generate` to the first answer token reaching the host."""
    clock = TokenClock()
    synchronize(model.device)
    start = time.perf_counter()
    generate_greedy(model, dict(inputs), 1, streamer=clock, pad_token_id=model.pad_token_id)
    return clock.times[-1] - start  # times: the prompt, then the one new token


def _timing_inputs(
    chat: FlashSlothChat, pictures: Sequence[Image.Image], questions: Sequence[str]
) -> list[dict[str, torch.Tensor]]:
    """One batch-1 input per question, encoded by the grafted model's chat (so with its
    number of placeholders and its query block)."""
    model = chat.model
    inputs = []
    for picture, question in zip(pictures, questions):
        batch = chat.collate([chat.encode(picture, question)])
        inputs.append({key: batch[key].to(model.device) for key in
                       ("input_ids", "attention_mask", "pixel_values", "embq_instruction_map")})
    return inputs


def _timing_questions(records: Sequence[Mapping[str, Any]], images: Path) -> tuple[list[Image.Image], list[str]]:
    """The pictures and questions of `records`, as the local task asks them (the recipe's
    `_question`, which `write_local_task` uses too)."""
    pictures = []
    for record in records:
        with Image.open(images / record["image"]) as picture:
            pictures.append(picture.convert("RGB"))
    return pictures, [_question(record) for record in records]


def time_first_tokens(
    chats: Mapping[str, FlashSlothChat],
    pictures: Sequence[Image.Image],
    questions: Sequence[str],
    *,
    warmup: int,
    rounds: int,
    progress: bool = True,
) -> dict[str, list[float]]:
    """First-token seconds of each chat's model per timed round, round-robin (see the
    module docstring); round r asks question r modulo their number. Warm-up rounds are
    dropped."""
    inputs = {name: _timing_inputs(chat, pictures, questions) for name, chat in chats.items()}
    seconds: dict[str, list[float]] = {name: [] for name in chats}
    total = warmup + rounds
    with torch.inference_mode(), tqdm(total=total * len(chats), desc="first-token rounds", unit="run",
                                      dynamic_ncols=True, disable=not progress) as bar:
        for index in range(total):
            for name, chat in chats.items():
                taken = first_token_seconds(chat.model, inputs[name][index % len(questions)])
                if index >= warmup:
                    seconds[name].append(taken)
                bar.update(1)
    return seconds


# ----------------------------------------------------------------------------- the run


def _task_folder(work: Path, seed: int) -> Path:
    return work / "tradeoff-tasks" / f"seed{seed}"


def _score_seed(
    variants: Sequence[Variant], records: Sequence[Mapping[str, Any]], work: Path, seed: int, batch_size: int
) -> Iterator[tuple[Variant, dict[str, Any], FlashSlothChat]]:
    """Each variant scored by lmms-eval on `records` of `seed`: (variant, record, chat)."""
    images = data_dir(work, seed) / "images"
    task_name = f"{TASK_PREFIX}_seed{seed}"
    task_manager = _write_task(records, images, _task_folder(work, seed), task_name)
    for variant in variants:
        run, chat = evaluate_variant(variant, model_folder(work, variant.model, seed), task_name, task_manager,
                                     batch_size)
        if not variant.args:
            # Nothing grafted at inference: the recipe's own evaluation on the same
            # questions and batches, which the local task promises to equal.
            run["recipe_accuracy"] = evaluate(chat, records, images, batch_size=batch_size).accuracy
        yield variant, run, chat


def run_tradeoff(
    *,
    seeds: Sequence[int] = (0, 1, 2),
    settings: Settings = FULL,
    trained: Sequence[str] = TRAINED,
    work: str | Path = "outputs/training_free",
    questions: int | None = None,
    warmup: int = 5,
    rounds: int = 50,
    jobs: int = 1,
    threads: int = 1,
    retrain: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Train (or reuse) the models, score every variant with lmms-eval on every seed, time
    the first seed's; returns the report (`tradeoff_report.write_report` writes it)."""
    if jobs < 1 or threads < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"need jobs, threads, rounds >= 1 and warmup >= 0; got {jobs}, {threads}, {rounds}, {warmup}")
    if not seeds:
        raise ValueError("need at least one seed")
    if questions is not None and questions < 1:
        raise ValueError(f"questions must be >= 1, got {questions}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local task needs no hub
    work = Path(work)
    started = time.perf_counter()
    machine_before = describe_environment("cpu")
    variants = build_variants(trained)
    models = list(dict.fromkeys(v.model for v in variants))
    training = train_models(models, seeds, settings, work, jobs=jobs, threads=threads, retrain=retrain)
    torch.set_num_threads(threads)

    runs: list[dict[str, Any]] = []
    timed: dict[str, FlashSlothChat] = {}
    with tqdm(total=len(seeds) * len(variants), desc="lmms-eval runs", unit="run", dynamic_ncols=True) as bar:
        for seed in seeds:
            records = load_llava_json(data_dir(work, seed) / "test.json")[:questions]
            for variant, run, chat in _score_seed(variants, records, work, seed, settings.eval_batch_size):
                runs.append({"seed": seed, **run})
                if seed == seeds[0]:
                    timed[variant.name] = chat  # timed below, after every seed is scored
                bar.update(1)
                bar.write(f"seed {seed} {variant.name:>20} ({variant.tokens_label:>8} tokens): "
                          f"accuracy {run['accuracy']:.1%}")
            if seed == seeds[0]:
                timing_questions = _timing_questions(records[: warmup + rounds], data_dir(work, seed) / "images")
    seconds = time_first_tokens(timed, *timing_questions, warmup=warmup, rounds=rounds)
    return {
        "command": command,
        "settings": {
            **dataclasses.asdict(settings),
            "questions": runs[0]["num_questions"],
            "fastv_layer": FASTV_LAYER,
            "fastv_keeps": list(FASTV_KEEPS),
            "lmms_eval_batch_size": settings.eval_batch_size,
            "timing_seed": seeds[0],
            "timing_batch_size": 1,
            "warmup": warmup,
            "rounds": rounds,
            "timing_questions": len(timing_questions[1]),
            "timing_device": "cpu",
            # Each run, on lmms-eval's command line (the task folder is written by this benchmark).
            "lmms_eval_cli": (f"lmms-eval --model tokencompress --model_args {{model_args}} --include_path "
                              f"{_task_folder(work, seeds[0]).parent}/seed{{seed}} --tasks {TASK_PREFIX}_seed{{seed}} "
                              f"--batch_size {settings.eval_batch_size}"),
        },
        "variants": [v.describe() for v in variants],
        "seeds": list(seeds),
        "jobs": jobs,
        "threads": threads,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {**machine_before, "lmms_eval": importlib.metadata.version("lmms_eval"),
                    "load_average_after": describe_environment("cpu")["load_average_1_5_15_min"]},
        "training": [{"model": name, "seed": seed, "accuracy": record["accuracy"],
                      **{key: record[key] for key in ("stage1_seconds", "stage2_seconds", "stage2_loss", "reused")}}
                     for name, per_seed in training.items() for seed, record in per_seed.items()],
        "runs": runs,
        "first_token_s": {name: timing_stats(values) for name, values in seconds.items()},
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tradeoff", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="quick-trained models, 24 questions, 1 timing round (seconds; for tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (0 with --quick)")
    parser.add_argument("--trained", nargs="*", default=list(TRAINED), metavar="NAME",
                        help=f"ablation variants trained with SAP to add (default: {' '.join(TRAINED)}; none: omit)")
    parser.add_argument("--questions", type=int, default=None, help="held-out questions per seed (default: all)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 5; 0 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 50; 1 with --quick)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for tradeoff[_quick].json/.md/.png")
    parser.add_argument("--work", default="outputs/training_free",
                        help="folder for data sets and checkpoints (shared with benchmarks.training_free)")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per training run, for scoring and for timing (default 1)")
    parser.add_argument("--retrain", action="store_true", help="train even where a checkpoint can be reused")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from benchmarks.tradeoff_report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quick = args.quick
    seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    command = "python -m benchmarks.tradeoff " + " ".join(shlex.quote(a) for a in argv)
    report = run_tradeoff(
        seeds=seeds, settings=QUICK_SETTINGS if quick else FULL, trained=args.trained, work=args.work,
        questions=args.questions,
        warmup=args.warmup if args.warmup is not None else (0 if quick else 5),
        rounds=args.rounds if args.rounds is not None else (1 if quick else 50),
        jobs=args.jobs, threads=args.threads, retrain=args.retrain, command=command.strip(),
    )
    for path in write_report(report, Path(args.out), "tradeoff_quick" if quick else "tradeoff"):
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
