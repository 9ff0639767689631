"""The `tokencompress` console command.

    tokencompress profile --preset flashsloth --text-tokens 64 [--json out.json]
    tokencompress profile --preset all                     # one comparison table
    tokencompress profile --preset flashsloth --num-queries 0 6 9 12 15
    tokencompress profile --preset qwen3-vl --image-size 1024 1024
    python -m tokencompress profile ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class _WholeNames(argparse.HelpFormatter):
    """Help text wrapped at spaces only, so that preset names (llava-next-7b/sap) stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokencompress", description="Visual-token compression toolkit.")
    commands = parser.add_subparsers(dest="command", required=True)
    profile = commands.add_parser(
        "profile",
        formatter_class=_WholeNames,
        help="first-round inference cost (multiply-adds, parameters, memory) of a preset",
        description="Count tokens, parameters, multiply-adds and memory of one first-round "
        "inference (vision encoder to the first answer token), part by part, on the meta device.",
    )
    # Kept in sync with profile_presets.PRESETS and PRESET_GROUPS by a test; listed here so
    # --help stays fast (the presets import transformers).
    profile.add_argument(
        "--preset", nargs="+", default=["flashsloth"], metavar="NAME",
        help="the paper's baseline, avgpool, sap, flashsloth, flashsloth-hd, llava-1.5-7b, or all of "
        "these six; llava-next-7b, llava-next-7b/avgpool2, llava-next-7b/sap, llava-next-7b/pixelshuffle, "
        "or llava-next for the four; qwen3-vl-2b, qwen3-vl-2b/avgpool2, qwen3-vl-2b/sap, "
        "qwen3-vl-2b/pixelshuffle, qwen3-vl-4b, qwen3-vl-4b/avgpool2, qwen3-vl-4b/sap, "
        "qwen3-vl-4b/pixelshuffle, or qwen3-vl for the eight (default: flashsloth)",
    )
    profile.add_argument("--text-tokens", type=int, default=64, help="prompt text tokens (default: 64)")
    profile.add_argument(
        "--num-queries", type=int, nargs="+", metavar="N",
        help="EmbQ query counts to profile (flashsloth presets only; 0 = no EmbQ)",
    )
    profile.add_argument(
        "--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
        help="image size in pixels (llava-next and qwen3-vl presets only; default: 672 672 and 512 512)",
    )
    profile.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="inference dtype (default: bf16)")
    profile.add_argument(
        "--lm-head", choices=["last", "all"], default="last",
        help="positions the LM head runs on during prefill (default: last, as generate does)",
    )
    profile.add_argument("--parts", action="store_true", help="also print the per-part table of every model")
    profile.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    profile.set_defaults(run=_run_profile)
    return parser


def _specs(args: argparse.Namespace) -> list[Any]:
    import torch

    from .profile_presets import PRESET_GROUPS, preset

    names = [member for name in args.preset for member in PRESET_GROUPS.get(name, (name,))]
    options: list[dict[str, Any]] = [{}] if args.num_queries is None else [{"num_queries": n} for n in args.num_queries]
    if args.image_size is not None:
        options = [{**option, "image_size": tuple(args.image_size)} for option in options]
    dtype = getattr(torch, _DTYPES[args.dtype])
    return [
        dataclasses.replace(
            preset(name, text_tokens=args.text_tokens, **option), dtype=dtype, lm_head_positions=args.lm_head
        )
        for name in names
        for option in options
    ]


def _run_profile(args: argparse.Namespace) -> int:
    from .profile import compare_markdown, profile_model, savings_markdown
    from .profile_presets import PAPER_TFLOPS

    try:
        specs = _specs(args)
    except ValueError as error:
        print(f"tokencompress profile: error: {error}", file=sys.stderr)
        return 2
    results = [profile_model(spec) for spec in specs]
    paper = {name: figure.tflops for name, figure in PAPER_TFLOPS.items()}
    if len(results) == 1 or args.parts:
        for result in results:
            print(result.to_markdown())
            figure = PAPER_TFLOPS.get(result.name)
            if figure is not None:
                gap = (result.macs / 1e12 - figure.tflops) / figure.tflops
                print(f"\npaper: {figure.tflops:.2f} T, {figure.source}; ours {result.macs / 1e12:.3f} T ({gap:+.1%})")
            print()
    if len(results) > 1:
        print(compare_markdown(results, paper))
        if any(result.name not in paper for result in results):  # models of ours: what compression saves
            print()
            print(savings_markdown(results))
    if args.json is not None:
        from .environment import describe_environment

        payload = {
            "command": "tokencompress " + " ".join(args.argv),
            "machine": describe_environment("meta"),  # counted on meta: versions matter, not speed
            "results": [
                {**result.to_dict(), "paper": dataclasses.asdict(PAPER_TFLOPS[result.name])}
                if result.name in PAPER_TFLOPS else result.to_dict()
                for result in results
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tokencompress` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.run(args)
