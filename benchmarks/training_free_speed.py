"""Training-free reduction, timed: first-token time against multiply-adds, on the end-to-end model.

    python -m benchmarks.training_free_speed --scale 0.5 --repeats 7   # half size: about 8 minutes on 2 CPU cores
    python -m benchmarks.training_free_speed --quick                   # tiny: seconds (the test runs this)

The end-to-end benchmark's random-weight LLaVA (SigLIP so400m + phi-2, `--scale` as
there) is built once, and four variants are grafted onto it in turn, removed again and
measured round-robin:

- baseline: no reduction, 729 image tokens;
- VisionZip 64 (`graft_compressor`): 54 dominant + 10 contextual tokens, chosen before
  the projector by the attention each vision token receives in the feature layer;
- FastV K=2, keep 50% and 25% (`graft_fastv`): decoder layers 1-2 see all 729 image
  tokens; the attention of the prompt's last token in layer 2 ranks them, and the later
  layers see only the kept ones.

Per variant, batch 1:
- time to first token (`generate` from pixel values to the first answer token; median
  over rounds after warm-up), in wall time and in the process's CPU time (which leaves
  out waiting for a core on a shared machine), and the speed-ups over the baseline;
- the multiply-adds of that first round, counted by `tokencompress.mac_count` on a real
  run (FastV's pruning depends on the data, so it is counted as it ran), and their ratio
  to the baseline's;
- the image tokens each decoder layer gets, counted with hooks, not assumed;
- the share of the first-token time spent computing the scores the tokens are ranked
  by, timed by wrapping the scoring function in runs of their own.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from benchmarks.end_to_end import (
    GRID_SIDE,
    TEXT_TOKENS,
    Grafted,
    Sizes,
    TokenClock,
    Variant,
    attention_implementation,
    build_base_model,
    config_summary,
    generate_greedy,
    machine_and_versions,
    make_inputs,
    model_sizes,
    pick_dtype,
    synchronize,
    timing_stats,
)
from tokencompress import VisionZip
from tokencompress.environment import load_average
from tokencompress.mac_count import count_macs

__all__ = [
    "FASTV_LAYER",
    "Method",
    "METHODS",
    "Settings",
    "quick_sizes",
    "grafted",
    "timed_calls",
    "prefill_lengths",
    "first_token_seconds",
    "run",
    "main",
]

FASTV_LAYER = 2  # FastV's K: the paper's default for LLaVA ("1/2 tokens after layer 2")
IMAGE_TOKENS = GRID_SIDE * GRID_SIDE  # 729: SigLIP so400m/14 at 384 px, at every scale


# -- the variants ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One variant: how to graft it, and the function that computes its ranking scores.

    `graft` returns a handle with `remove()`; `scorer` is (module, function name) of the
    scoring function as its caller looks it up, so that wrapping that attribute times
    every call of it (see `timed_calls`).
    """

    name: str
    description: str
    graft: Callable[[LlavaForConditionalGeneration], Any] | None = None
    scorer: tuple[str, str] | None = None

    @property
    def scoring_function(self) -> str | None:
        """The scoring function's dotted name, or None for a method that ranks nothing."""
        return None if self.scorer is None else ".".join(self.scorer)


def _graft_visionzip(model: LlavaForConditionalGeneration) -> Any:
    from tokencompress.adapters import graft_compressor

    # VisionZip keeps the vision width, so it goes before the model's own projector.
    return graft_compressor(model, VisionZip(dominant=54, contextual=10))


def _graft_fastv(model: LlavaForConditionalGeneration, keep: float) -> Any:
    from tokencompress.adapters import graft_fastv

    return graft_fastv(model, layer=FASTV_LAYER, keep=keep)


# The scoring functions, named where they are called from: the graft's vision-layer hook
# calls `received_attention` from its own module; FastV's scoring layer calls
# `image_token_scores` (defined in `_fastv_scores`) through the name it imported.
_VISIONZIP_SCORER = ("tokencompress.adapters._vision_attention", "received_attention")
_FASTV_SCORER = ("tokencompress.adapters._fastv_layers", "image_token_scores")

METHODS: tuple[Method, ...] = (
    Method("baseline", f"no reduction ({IMAGE_TOKENS} image tokens)"),
    Method("visionzip-64", "VisionZip, 54 dominant + 10 contextual tokens before the projector",
           _graft_visionzip, _VISIONZIP_SCORER),
    Method(f"fastv-k{FASTV_LAYER}-50%", f"FastV, K={FASTV_LAYER}, keeps 50% of the image tokens",
           functools.partial(_graft_fastv, keep=0.5), _FASTV_SCORER),
    Method(f"fastv-k{FASTV_LAYER}-25%", f"FastV, K={FASTV_LAYER}, keeps 25% of the image tokens",
           functools.partial(_graft_fastv, keep=0.25), _FASTV_SCORER),
)


@contextmanager
def grafted(model: LlavaForConditionalGeneration, method: Method) -> Iterator[int]:
    """Graft `method` onto `model`; yield the image placeholders a prompt needs; remove on exit."""
    handle = None if method.graft is None else method.graft(model)
    try:
        # A compressor graft shortens the placeholder run; FastV prunes inside the LLM, so
        # its prompts (and the baseline's) hold every image token.
        yield getattr(handle, "num_image_tokens", IMAGE_TOKENS)
    finally:
        if handle is not None:
            handle.remove()


# -- clocks and counters --------------------------------------------------------------------
@contextmanager
def timed_calls(module_name: str, function: str, device: torch.device) -> Iterator[list[float]]:
    """Within the block, `module_name.function` is wrapped to note each call's wall time (s).

    The attribute is set back on exit, whatever happens. Wrapping the attribute (not the
    function object) is what catches the calls: callers look the name up in that module
    at call time. On CUDA the wrapper synchronises before and after each call, which is
    why the scoring runs are separate from the first-token runs.
    """
    module = importlib.import_module(module_name)
    original = getattr(module, function)
    seconds: list[float] = []

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        synchronize(device)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            synchronize(device)
            seconds.append(time.perf_counter() - start)

    setattr(module, function, timed)
    try:
        yield seconds
    finally:
        setattr(module, function, original)


def _innermost(module: nn.Module) -> nn.Module:
    """The layer under a graft's wrappers (they keep it as `base_layer`)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


@contextmanager
def prefill_lengths(layers: Sequence[nn.Module]) -> Iterator[list[int | None]]:
    """Within the block, the sequence length each of `layers` gets on its first call.

    The hooks sit on the layers under any wrapper, so they see what the layer itself runs
    on: after FastV's pruning, the kept tokens only.
    """
    lengths: list[int | None] = [None] * len(layers)

    def note(index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if lengths[index] is None:  # the prefill; decoding steps would give 1
            hidden_states = args[0] if args else kwargs["hidden_states"]
            lengths[index] = hidden_states.shape[1]

    handles = [
        _innermost(layer).register_forward_pre_hook(functools.partial(note, index), with_kwargs=True)
        for index, layer in enumerate(layers)
    ]
    try:
        yield lengths
    finally:
        for handle in handles:
            handle.remove()


class _CpuTokenClock(TokenClock):
    """A `TokenClock` that also notes the process's CPU time (all its threads) at each token."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        super().put(value)
        self.cpu_times.append(time.process_time())


def first_token_seconds(
    model: nn.Module, inputs: dict[str, torch.Tensor], device: torch.device
) -> tuple[float, float]:
    """Wall and process CPU seconds from calling `generate` to the first answer token on the host.

    CPU time counts only what this process's threads ran: on a shared machine, time spent
    waiting for a core is in the wall time but not in it (on CUDA it is the host's part only).
    """
    clock = _CpuTokenClock()
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    generate_greedy(model, inputs, 1, streamer=clock)
    # The clocks note the prompt, then the one new token.
    return clock.times[-1] - start, clock.cpu_times[-1] - cpu_start


# -- measuring ------------------------------------------------------------------------------
@dataclass
class Settings:
    """How to measure."""

    device: torch.device
    dtype: torch.dtype
    warmup: int = 1
    repeats: int = 5
    progress: bool = True


@dataclass
class _Rounds:
    """One variant's timings, one entry per timed round."""

    first_token: list[float] = field(default_factory=list)
    first_token_cpu: list[float] = field(default_factory=list)
    scoring: list[float] = field(default_factory=list)
    scoring_run: list[float] = field(default_factory=list)  # first-token time of the scoring run
    scoring_calls: list[int] = field(default_factory=list)


def _measure_round(
    model: nn.Module, method: Method, inputs: dict[str, torch.Tensor], device: torch.device, rounds: _Rounds | None
) -> None:
    """One first-token run, then (for a method that scores) one with its scorer timed;
    appended to `rounds` unless None (warm-up)."""
    first_token, first_token_cpu = first_token_seconds(model, inputs, device)
    scoring: tuple[list[float], float] | None = None
    if method.scorer is not None:
        with timed_calls(*method.scorer, device) as calls:
            run_seconds, _ = first_token_seconds(model, inputs, device)
        if not calls:
            raise RuntimeError(
                f"{method.name}: {method.scoring_function} was not called during the first token; "
                "the graft no longer calls it through that name, so its share cannot be timed"
            )
        scoring = (calls, run_seconds)
    if rounds is None:
        return
    rounds.first_token.append(first_token)
    rounds.first_token_cpu.append(first_token_cpu)
    if scoring is not None:
        calls, run_seconds = scoring
        rounds.scoring.append(sum(calls))
        rounds.scoring_run.append(run_seconds)
        rounds.scoring_calls.append(len(calls))


def _count_once(model: LlavaForConditionalGeneration, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Multiply-adds of one real first-token call, and the image tokens each decoder layer got."""
    layers = model.model.language_model.layers
    with prefill_lengths(layers) as lengths:
        _, macs = count_macs(generate_greedy, model, inputs, 1)
    if any(length is None for length in lengths):
        raise RuntimeError("a decoder layer did not run during the first-token call")
    input_ids = inputs["input_ids"]
    prompt = input_ids.shape[1]
    placeholders = int((input_ids == model.config.image_token_id).sum())
    other = prompt - placeholders  # text tokens: never pruned
    per_layer = [length - other for length in lengths]
    return {
        "prompt_tokens": prompt,
        "image_placeholders": placeholders,
        "image_tokens_per_layer": per_layer,
        # Layers 1..K see what the LLM is fed; FastV prunes from layer K + 1 on.
        "image_tokens_to_layer_k": per_layer[0],
        "image_tokens_after_layer_k": per_layer[FASTV_LAYER],
        "multiply_adds": macs,
    }


def _summarize(method: Method, rounds: _Rounds, once: dict[str, Any]) -> dict[str, Any]:
    """One variant's figures as a JSON-ready dict (the ratios to the baseline come later)."""
    scored = bool(rounds.scoring)
    return {
        "name": method.name,
        "description": method.description,
        **once,
        "first_token_s": timing_stats(rounds.first_token),
        "first_token_cpu_s": timing_stats(rounds.first_token_cpu),
        "scoring_function": method.scoring_function,
        "scoring_calls": rounds.scoring_calls[0] if scored else 0,
        "scoring_s": timing_stats(rounds.scoring) if scored else None,
        "scoring_run_first_token_s": timing_stats(rounds.scoring_run) if scored else None,
        # Per round: scoring time / that run's first-token time; the median of those.
        "scoring_share": (
            statistics.median(s / t for s, t in zip(rounds.scoring, rounds.scoring_run)) if scored else None
        ),
    }


def _add_ratios(results: list[dict[str, Any]]) -> None:
    """Each variant's first-token speed-up over the baseline (wall and CPU time), and its
    multiply-adds over the baseline's."""
    baseline = next(r for r in results if r["name"] == "baseline")
    for result in results:
        result["speed_up"] = baseline["first_token_s"]["median"] / result["first_token_s"]["median"]
        result["cpu_speed_up"] = baseline["first_token_cpu_s"]["median"] / result["first_token_cpu_s"]["median"]
        result["mac_ratio"] = result["multiply_adds"] / baseline["multiply_adds"]


def run(
    sizes: Sizes, settings: Settings, attn_implementation: str, methods: Sequence[Method] = METHODS
) -> list[dict[str, Any]]:
    """Build the model once; measure every method on it, round-robin (see `end_to_end.run`).

    A round grafts each method in turn and runs its timings once, so on a shared machine
    a burst of load slows all variants alike; the first `warmup` rounds are not kept.
    """
    from tqdm.auto import tqdm

    model, tokenizer = build_base_model(sizes, settings.dtype, settings.device, attn_implementation)
    inputs: dict[str, dict[str, torch.Tensor]] = {}
    for method in methods:
        with grafted(model, method) as num_image_tokens:
            # Seed 0 for every variant: the same image and text; only the number of
            # placeholders differs.
            inputs[method.name] = make_inputs(
                model, tokenizer, Grafted(num_image_tokens), Variant(method.name, method.description), batch_size=1
            )
    rounds = {m.name: _Rounds() for m in methods}
    total_rounds = settings.warmup + settings.repeats
    bar = tqdm(total=total_rounds * len(methods) + len(methods), desc=f"training-free speed ({sizes.label})",
               unit="step", disable=not settings.progress)
    with torch.inference_mode():
        for index in range(total_rounds):
            for method in methods:
                bar.set_postfix_str(f"round {index + 1}/{total_rounds}: {method.name}")
                with grafted(model, method):
                    kept = rounds[method.name] if index >= settings.warmup else None
                    _measure_round(model, method, inputs[method.name], settings.device, kept)
                bar.update()
    # Counted once per variant, outside the timed rounds (the counter's modes cost time).
    results = []
    for method in methods:  # once per variant: multiply-adds and tokens per layer
        bar.set_postfix_str(f"multiply-adds: {method.name}")
        with grafted(model, method):
            once = _count_once(model, inputs[method.name])
        results.append(_summarize(method, rounds[method.name], once))
        bar.update()
    bar.close()
    _add_ratios(results)
    return results


# -- the command line -----------------------------------------------------------------------
def quick_sizes() -> Sizes:
    """The end-to-end benchmark's quick sizes, with 4 decoder layers: FastV needs layers after K."""
    sizes = model_sizes(1 / 16, vocab_size=1024)
    text = copy.deepcopy(sizes.text)
    text.num_hidden_layers = FASTV_LAYER + 2
    return dataclasses.replace(sizes, text=text, label="quick")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training_free_speed",
                                     description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--scale", type=float, default=1.0, help="width and depth factor, e.g. 0.25 (default 1: full size)")
    size.add_argument("--quick", action="store_true", help="tiny model and few runs (seconds; for tests)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="auto: bfloat16 on CUDA; on a CPU the faster of float32 and bfloat16 here")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                        help="transformers attn_implementation (FastV indexes the sdpa and eager masks)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON, Markdown and PNG")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    if not args.quick and model_sizes(args.scale).text.num_hidden_layers <= FASTV_LAYER:
        parser.error(f"--scale {args.scale} leaves phi-2 too few layers for FastV after layer {FASTV_LAYER}")
    if args.warmup < 0 or (args.repeats is not None and args.repeats < 1):
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write `training_free_speed[_quick].{json,md,png}` to --out; return the report."""
    from .training_free_speed_report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = quick_sizes() if args.quick else model_sizes(args.scale)
    dtype, dtype_choice = pick_dtype(args.dtype, device, sizes.text_dim)
    settings = Settings(device=device, dtype=dtype, warmup=args.warmup,
                        repeats=args.repeats or (2 if args.quick else 5), progress=not args.no_progress)
    attn_implementation = attention_implementation(args.attn, device)
    load_at_start = load_average()
    started = time.perf_counter()
    results = run(sizes, settings, attn_implementation)
    report = {
        "benchmark": "training_free_speed",
        "command": " ".join(["python -m benchmarks.training_free_speed", *argv]),
        "machine": {**machine_and_versions(device), "load_average_at_start": load_at_start},
        "settings": {
            "sizes": sizes.label,
            "vision": config_summary(sizes.vision),
            "text": config_summary(sizes.text),
            "image_tokens": IMAGE_TOKENS,
            "text_tokens": TEXT_TOKENS,
            "fastv_layer": FASTV_LAYER,
            "batch_size": 1,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "dtype_choice": dtype_choice,
            "attn_implementation": attn_implementation,
            "threads": torch.get_num_threads(),
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "multiply_adds_method": "tokencompress.mac_count.count_macs over one real first-token call "
                                    "(generate, 1 new token) of each grafted variant",
        },
        "wall_time_s": time.perf_counter() - started,
        "variants": results,
    }
    stem = "training_free_speed_quick" if args.quick else "training_free_speed"
    paths = write_report(report, args.out, stem)
    print((args.out / f"{stem}.md").read_text())
    print("wrote " + ", ".join(str(path) for path in paths))
    return report


if __name__ == "__main__":
    main()
