"""End-to-end benchmark: real forward passes of a LLaVA (SigLIP so400m + phi-2) with random weights.

    python -m benchmarks.end_to_end                 # full size (3.2B): 41 minutes on 2 CPU cores
    python -m benchmarks.end_to_end --scale 0.25    # narrower and shallower: minutes on 2 cores
    python -m benchmarks.end_to_end --quick         # tiny: seconds (the test runs this)

One transformers `LlavaForConditionalGeneration` is built with random weights; each
variant is grafted onto it with `tokencompress.adapters` (compressor before the
projector, EmbQ inside the LLM), measured, and removed again. Per variant, on whatever
device is present:

- time to first token: `generate` from pixel values and a prompt to the first answer
  token (vision encoder, compressor, projector, LLM prefill with EmbQ, first token);
- decode tokens/s after the first token (batch 1, KV cache), and batch throughput
  (samples/s of the first round for a batch of prompts);
- peak memory of one first-token call, weights included;
- wall time of the vision encoder, the compressor, EmbQ and the LLM prefill, timed with
  forward hooks in separate runs, as shares of that run's first-token time;
- multiply-adds of the first round from `tokencompress.profile` (same sizes).

Every timing is a median over rounds after warm-up rounds; a round runs each variant
once in turn (round-robin), so on a shared machine bursts of load hit all variants
alike. Results go to `--out` as JSON, Markdown and a PNG plot, with the machine, the
versions and the command line.
"""

from __future__ import annotations

import argparse
import copy
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
from transformers import LlavaConfig, LlavaForConditionalGeneration, PhiConfig, SiglipVisionConfig
from transformers.generation.streamers import BaseStreamer

from benchmarks.compressors import timed_seconds
from tokencompress import LDPv2, SAP, AvgPool, EmbQ, PixelShuffle, TokenCompressor
from tokencompress.environment import describe_environment, load_average
from tokencompress.mac_count import count_macs
from tokencompress.profile import EmbQSpec, ProfileSpec, build_projector, profile_model
from tokencompress.profile_presets import phi_2, siglip_so400m_384

__all__ = [
    "Sizes",
    "Variant",
    "VARIANTS",
    "model_sizes",
    "profile_spec",
    "build_base_model",
    "VariantModules",
    "build_variant_modules",
    "Grafted",
    "graft_variant",
    "make_inputs",
    "pick_dtype",
    "synchronize",
    "TokenClock",
    "PartClock",
    "timing_stats",
    "generate_greedy",
    "measure_round",
    "summarize",
    "run",
    "attention_implementation",
    "config_summary",
    "main",
]

GRID_SIDE = 27  # SigLIP so400m/14 at 384 px; kept at every scale, so token counts are the paper's
TEXT_TOKENS = 64  # instruction tokens per prompt, as tokencompress.profile's presets
NUM_QUERIES = 9


# -- sizes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """The backbone configs at one scale, and EmbQ's sizes to match.

    `vision` is the full SigLIP config (features come from its penultimate layer);
    `text` is phi-2's. Widths scale through the number of heads (head sizes stay 72, 80
    and EmbQ's 18), depths through the number of layers.
    """

    vision: SiglipVisionConfig
    text: PhiConfig
    embq_inner_dim: int
    embq_heads: int
    embq_layer: int  # 1-based: EmbQ updates this decoder layer's input
    label: str

    @property
    def vision_dim(self) -> int:
        return self.vision.hidden_size

    @property
    def text_dim(self) -> int:
        return self.text.hidden_size


def _scaled(count: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(count * scale))


def model_sizes(scale: float = 1.0, vocab_size: int | None = None) -> Sizes:
    """The paper's backbones (`tokencompress.profile_presets`) scaled by `scale`.

    scale=1 gives the presets' configs unchanged; 0.25 gives a quarter of the heads
    (width) and of the layers (depth). The 27x27 vision grid never changes.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale!r}")
    vision, text = siglip_so400m_384(), phi_2()
    if scale != 1:
        vision_head, text_head = vision.hidden_size // vision.num_attention_heads, text.hidden_size // text.num_attention_heads
        vision.num_attention_heads = _scaled(vision.num_attention_heads, scale)
        vision.hidden_size = vision.num_attention_heads * vision_head
        vision.intermediate_size = _scaled(vision.intermediate_size, scale)
        vision.num_hidden_layers = _scaled(vision.num_hidden_layers, scale, minimum=2)
        text.num_attention_heads = text.num_key_value_heads = _scaled(text.num_attention_heads, scale)
        text.hidden_size = text.num_attention_heads * text_head
        text.intermediate_size = _scaled(text.intermediate_size, scale)
        text.num_hidden_layers = _scaled(text.num_hidden_layers, scale, minimum=2)
    if vocab_size is not None:
        text.vocab_size = vocab_size
    embq_heads = _scaled(32, scale)
    return Sizes(
        vision=vision,
        text=text,
        embq_inner_dim=embq_heads * 18,
        embq_heads=embq_heads,
        embq_layer=min(_scaled(8, scale), text.num_hidden_layers),
        label="full size" if scale == 1 else f"scale {scale:g}",
    )


# -- variants -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One configuration to measure: a compressor, maybe a new projector, maybe EmbQ."""

    name: str
    description: str
    compressor: Callable[[Sizes], TokenCompressor | None] = lambda sizes: None
    #: a projector for a compressor that changes the width (None: the model's own)
    projector: Callable[[Sizes], nn.Module | None] = lambda sizes: None
    embq: bool = False
    num_images: int = 1  # images (HD: views) per prompt

    def visual_tokens(self, sizes: Sizes) -> int:
        with torch.device("meta"):
            compressor = self.compressor(sizes)
        per_image = GRID_SIDE * GRID_SIDE if compressor is None else compressor.num_out_tokens((GRID_SIDE,) * 2)
        return self.num_images * per_image

    def tokens(self, sizes: Sizes) -> int:
        """Visual + query tokens: the paper's "token number"."""
        return self.visual_tokens(sizes) + (NUM_QUERIES if self.embq else 0)


def _sap(sizes: Sizes) -> SAP:
    return SAP(sizes.vision_dim, window=3)


VARIANTS: tuple[Variant, ...] = (
    Variant("baseline", "no compression (729 tokens)"),
    Variant("avgpool", "3x3 average pooling", lambda s: AvgPool(3)),
    Variant("sap", "SAP, 3x3 windows", _sap),
    Variant("flashsloth", f"SAP + EmbQ ({NUM_QUERIES} queries)", _sap, embq=True),
    Variant(
        "pixelshuffle", "PixelShuffle 2x2 (27x27 padded to 28x28), mlp2x_gelu 4C -> D",
        lambda s: PixelShuffle(2, pad=True),
        lambda s: build_projector("mlp2x_gelu", 4 * s.vision_dim, s.text_dim),
    ),
    Variant("ldpv2", "LDPv2 to 12x12, replaces the projector", lambda s: LDPv2(s.vision_dim, s.text_dim)),
    Variant("flashsloth-hd", f"5 views x SAP + EmbQ ({NUM_QUERIES} queries)", _sap, embq=True, num_images=5),
)


def profile_spec(variant: Variant, sizes: Sizes, dtype: torch.dtype) -> ProfileSpec:
    """The variant's first round for `tokencompress.profile` (one prompt, meta device)."""
    with torch.device("meta"):
        compressor = variant.compressor(sizes)
        embq = EmbQ(sizes.text_dim, sizes.vision_dim, sizes.embq_inner_dim, sizes.embq_heads) if variant.embq else None
    replaces_projector = compressor is not None and compressor.out_dim(sizes.vision_dim) == sizes.text_dim
    return ProfileSpec(
        sizes.vision,
        sizes.text,
        text_tokens=TEXT_TOKENS,
        num_images=variant.num_images,
        compressor=compressor,
        projector="identity" if replaces_projector else "mlp2x_gelu",
        embq=None if embq is None else EmbQSpec(embq, num_queries=NUM_QUERIES, layer=sizes.embq_layer),
        dtype=dtype,
        name=variant.name,
    )


# -- the model ------------------------------------------------------------------------------
def _byte_tokenizer() -> Any:
    """A byte-level tokenizer built locally (no download): 256 byte tokens and specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}
    )


def build_base_model(
    sizes: Sizes, dtype: torch.dtype, device: torch.device, attn_implementation: str, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, Any]:
    """A random-weight LLaVA (SigLIP + mlp2x_gelu + phi-2) in eval mode, and its tokenizer.

    The vision tower is built as deployed: cut after the penultimate layer (FlashSloth's
    feature layer) and without SigLIP's pooling head, so nothing runs that LLaVA would
    throw away. The only model-building place of this benchmark: grafts go on top.
    """
    tokenizer = _byte_tokenizer()
    vision = copy.deepcopy(sizes.vision)
    vision.num_hidden_layers -= 1
    vision.vision_use_head = False
    text = copy.deepcopy(sizes.text)
    text.pad_token_id = tokenizer.pad_token_id
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=GRID_SIDE * GRID_SIDE,
        vision_feature_layer=-1,  # the last layer of the cut tower: the penultimate of SigLIP
        vision_feature_select_strategy="full",  # SigLIP has no CLS token
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


@dataclass
class VariantModules:
    """The modules a variant adds, built once and grafted again in every round."""

    compressor: TokenCompressor | None
    projector: nn.Module | None
    embq: EmbQ | None


def build_variant_modules(variant: Variant, sizes: Sizes) -> VariantModules:
    compressor = variant.compressor(sizes)
    return VariantModules(
        compressor=None if compressor is None else compressor.eval(),
        projector=variant.projector(sizes),
        embq=EmbQ(sizes.text_dim, sizes.vision_dim, sizes.embq_inner_dim, sizes.embq_heads) if variant.embq else None,
    )


@dataclass
class Grafted:
    """A variant grafted onto the model: what the inputs and the part timers need."""

    num_image_tokens: int
    compressor: nn.Module | None = None
    query_token_ids: tuple[int, ...] = ()
    embq_layer: nn.Module | None = None  # the wrapped decoder layer (its `base_layer` inside)


@contextmanager
def graft_variant(
    model: LlavaForConditionalGeneration, tokenizer: Any, modules: VariantModules, sizes: Sizes
) -> Iterator[Grafted]:
    """Graft a variant's compressor (and EmbQ) onto `model`; remove both on exit."""
    from tokencompress.adapters import graft_compressor, graft_embq

    grafts: list[Any] = []
    try:
        grafted = Grafted(num_image_tokens=GRID_SIDE * GRID_SIDE)
        if modules.compressor is not None:
            compressor_graft = graft_compressor(model, modules.compressor, projector=modules.projector)
            grafts.append(compressor_graft)
            grafted.num_image_tokens = compressor_graft.num_image_tokens
            grafted.compressor = compressor_graft.compressor
        if modules.embq is not None:
            embq_graft = graft_embq(
                model, modules.embq, layer=sizes.embq_layer, num_queries=NUM_QUERIES, tokenizer=tokenizer
            )
            grafts.append(embq_graft)
            grafted.query_token_ids = embq_graft.token_ids
            grafted.embq_layer = model.model.language_model.layers[sizes.embq_layer - 1]
        yield grafted
    finally:
        for graft in reversed(grafts):  # last made, first removed
            graft.remove()


def make_inputs(
    model: LlavaForConditionalGeneration,
    tokenizer: Any,
    grafted: Grafted,
    variant: Variant,
    batch_size: int,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """`batch_size` prompts: image placeholders, `TEXT_TOKENS` instruction tokens, then the
    query block if EmbQ is grafted; and random pixel values for each prompt's images."""
    from tokencompress.adapters import EncodedPrompt, QueryBlock, pad_prompts

    generator = torch.Generator().manual_seed(seed)
    image_ids = [model.config.image_token_id] * (grafted.num_image_tokens * variant.num_images)
    prompts = []
    for _ in range(batch_size):
        # Byte tokens (ids < 256): never an image, query or special token.
        text = torch.randint(0, 256, (TEXT_TOKENS,), generator=generator).tolist()
        ids = image_ids + text + list(grafted.query_token_ids)
        blocks = ()
        if grafted.query_token_ids:
            start = len(image_ids) + len(text)
            query_positions = range(start, start + len(grafted.query_token_ids))
            blocks = (QueryBlock(query_positions, tuple(range(len(image_ids), start))),)
        prompts.append(EncodedPrompt(ids, [-100] * len(ids), blocks, variant.num_images))
    batch = pad_prompts(prompts, pad_token_id=tokenizer.pad_token_id)
    if not grafted.query_token_ids:
        batch.pop("embq_instruction_map")  # an ungrafted LLaVA takes no such argument
    device, dtype = model.device, model.dtype
    vision = model.config.vision_config
    pixel_values = torch.randn(
        batch_size * variant.num_images, 3, vision.image_size, vision.image_size, generator=generator
    )
    return {**{k: v.to(device) for k, v in batch.items()}, "pixel_values": pixel_values.to(device, dtype)}


# -- choosing the dtype ---------------------------------------------------------------------
def pick_dtype(requested: str, device: torch.device, width: int) -> tuple[torch.dtype, dict[str, Any]]:
    """The dtype to run in, and why.

    "auto": bfloat16 on CUDA; on a CPU, whichever of float32 and bfloat16 runs a
    (256 x width) @ (width x 4 width) matmul faster here (CPUs with AVX512-BF16 or AMX run
    bfloat16 several times faster; others may emulate it slowly).
    """
    if requested != "auto":
        return getattr(torch, requested), {"requested": requested}
    if device.type == "cuda":
        return torch.bfloat16, {"requested": "auto", "reason": "CUDA"}
    speeds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, weight = torch.randn(256, width, dtype=dtype), torch.randn(width, 4 * width, dtype=dtype)
        seconds = _median(timed_seconds(lambda: x @ weight, device, warmup=1, repeats=5))
        speeds[str(dtype).removeprefix("torch.")] = 2 * 256 * width * 4 * width / seconds / 1e9
    best = max(speeds, key=speeds.__getitem__)
    return getattr(torch, best), {
        "requested": "auto",
        "reason": f"faster matmul on this CPU (GFLOP/s: {', '.join(f'{k} {v:.0f}' for k, v in speeds.items())})",
        "matmul_gflops": speeds,
    }


# -- clocks ---------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for `device` (CUDA kernels run asynchronously); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


class TokenClock(BaseStreamer):
    """A `generate` streamer that notes when each new token reaches the host.

    `generate` puts the prompt first, then every new token right after it is chosen
    (moved to the CPU, so on CUDA the time is after the device finished it).
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class _Span:
    start: float | None = None
    end: float | None = None


class PartClock:
    """Wall time of parts of the model during one call, with forward hooks.

    A part runs from a hook on one module to a hook on another ("pre": before its
    forward, "post": after); only its first run after `reset()` counts (the prefill, not
    the decoding steps). On CUDA each hook synchronises, so use it in runs of its own.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.spans: dict[str, _Span] = {}
        self._handles: list[Any] = []

    def add(self, name: str, start: tuple[nn.Module, str], end: tuple[nn.Module, str]) -> None:
        span = self.spans[name] = _Span()
        self._hook(*start, lambda: span.start is None, lambda now: setattr(span, "start", now))
        self._hook(*end, lambda: span.start is not None and span.end is None, lambda now: setattr(span, "end", now))

    def _hook(self, module: nn.Module, when: str, wanted: Callable[[], bool], note: Callable[[float], None]) -> None:
        def hook(*_: Any) -> None:
            if wanted():
                synchronize(self.device)
                note(time.perf_counter())

        register = module.register_forward_pre_hook if when == "pre" else module.register_forward_hook
        self._handles.append(register(hook))

    def reset(self) -> None:
        for span in self.spans.values():
            span.start = span.end = None

    def seconds(self) -> dict[str, float]:
        return {name: span.end - span.start for name, span in self.spans.items() if span.end is not None}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def part_clock(model: LlavaForConditionalGeneration, grafted: Grafted, device: torch.device) -> PartClock:
    """Hooks for the vision encoder, the compressor, EmbQ and the LLM prefill."""
    clock = PartClock(device)
    tower, language_model = model.model.vision_tower, model.model.language_model
    clock.add("vision encoder", (tower, "pre"), (tower, "post"))
    if grafted.compressor is not None:
        clock.add("compressor", (grafted.compressor, "pre"), (grafted.compressor, "post"))
    if grafted.embq_layer is not None:
        # The graft's layer adds EmbQ's update, then calls the original layer: EmbQ is
        # the time from entering the wrapper to entering the layer it wraps.
        clock.add("EmbQ", (grafted.embq_layer, "pre"), (grafted.embq_layer.base_layer, "pre"))
    clock.add("LLM prefill", (language_model, "pre"), (language_model, "post"))
    return clock


# -- measuring ------------------------------------------------------------------------------
@dataclass
class Settings:
    """How to measure."""

    device: torch.device
    dtype: torch.dtype
    warmup: int = 1
    repeats: int = 5
    decode_tokens: int = 16
    batch_size: int = 4
    progress: bool = True


def timing_stats(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and every run, JSON-ready."""
    return {"median": _median(values), "min": min(values), "max": max(values), "runs": list(values)}


def generate_greedy(model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, **kwargs: Any) -> Any:
    """Exactly `new_tokens` greedy tokens (no early stop at EOS: every run does the same work)."""
    return model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
    )


def _peak_memory(model: nn.Module, run: Callable[[], Any], device: torch.device) -> dict[str, int]:
    from benchmarks.compressors import peak_bytes

    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "weight_bytes": weights}
    return {"peak_bytes": weights + peak_bytes(run, device), "weight_bytes": weights}


def _multiply_adds(
    model: nn.Module, inputs: dict[str, torch.Tensor], variant: Variant, sizes: Sizes, dtype: torch.dtype,
    prompt_tokens: int,
) -> dict[str, Any]:
    """First-round multiply-adds and parameters from `tokencompress.profile` (meta device).

    Should the profiler fail, the multiply-adds are counted on one real first-token call
    instead (`tokencompress.mac_count`), and the JSON says so.
    """
    try:
        result = profile_model(profile_spec(variant, sizes, dtype))
    except Exception as error:  # noqa: BLE001 - any failure: count on the real model
        _, macs = count_macs(generate_greedy, model, inputs, 1)
        return {
            "params": None,
            "multiply_adds": macs,
            "multiply_adds_source": f"mac_count on one real call (tokencompress.profile failed: {error!r})",
        }
    if result.tokens != variant.tokens(sizes) or result.llm_tokens != prompt_tokens:
        raise RuntimeError(
            f"{variant.name}: the profile counts {result.tokens} tokens ({result.llm_tokens} in the LLM) "
            f"but the benchmark ran {variant.tokens(sizes)} ({prompt_tokens}); they must agree"
        )
    return {"params": result.params, "multiply_adds": result.macs, "multiply_adds_source": "tokencompress.profile"}


@dataclass
class _Rounds:
    """One variant's timings, one entry per timed round."""

    first_token: list[float] = field(default_factory=list)
    decode_rate: list[float] = field(default_factory=list)
    batch_rate: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)


def measure_round(
    model: LlavaForConditionalGeneration,
    grafted: Grafted,
    one: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    settings: Settings,
    rounds: _Rounds | None,
) -> None:
    """One run of each timing of a grafted variant; appended to `rounds` unless None (warm-up)."""
    device, new_tokens = settings.device, settings.decode_tokens
    # First token and decoding, batch 1: one generate call gives both.
    clock = TokenClock()
    synchronize(device)
    start = time.perf_counter()
    generate_greedy(model, one, new_tokens, streamer=clock)
    token_times = clock.times[-new_tokens:]  # the prompt is put first
    # Batch throughput of the first round.
    batch_seconds = timed_seconds(lambda: generate_greedy(model, batch, 1), device, warmup=0, repeats=1)[0]
    # Parts, in a run of their own (the hooks synchronise on CUDA).
    parts = part_clock(model, grafted, device)
    try:
        synchronize(device)
        part_start = time.perf_counter()
        generate_greedy(model, one, 1)
        synchronize(device)
        part_seconds = {**parts.seconds(), "first token": time.perf_counter() - part_start}
    finally:
        parts.remove()
    if rounds is None:
        return
    rounds.first_token.append(token_times[0] - start)
    if new_tokens > 1:
        rounds.decode_rate.append((new_tokens - 1) / (token_times[-1] - token_times[0]))
    rounds.batch_rate.append(settings.batch_size / batch_seconds)
    rounds.parts.append(part_seconds)


def summarize(variant: Variant, sizes: Sizes, rounds: _Rounds, once: dict[str, Any]) -> dict[str, Any]:
    """One variant's figures as a JSON-ready dict."""
    part_names = [name for name in rounds.parts[0] if name != "first token"]
    return {
        "name": variant.name,
        "description": variant.description,
        "num_images": variant.num_images,
        "visual_tokens": variant.visual_tokens(sizes),
        "query_tokens": NUM_QUERIES if variant.embq else 0,
        "tokens": variant.tokens(sizes),
        **once,
        "first_token_s": timing_stats(rounds.first_token),
        "decode_tokens_per_s": timing_stats(rounds.decode_rate) if rounds.decode_rate else None,
        "batch_samples_per_s": timing_stats(rounds.batch_rate),
        "parts_s": {name: timing_stats([run[name] for run in rounds.parts]) for name in [*part_names, "first token"]},
        "parts_share": {
            name: _median([run[name] / run["first token"] for run in rounds.parts]) for name in part_names
        },
    }


# -- the whole run --------------------------------------------------------------------------
def machine_and_versions(device: torch.device) -> dict[str, Any]:
    """Where the figures come from: versions, CPU model, cores, threads, GPU, load."""
    return describe_environment(device)


def attention_implementation(requested: str, device: torch.device) -> str:
    """`requested`, or for "auto" flash_attention_2 on CUDA when installed, else sdpa."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


def run(
    sizes: Sizes,
    settings: Settings,
    attn_implementation: str,
    variants: Sequence[Variant] = VARIANTS,
) -> list[dict[str, Any]]:
    """Build the model once; measure every variant on it, round-robin.

    Each round grafts every variant in turn and runs each timing once: on a shared
    machine a burst of load then slows all variants alike instead of one, so the
    medians stay comparable. The first `warmup` rounds are not kept.
    """
    from tqdm.auto import tqdm

    model, tokenizer = build_base_model(sizes, settings.dtype, settings.device, attn_implementation)
    modules = {v.name: build_variant_modules(v, sizes) for v in variants}
    inputs: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
    rounds = {v.name: _Rounds() for v in variants}
    total_rounds = settings.warmup + settings.repeats
    bar = tqdm(total=total_rounds * len(variants) + len(variants), desc=f"end-to-end ({sizes.label})",
               unit="step", disable=not settings.progress)
    with torch.inference_mode():
        for index in range(total_rounds):
            for variant in variants:
                bar.set_postfix_str(f"round {index + 1}/{total_rounds}: {variant.name}")
                with graft_variant(model, tokenizer, modules[variant.name], sizes) as grafted:
                    if variant.name not in inputs:
                        inputs[variant.name] = (
                            make_inputs(model, tokenizer, grafted, variant, batch_size=1),
                            make_inputs(model, tokenizer, grafted, variant, batch_size=settings.batch_size, seed=1),
                        )
                    one, batch = inputs[variant.name]
                    measure_round(
                        model, grafted, one, batch, settings, rounds[variant.name] if index >= settings.warmup else None
                    )
                bar.update()
        results = []
        for variant in variants:  # once per variant: memory and multiply-adds
            bar.set_postfix_str(f"memory, multiply-adds: {variant.name}")
            one = inputs[variant.name][0]
            with graft_variant(model, tokenizer, modules[variant.name], sizes):
                once = {
                    "prompt_tokens": one["input_ids"].shape[1],
                    **_peak_memory(model, lambda: generate_greedy(model, one, 1), settings.device),
                    **_multiply_adds(model, one, variant, sizes, settings.dtype, one["input_ids"].shape[1]),
                }
            results.append(summarize(variant, sizes, rounds[variant.name], once))
            bar.update()
    bar.close()
    return results


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--scale", type=float, default=1.0, help="width and depth factor, e.g. 0.25 (default 1: full size)")
    size.add_argument("--quick", action="store_true", help="tiny model and few runs (seconds; for tests)")
    names = [v.name for v in VARIANTS]
    parser.add_argument("--variants", nargs="+", choices=names, metavar="NAME", help=f"some of {', '.join(names)} (default: all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="auto: bfloat16 on CUDA; on a CPU the faster of float32 and bfloat16 here")
    parser.add_argument("--attn", default="auto", help="transformers attn_implementation (auto: flash_attention_2 if installed on CUDA, else sdpa)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5; 2 with --quick)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens generated per decode run (default 16; 4 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per batch for throughput (default 4; 2 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON, Markdown and PNG")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    for name, minimum in (("warmup", 0), ("repeats", 1), ("decode_tokens", 1), ("batch", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write `end_to_end[_<size>].{json,md,png}` to --out; return the report."""
    from .end_to_end_report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    # Quick: 1/16 of the heads and layers (the minimum 2 layers) and a small vocabulary.
    sizes = model_sizes(1 / 16, vocab_size=1024) if args.quick else model_sizes(args.scale)
    if args.quick:
        sizes = Sizes(sizes.vision, sizes.text, sizes.embq_inner_dim, sizes.embq_heads, sizes.embq_layer, "quick")
    dtype, dtype_choice = pick_dtype(args.dtype, device, sizes.text_dim)
    settings = Settings(
        device=device,
        dtype=dtype,
        warmup=1 if args.warmup is None else args.warmup,
        repeats=args.repeats or (2 if args.quick else 5),
        decode_tokens=args.decode_tokens or (4 if args.quick else 16),
        batch_size=args.batch or (2 if args.quick else 4),
        progress=not args.no_progress,
    )
    attn_implementation = attention_implementation(args.attn, device)
    variants = [v for v in VARIANTS if args.variants is None or v.name in args.variants]
    load_at_start = load_average()
    started = time.perf_counter()
    results = run(sizes, settings, attn_implementation, variants)
    report = {
        "benchmark": "end_to_end",
        "command": " ".join(["python -m benchmarks.end_to_end", *argv]),
        "machine": {**machine_and_versions(device), "load_average_at_start": load_at_start},
        "settings": {
            "sizes": sizes.label,
            "vision": config_summary(sizes.vision),
            "text": config_summary(sizes.text),
            "embq": {"inner_dim": sizes.embq_inner_dim, "heads": sizes.embq_heads, "layer": sizes.embq_layer,
                     "queries": NUM_QUERIES},
            "text_tokens": TEXT_TOKENS,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "dtype_choice": dtype_choice,
            "attn_implementation": attn_implementation,
            "threads": torch.get_num_threads(),
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "decode_tokens": settings.decode_tokens,
            "batch_size": settings.batch_size,
            "memory_method": _memory_method(device),
        },
        "wall_time_s": time.perf_counter() - started,
        "variants": results,
    }
    stem = "end_to_end_quick" if args.quick else ("end_to_end" if args.scale == 1 else f"end_to_end_scale{args.scale:g}")
    paths = write_report(report, args.out, stem)
    print((args.out / f"{stem}.md").read_text())
    print("wrote " + ", ".join(str(path) for path in paths))
    return report


def config_summary(config: Any) -> dict[str, Any]:
    """The sizes of a backbone config that a report names."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
            "image_size", "patch_size")
    return {key: getattr(config, key) for key in keys if hasattr(config, key)}


def _memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated() during one first-token call (weights included)"
    return (
        "weights and buffers + the most bytes of tensors alive at once during one first-token "
        "call (torch.profiler's allocation events; the CPU allocator keeps no statistics)"
    )


if __name__ == "__main__":
    main()
