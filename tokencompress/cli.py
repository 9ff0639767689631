"""The `tokencompress` console command.

    tokencompress profile --preset flashsloth --text-tokens 64 [--json out.json]
    tokencompress profile --preset all                     # one comparison table
    tokencompress profile --preset flashsloth --num-queries 0 6 9 12 15
    python -m tokencompress profile ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokencompress", description="Visual-token compression toolkit.")
    commands = parser.add_subparsers(dest="command", required=True)
    profile = commands.add_parser(
        "profile",
        help="first-round inference cost (multiply-adds, parameters, memory) of a preset",
        description="Count tokens, parameters, multiply-adds and memory of one first-round "
        "inference (vision encoder to the first answer token), part by part, on the meta device.",
    )
    # Kept in sync with profile_presets.PRESETS by a test; listed here so --help stays fast.
    profile.add_argument(
        "--preset", nargs="+", default=["flashsloth"], metavar="NAME",
        help="baseline, avgpool, sap, flashsloth, flashsloth-hd, llava-1.5-7b, or all (default: flashsloth)",
    )
    profile.add_argument("--text-tokens", type=int, default=64, help="prompt text tokens (default: 64)")
    profile.add_argument(
        "--num-queries", type=int, nargs="+", metavar="N",
        help="EmbQ query counts to profile (flashsloth presets only; 0 = no EmbQ)",
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

    from .profile_presets import PRESETS, preset

    names = list(PRESETS) if "all" in args.preset else args.preset
    options = [{}] if args.num_queries is None else [{"num_queries": n} for n in args.num_queries]
    dtype = getattr(torch, _DTYPES[args.dtype])
    return [
        dataclasses.replace(
            preset(name, text_tokens=args.text_tokens, **option), dtype=dtype, lm_head_positions=args.lm_head
        )
        for name in names
        for option in options
    ]


def _run_profile(args: argparse.Namespace) -> int:
    from .profile import compare_markdown, profile_model
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
