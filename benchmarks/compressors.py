"""Micro-benchmark of the visual-token compressors and EmbQ.

    python -m benchmarks.compressors [--quick] [--batch 8] [--out benchmarks/results]
    python -m benchmarks.compressors --docs-table   # the table of docs/compressors.md

For each compressor at the paper's workload (B=8, a 27x27 grid of 1152-wide SigLIP
tokens, phi-2's width 2560; EmbQ with 9 queries, 64 text tokens, 729 vision tokens) it
measures the median forward and forward+backward time, the peak memory of one call and
the multiply-adds, and compares SAP with a plain window-loop implementation of the same
maths (the release's style). Results go to stdout as Markdown, and to `--out` as JSON and
Markdown with the machine, the torch version and the command line.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from tokencompress import LDP, SAP, AvgPool, EmbQ, LDPv2, PixelShuffle
from tokencompress.base import Grid
from tokencompress.environment import describe_environment, environment_line
from tokencompress.mac_count import count_macs

__all__ = [
    "Workload",
    "PAPER",
    "CLIP_336",
    "QUICK",
    "Case",
    "build_cases",
    "count_multiply_adds",
    "multiply_add_table",
    "timed_seconds",
    "peak_bytes",
    "sap_window_loop",
    "main",
]

MIB = 2**20


# -- what is measured -------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """Sizes of one benchmark setting."""

    grid: Grid
    vision_dim: int  # width of the vision encoder's tokens
    llm_dim: int  # width of the LLM's hidden states (LDP's output, EmbQ's text side)
    text_tokens: int = 64  # instruction tokens that EmbQ attends to
    num_queries: int = 9
    embq_inner_dim: int = 576
    embq_heads: int = 32
    ldpv2_grid: Grid = (12, 12)  # MobileVLM v2's 144 output tokens
    description: str = ""

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def label(self) -> str:
        return f"{self.grid[0]}x{self.grid[1]}x{self.vision_dim}"


PAPER = Workload(grid=(27, 27), vision_dim=1152, llm_dim=2560, description="SigLIP so400m/14 at 384 px, phi-2")
CLIP_336 = Workload(grid=(24, 24), vision_dim=1024, llm_dim=2560, description="CLIP ViT-L/14 at 336 px, phi-2")
QUICK = Workload(
    grid=(6, 6), vision_dim=32, llm_dim=64, text_tokens=8, num_queries=3,
    embq_inner_dim=16, embq_heads=4, ldpv2_grid=(3, 3), description="tiny, for tests",
)  # fmt: skip


@dataclass
class Case:
    """One module and the inputs of one call: `module(*inputs, **kwargs)`."""

    key: str  # stable id: the registry name, or "embq"
    name: str  # as printed, with the constructor's sizes
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    tokens_in: str = ""
    tokens_out: int = 0
    width_in: str = ""
    width_out: int = 0

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.module(*(inputs or self.inputs), **self.kwargs)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def build_cases(
    workload: Workload,
    batch: int = 8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[Case]:
    """The compressors of the benchmark, in eval mode (SAP's dropout off), with inputs."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    torch.manual_seed(seed)
    c_in, c_llm, grid, n = workload.vision_dim, workload.llm_dim, workload.grid, workload.num_tokens
    vision = randn(batch, n, c_in)
    on_grid = {"grid": grid}
    ldpv2_grid = "" if workload.ldpv2_grid == (12, 12) else f", out_grid={workload.ldpv2_grid}"  # the default
    compressors: list[tuple[str, str, nn.Module]] = [
        ("sap", f"SAP({c_in})", SAP(c_in)),
        ("avgpool", "AvgPool(3)", AvgPool(3)),
        ("pixel_shuffle", "PixelShuffle(2, pad=True)", PixelShuffle(2, pad=True)),
        ("ldp", f"LDP({c_in}, {c_llm})", LDP(c_in, c_llm)),
        ("ldpv2", f"LDPv2({c_in}, {c_llm}{ldpv2_grid})", LDPv2(c_in, c_llm, out_grid=workload.ldpv2_grid)),
    ]
    cases = [
        Case(
            key, name, module.to(device=device, dtype=dtype).eval(), (vision,), on_grid,
            tokens_in=str(n), tokens_out=module.num_out_tokens(grid),
            width_in=str(c_in), width_out=module.out_dim(c_in),
        )  # fmt: skip
        for key, name, module in compressors
    ]
    embq = EmbQ(c_llm, c_in, inner_dim=workload.embq_inner_dim, num_heads=workload.embq_heads)
    queries = randn(batch, workload.num_queries, c_llm)
    text = randn(batch, workload.text_tokens, c_llm)
    cases.append(
        Case(
            "embq",
            f"EmbQ({c_llm}, {c_in})",
            embq.to(device=device, dtype=dtype).eval(),
            (queries, text, vision),
            tokens_in=f"{workload.num_queries} queries + {workload.text_tokens} text + {n} vision",
            tokens_out=workload.num_queries,
            width_in=f"{c_llm} + {c_llm} + {c_in}",
            width_out=c_llm,
        )
    )
    return cases


# -- measurements -----------------------------------------------------------------------
def count_multiply_adds(case: Case) -> int:
    """Multiply-adds of one forward, by `tokencompress.mac_count`'s formulas.

    Matmuls, convolutions and attention are counted; elementwise ops, softmaxes, norms
    and pooling are not (they are memory-bound, and small).
    """
    return count_macs(case)[1]


def multiply_add_table(workloads: Sequence[Workload] = (PAPER, CLIP_336)) -> str:
    """Markdown, one table per workload: tokens and widths in/out, parameters and
    multiply-adds of one image (B=1) for every case."""
    header = ["compressor", "tokens in -> out", "width in -> out", "parameters", "multiply-adds"]
    parts = []
    for workload in workloads:
        rows = [
            [
                f"`{case.name}`",
                f"{case.tokens_in} -> {case.tokens_out}",
                f"{case.width_in} -> {case.width_out}",
                f"{case.num_parameters:,}",
                _human_count(count_multiply_adds(case)),
            ]
            for case in build_cases(workload, batch=1)
        ]
        parts += [f"{workload.label()} ({workload.description}), one image:", "", _markdown_table(header, rows), ""]
    return "\n".join(parts).rstrip("\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "CUDA: torch.cuda.max_memory_allocated() during one call minus "
            "torch.cuda.memory_allocated() before it"
        )
    return (
        "CPU: the most bytes of tensors allocated during one call that are alive at the "
        "same time, from the allocation events of torch.profiler (profile_memory=True)"
    )


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory that one call of `fn` adds on top of what is alive before it
    (weights, inputs and gradients from an earlier call are not counted)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    # The CPU allocator has no statistics, and tracemalloc does not see torch's
    # allocations; the profiler records every allocation and free with its size.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw event list: `prof.events()` folds allocations into the ops that made them,
    # which loses their order, and the order is what a peak needs.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda event: event.start_ns())  # stable: ties keep recorded order
    live = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def forward_fn(case: Case) -> Callable[[], Any]:
    def forward() -> None:
        with torch.inference_mode():
            case()

    return forward


def forward_backward_fn(case: Case) -> Callable[[], Any]:
    """One training step's compute: forward, then backward of a fixed random cotangent."""
    leaves = tuple(t.detach().clone().requires_grad_() for t in case.inputs)
    params = [p for p in case.module.parameters() if p.requires_grad]
    with torch.no_grad():
        cotangent = torch.randn_like(case(*leaves))

    def forward_backward() -> None:
        case(*leaves).backward(cotangent)
        # Free the gradients inside the call, so each call starts from the same state
        # (and the profiler never sees a free of a block allocated before it started).
        for tensor in (*leaves, *params):
            tensor.grad = None

    return forward_backward


def sap_window_loop(sap: SAP, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """SAP written as the release writes it: a Python loop over windows, each scored by
    the MLP, softmaxed and summed. The reference that `SAP`'s vectorized code must match."""
    batch, _, channels = x.shape
    height, width = grid
    x = x.reshape(batch, height, width, channels)
    pooled = []
    for top in range(0, height, sap.window):
        for left in range(0, width, sap.window):
            window = x[:, top : top + sap.window, left : left + sap.window].reshape(batch, -1, channels)
            weights = torch.softmax(sap.score(window), dim=1)  # (B, tokens in window, 1)
            pooled.append((weights * window).sum(dim=1))
    return torch.stack(pooled, dim=1)


def compare_sap_with_window_loop(
    workload: Workload, batch: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int
) -> dict[str, Any]:
    """Speed of SAP against `sap_window_loop`, and how far apart their outputs are."""
    torch.manual_seed(0)
    sap = SAP(workload.vision_dim).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, workload.num_tokens, workload.vision_dim).to(device=device, dtype=dtype)
    sap_case = Case("sap", "SAP", sap, (x,), {"grid": workload.grid})
    loop_case = Case("sap_loop", "SAP window loop", _WindowLoop(sap), (x,), {"grid": workload.grid})
    result: dict[str, Any] = {}
    for label, case in (("vectorized", sap_case), ("loop", loop_case)):
        result[f"{label}_forward_ms"] = _ms(timed_seconds(forward_fn(case), device, warmup, repeats))
        result[f"{label}_forward_backward_ms"] = _ms(timed_seconds(forward_backward_fn(case), device, warmup, repeats))
    result["forward_speedup"] = result["loop_forward_ms"] / result["vectorized_forward_ms"]
    result["forward_backward_speedup"] = result["loop_forward_backward_ms"] / result["vectorized_forward_backward_ms"]
    with torch.no_grad():
        vectorized = sap(x, grid=workload.grid)
        result["max_abs_diff"] = float((vectorized - sap_window_loop(sap, x, workload.grid)).abs().max())
        result["max_abs_output"] = float(vectorized.abs().max())
        sap64, x64 = copy.deepcopy(sap).double(), x.double()  # rounding aside, the same maths
        result["max_abs_diff_float64"] = float(
            (sap64(x64, grid=workload.grid) - sap_window_loop(sap64, x64, workload.grid)).abs().max()
        )
    return result


class _WindowLoop(nn.Module):
    """`sap_window_loop` as a module, so it is timed like the compressors."""

    def __init__(self, sap: SAP) -> None:
        super().__init__()
        self.sap = sap

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return sap_window_loop(self.sap, x, grid)


# -- report -----------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    """Versions, machine and device of this run (`tokencompress.environment`)."""
    return describe_environment(device)


def _ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def _timing_cell(seconds: list[float]) -> str:
    """Median and range in ms: a wide range means a busy machine, so trust the median less."""
    return f"{_ms(seconds):.2f} [{1e3 * min(seconds):.2f}-{1e3 * max(seconds):.2f}]"


def _human_count(count: int) -> str:
    """Counts for people: 12.98 G, 969.2 M, 78.3 k, 405."""
    for scale, suffix, digits in ((1e9, "G", 2), (1e6, "M", 1), (1e3, "k", 1)):
        if count >= scale:
            return f"{count / scale:.{digits}f} {suffix}"
    return str(count)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    settings, machine, sap = report["settings"], report["machine"], report["sap_window_loop"]
    rows = [
        [
            r["name"],
            f"{r['tokens_in']} -> {r['tokens_out']}",
            f"{r['parameters']:,}",
            _human_count(r["multiply_adds"]),
            _timing_cell(r["forward_seconds"]),
            _timing_cell(r["forward_backward_seconds"]),
            f"{r['peak_forward_bytes'] / MIB:.1f}",
            f"{r['peak_forward_backward_bytes'] / MIB:.1f}",
        ]
        for r in report["compressors"]
    ]
    header = [
        "compressor", "tokens in -> out", "parameters", "multiply-adds", "forward ms [min-max]",
        "fwd+bwd ms [min-max]", "peak fwd MiB", "peak fwd+bwd MiB",
    ]  # fmt: skip
    sap_rows = [
        ["vectorized `SAP`", f"{sap['vectorized_forward_ms']:.2f}", f"{sap['vectorized_forward_backward_ms']:.2f}"],
        ["window loop (release style)", f"{sap['loop_forward_ms']:.2f}", f"{sap['loop_forward_backward_ms']:.2f}"],
    ]
    return "\n".join(
        [
            "# Compressor micro-benchmark",
            "",
            f"- command: `{report['command']}`",
            f"- machine: {machine['cpu']}, {machine['logical_cores']} logical cores, "
            f"{machine['torch_threads']} torch threads, device {machine['device']}"
            + (f" ({machine['gpu']})" if "gpu" in machine else ""),
            f"- versions: {environment_line(machine)}",
            f"- workload: B={settings['batch']}, grid {settings['grid'][0]}x{settings['grid'][1]}, vision width "
            f"{settings['vision_dim']}, LLM width {settings['llm_dim']}, {settings['dtype']}; EmbQ: "
            f"{settings['num_queries']} queries, {settings['text_tokens']} text tokens",
            f"- time: median of {settings['repeats']} calls after {settings['warmup']} warm-up calls "
            "(time.perf_counter); forward under inference_mode; modules in eval mode",
            f"- peak memory: {report['memory_method']}; weights and inputs not counted",
            "- multiply-adds: one forward of the whole batch, tokencompress.mac_count "
            "(matmuls, convs and attention, by formula)",
            "",
            _markdown_table(header, rows),
            "",
            "## SAP: vectorized against a window loop",
            "",
            _markdown_table(["implementation", "forward ms", "fwd+bwd ms"], sap_rows),
            "",
            f"Speed-up: {sap['forward_speedup']:.1f}x forward, {sap['forward_backward_speedup']:.1f}x "
            f"forward+backward. Same numbers: max |difference| {sap['max_abs_diff']:.2e} in "
            f"{settings['dtype']} (outputs up to {sap['max_abs_output']:.2f}), "
            f"{sap['max_abs_diff_float64']:.2e} in float64.",
            "",
        ]
    )


def run_benchmark(
    workload: Workload, batch: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int, progress: bool
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    cases = build_cases(workload, batch, dtype, device)
    results = []
    bar = tqdm(total=len(cases) + 1, desc="benchmark", unit="case", disable=not progress)
    for case in cases:
        bar.set_postfix_str(case.name)
        forward, forward_backward = forward_fn(case), forward_backward_fn(case)
        forward_seconds = timed_seconds(forward, device, warmup, repeats)
        forward_backward_seconds = timed_seconds(forward_backward, device, warmup, repeats)
        results.append(
            {
                "key": case.key,
                "name": case.name,
                "tokens_in": case.tokens_in,
                "tokens_out": case.tokens_out,
                "parameters": case.num_parameters,
                "multiply_adds": count_multiply_adds(case),
                "forward_ms": _ms(forward_seconds),
                "forward_seconds": forward_seconds,
                "forward_backward_ms": _ms(forward_backward_seconds),
                "forward_backward_seconds": forward_backward_seconds,
                "peak_forward_bytes": peak_bytes(forward, device),
                "peak_forward_backward_bytes": peak_bytes(forward_backward, device),
            }
        )
        bar.update()
    bar.set_postfix_str("SAP window loop")
    sap = compare_sap_with_window_loop(workload, batch, dtype, device, warmup, repeats)
    bar.update()
    bar.close()
    return {"compressors": results, "sap_window_loop": sap}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compressors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (seconds; for tests)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8; 2 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON and Markdown")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 5; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2; 1 with --quick)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--docs-table", action="store_true", help="print docs/compressors.md's size table and exit")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    for name in ("batch", "repeats", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be {'>= 0' if name == 'warmup' else '>= 1'}, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.docs_table:
        print(multiply_add_table())
        return None
    workload = QUICK if args.quick else PAPER
    batch = args.batch or (2 if args.quick else 8)
    repeats = args.repeats or (3 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)

    measured = run_benchmark(workload, batch, dtype, device, warmup, repeats, progress=not args.no_progress)
    report = {
        "command": " ".join(["python -m benchmarks.compressors", *argv]),
        "machine": machine_info(device),
        "settings": {**asdict(workload), "batch": batch, "dtype": args.dtype, "warmup": warmup, "repeats": repeats},
        "memory_method": memory_method(device),
        **measured,
    }
    markdown = render_markdown(report)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "compressors_quick" if args.quick else "compressors"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown)
    return report


if __name__ == "__main__":
    main()
