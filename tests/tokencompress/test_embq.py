"""`EmbQ` against a plain per-sample, per-head reference written from the spec.

The reference (spec: /work/shared/spec/flashsloth-reference.md, "EmbQ") drops masked
tokens instead of masking them, loops over samples and heads, and writes LayerNorm and
every Linear out by hand, so it shares no code path with the module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tokencompress import EmbQ, ops
from tokencompress.ops import dispatch

TINY = dict(text_dim=24, vision_dim=16, inner_dim=12, num_heads=4)  # q/k heads 3 wide, v heads 4


# -- the plain reference ---------------------------------------------------------------


def reference_embq(
    module: EmbQ,
    queries: torch.Tensor,
    text: torch.Tensor,
    vision: torch.Tensor,
    text_mask: Optional[torch.Tensor] = None,
    vision_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(update (B, n, Dt), head-averaged visual attention (B, n, V)), in the inputs' dtype."""
    p = {name: t.detach().to(queries.dtype) for name, t in module.named_parameters()}

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]

    heads = module.num_heads
    d, dv = module.inner_dim // heads, module.vision_dim // heads
    scale = 1 / math.sqrt(d)
    batch, n, _ = queries.shape
    updates, maps = [], []
    for b in range(batch):
        t = text[b] if text_mask is None else text[b][text_mask[b]]  # real tokens only
        v_keep = torch.ones(vision.shape[1], dtype=torch.bool) if vision_mask is None else vision_mask[b]
        f_v = vision[b][v_keep]

        # eq. 5: the queries read the instruction (down_t shared by queries and text)
        q = linear(layer_norm(linear(queries[b], "down_text"), "norm_query"), "text_attn.q_proj")
        t = layer_norm(linear(t, "down_text"), "norm_text")
        k, v = linear(t, "text_attn.k_proj"), linear(t, "text_attn.v_proj")
        text_queries = torch.zeros(n, module.inner_dim, dtype=queries.dtype)
        for h in range(heads):
            qk = slice(h * d, (h + 1) * d)
            if len(t):
                weights = torch.softmax(q[:, qk] @ k[:, qk].T * scale, dim=-1)
                text_queries[:, qk] = weights @ v[:, qk]

        # eq. 6: keys from the down-projected vision, values from the raw features
        q = linear(text_queries, "vision_attn.q_proj")
        k = linear(layer_norm(linear(f_v, "down_vision"), "norm_vision"), "vision_attn.k_proj")
        v = linear(f_v, "vision_attn.v_proj")
        visual = torch.zeros(n, module.vision_dim, dtype=queries.dtype)
        attention_map = torch.zeros(n, vision.shape[1], dtype=queries.dtype)
        for h in range(heads):
            qk, vh = slice(h * d, (h + 1) * d), slice(h * dv, (h + 1) * dv)
            if len(f_v):
                weights = torch.softmax(q[:, qk] @ k[:, qk].T * scale, dim=-1)
                visual[:, vh] = weights @ v[:, vh]
                attention_map[:, v_keep] += weights / heads
        updates.append(linear(visual, "up"))
        maps.append(attention_map)
    return torch.stack(updates), torch.stack(maps)


# -- helpers ---------------------------------------------------------------------------


def build(dtype: torch.dtype = torch.float64, **config) -> EmbQ:
    torch.manual_seed(0)
    module = EmbQ(**(config or TINY)).to(dtype)
    # Non-trivial LayerNorm affines, so a swapped norm cannot pass unnoticed.
    with torch.no_grad():
        for norm in (module.norm_query, module.norm_text, module.norm_vision):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
    return module


def make_inputs(module: EmbQ, batch: int, n: int, t: int, v: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, n, module.text_dim, generator=gen, dtype=dtype)
    text = torch.randn(batch, t, module.text_dim, generator=gen, dtype=dtype)
    vision = torch.randn(batch, v, module.vision_dim, generator=gen, dtype=dtype)
    text_mask = torch.rand(batch, t, generator=gen) < 0.7
    vision_mask = torch.rand(batch, v, generator=gen) < 0.7
    return queries, text, vision, text_mask, vision_mask


def assert_close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


@pytest.fixture(autouse=True)
def _automatic_backend(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    ops.set_backend(None)


# -- against the reference -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_masks", "masks"])
def test_matches_reference_float64(masked: bool, backend: str) -> None:
    module = build()
    queries, text, vision, text_mask, vision_mask = make_inputs(module, batch=3, n=5, t=7, v=11)
    if not masked:
        text_mask = vision_mask = None
    with ops.use_backend(backend):
        update, attention_map = module(queries, text, vision, text_mask, vision_mask, return_attention=True)
    expected_update, expected_map = reference_embq(module, queries, text, vision, text_mask, vision_mask)
    assert update.shape == queries.shape and attention_map.shape == (3, 5, 11)
    assert_close64(update, expected_update)
    assert_close64(attention_map, expected_map)


@pytest.mark.slow
def test_matches_reference_at_paper_size_float64() -> None:
    """phi-2 width 2560, SigLIP width 1152, 729 vision tokens, 32 heads (18 / 36 wide)."""
    module = build(text_dim=2560, vision_dim=1152)
    queries, text, vision, text_mask, _ = make_inputs(module, batch=2, n=9, t=13, v=729)
    update = module(queries, text, vision, text_mask)
    assert_close64(update, reference_embq(module, queries, text, vision, text_mask)[0])


def test_bfloat16_close_to_float64_reference() -> None:
    """bf16 parameters and inputs against the float64 maths on those same bf16 values.

    Tolerance: about six bf16 roundings lie on the path from the inputs to the update
    (down_text, norm_query, q_proj, the attention outputs, v_proj, up), each a relative
    error of at most 2^-8 passed on by later layers of gain ~1, so the error stays below
    6 * 2^-8 < 2^-5 of the output's scale (measured: ~2^-8). A wrong formula is off by
    O(1). Also checked: no worse than twice plain PyTorch in bf16 (the reference's maths
    run in bf16), flash-attn's criterion for kernels.
    """
    module = build(torch.bfloat16, text_dim=256, vision_dim=128, inner_dim=64, num_heads=8)
    queries, text, vision, text_mask, vision_mask = make_inputs(module, 2, 9, 13, 81, dtype=torch.bfloat16)
    update = module(queries, text, vision, text_mask, vision_mask)
    assert update.dtype == torch.bfloat16
    upcast = [x.double() for x in (queries, text, vision)]
    expected, _ = reference_embq(module, *upcast, text_mask, vision_mask)
    plain, _ = reference_embq(module, queries, text, vision, text_mask, vision_mask)
    error = (update.double() - expected).abs().max().item()
    assert error <= 2**-5 * expected.abs().max().item()
    assert error <= 2 * (plain.double() - expected).abs().max().item()


def test_gradcheck_tiny_float64() -> None:
    """Gradients of inputs and every parameter, with an empty instruction and a sample
    without vision in the batch."""
    module = build(text_dim=6, vision_dim=4, inner_dim=4, num_heads=2)
    queries, text, vision, text_mask, vision_mask = make_inputs(module, batch=3, n=2, t=3, v=4)
    text_mask[1] = False
    vision_mask[2] = False
    names, params = zip(*module.named_parameters())

    def run(queries, text, vision, *params):
        return torch.func.functional_call(
            module, dict(zip(names, params)), (queries, text, vision, text_mask, vision_mask)
        )

    inputs = [x.detach().requires_grad_() for x in (queries, text, vision, *params)]
    assert torch.autograd.gradcheck(run, inputs)


def test_gradcheck_packed_tiny_float64() -> None:
    module = build(text_dim=6, vision_dim=4, inner_dim=4, num_heads=2)
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    text = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    vision = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    cu = [torch.tensor(c) for c in ([0, 2, 3, 5], [0, 3, 3, 4], [0, 2, 5, 5])]
    assert torch.autograd.gradcheck(lambda q, t, v: module.forward_packed(q, t, v, *cu), (queries, text, vision))


def test_parameter_count_at_paper_size() -> None:
    with torch.device("meta"):
        module = EmbQ(2560, 1152)
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()}
    assert counts == {
        "down_text": 2560 * 576 + 576,
        "down_vision": 1152 * 576 + 576,
        "norm_query": 2 * 576,
        "norm_text": 2 * 576,
        "norm_vision": 2 * 576,
        "text_attn": 3 * (576 * 576 + 576),
        "vision_attn": 2 * (576 * 576 + 576) + 1152 * 1152 + 1152,
        "up": 1152 * 2560 + 2560,
    }
    # The release's LQFormer(num_layers=1) has exactly these tensors: 8,084,416 ("8.08M").
    assert sum(p.numel() for p in module.parameters()) == 8_084_416
    assert (module.head_dim, module.vision_head_dim, module.scale) == (18, 36, 18**-0.5)


# -- properties ------------------------------------------------------------------------

sizes = st.fixed_dictionaries(
    dict(batch=st.integers(1, 3), n=st.integers(1, 4), t=st.integers(0, 6), v=st.integers(0, 6), seed=st.integers(0, 2**16))
)


@given(sizes=sizes)
def test_masked_tokens_are_ignored(sizes: dict) -> None:
    module = build()
    queries, text, vision, text_mask, vision_mask = make_inputs(module, **sizes)
    update = module(queries, text, vision, text_mask, vision_mask)
    noisy_text = torch.where(text_mask[..., None], text, 1e3 * torch.randn_like(text))
    noisy_vision = torch.where(vision_mask[..., None], vision, 1e3 * torch.randn_like(vision))
    assert_close64(module(queries, noisy_text, noisy_vision, text_mask, vision_mask), update)


@given(sizes=sizes)
def test_each_sample_is_independent_of_the_batch(sizes: dict) -> None:
    """Row i of a padded batch equals sample i run alone with only its real tokens."""
    module = build()
    queries, text, vision, text_mask, vision_mask = make_inputs(module, **sizes)
    update = module(queries, text, vision, text_mask, vision_mask)
    for i in range(sizes["batch"]):
        alone = module(queries[i : i + 1], text[i][text_mask[i]][None], vision[i][vision_mask[i]][None])
        assert_close64(update[i : i + 1], alone)
    assert_close64(update, reference_embq(module, queries, text, vision, text_mask, vision_mask)[0])


def pack_real(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (B, L, D) + mask -> packed real tokens (total, D) and cumulative lengths."""
    return x[mask], torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@given(sizes=sizes)
def test_packed_matches_padded(backend: str, sizes: dict) -> None:
    module = build()
    queries, text, vision, text_mask, vision_mask = make_inputs(module, **sizes)
    all_queries = torch.ones(queries.shape[:2], dtype=torch.bool)
    packed_queries, cu_queries = pack_real(queries, all_queries)
    packed_text, cu_text = pack_real(text, text_mask)
    packed_vision, cu_vision = pack_real(vision, vision_mask)
    with ops.use_backend(backend):
        packed = module.forward_packed(packed_queries, packed_text, packed_vision, cu_queries, cu_text, cu_vision)
        padded = module(queries, text, vision, text_mask, vision_mask)
    assert_close64(packed, padded[all_queries])


def test_packed_query_blocks_can_share_a_vision_segment() -> None:
    """Two turns of one sample read its images; same result as duplicating the features."""
    module = build()
    gen = torch.Generator().manual_seed(3)
    queries = torch.randn(3 * 4, module.text_dim, generator=gen, dtype=torch.float64)
    text = torch.randn(5 + 2 + 0, module.text_dim, generator=gen, dtype=torch.float64)
    images = [torch.randn(n, module.vision_dim, generator=gen, dtype=torch.float64) for n in (9, 4)]
    cu_queries, cu_text = torch.tensor([0, 4, 8, 12]), torch.tensor([0, 5, 7, 7])
    shared = module.forward_packed(
        queries, text, torch.cat(images), cu_queries, cu_text, torch.tensor([0, 9, 13]),
        vision_index=torch.tensor([0, 0, 1]),  # turns 1 and 2 of sample 0, then sample 1
    )
    duplicated = module.forward_packed(
        queries, text, torch.cat([images[0], images[0], images[1]]), cu_queries, cu_text, torch.tensor([0, 9, 18, 22])
    )
    assert_close64(shared, duplicated)


@given(sizes=sizes)
def test_empty_instruction_follows_the_documented_rule(sizes: dict) -> None:
    """No instruction token: the text attention gives zeros, so the visual attention is
    queried by vision_attn.q_proj.bias; T = 0, an all-False mask and an empty packed
    span all agree with the reference run without text."""
    module = build()
    queries, text, vision, _, vision_mask = make_inputs(module, **sizes)
    no_text = torch.zeros(text.shape[0], 0, text.shape[2], dtype=text.dtype)
    expected, _ = reference_embq(module, queries, no_text, vision, None, vision_mask)
    masked = module(queries, text, vision, torch.zeros(text.shape[:2], dtype=torch.bool), vision_mask)
    empty = module(queries, no_text, vision, None, vision_mask)
    assert torch.isfinite(masked).all()
    assert_close64(masked, expected)
    assert_close64(empty, expected)
    # The rule, spelled out: every query token gets the same update.
    assert_close64(masked, masked[:, :1].expand_as(masked))


def test_sample_without_vision_gets_the_up_bias() -> None:
    module = build()
    queries, text, vision, text_mask, vision_mask = make_inputs(module, batch=2, n=3, t=4, v=5)
    vision_mask[0] = False
    update, attention_map = module(queries, text, vision, text_mask, vision_mask, return_attention=True)
    assert_close64(update[0], module.up.bias.detach().expand(3, -1))
    assert not attention_map[0].any()


def test_return_attention_does_not_change_the_update() -> None:
    module = build()
    queries, text, vision, text_mask, vision_mask = make_inputs(module, batch=2, n=3, t=4, v=6)
    update, attention_map = module(queries, text, vision, text_mask, vision_mask, return_attention=True)
    assert torch.equal(update, module(queries, text, vision, text_mask, vision_mask))
    torch.testing.assert_close(attention_map.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert not attention_map.masked_select(~vision_mask[:, None, :]).any()


def test_runs_through_the_ops_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    reference = dispatch.BACKENDS["reference"]

    def spy(*args):
        calls.append(args[0].shape)
        return reference.padded(*args)

    monkeypatch.setitem(dispatch.BACKENDS, "reference", dataclasses.replace(reference, padded=spy))
    module = build()
    queries, text, vision, text_mask, vision_mask = make_inputs(module, batch=2, n=3, t=4, v=6)
    with ops.use_backend("reference"):
        module(queries, text, vision, text_mask, vision_mask)
        module.forward_packed(queries.flatten(0, 1), text.flatten(0, 1), vision.flatten(0, 1),
                              torch.tensor([0, 3, 6]), torch.tensor([0, 4, 8]), torch.tensor([0, 6, 12]))
    # text then visual attention, padded then packed (varlen is padded for "reference")
    assert calls == [(2, 4, 3, 3)] * 4


def test_autocast_bfloat16() -> None:
    module = build(torch.float32)
    queries, text, vision, text_mask, vision_mask = make_inputs(module, 2, 3, 4, 6, dtype=torch.float32)
    expected = module(queries, text, vision, text_mask, vision_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        update = module(queries, text, vision, text_mask, vision_mask)
    assert update.dtype == torch.bfloat16
    # Same budget as the bf16 test: a few bf16 roundings of outputs of scale ~1.
    torch.testing.assert_close(update.float(), expected, rtol=0, atol=2**-5 * expected.abs().max().item())


# -- validation ------------------------------------------------------------------------


def padded_call(**overrides):
    module = build()
    queries, text, vision, text_mask, vision_mask = make_inputs(module, batch=2, n=3, t=4, v=5)
    args = dict(queries=queries, text=text, vision=vision, text_mask=text_mask, vision_mask=vision_mask)
    args.update(overrides)
    return lambda: module(**args)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(queries=torch.randn(2, 24, dtype=torch.float64)), r"queries must have rank 3 \(B, N, C\), got shape \(2, 24\)"),
        (dict(queries=torch.randn(2, 3, 16, dtype=torch.float64)), r"queries has width C=16, expected C=24"),
        (dict(queries=torch.randn(0, 3, 24, dtype=torch.float64)), r"queries has an empty batch \(B=0\)"),
        (dict(text=torch.randn(2, 4, 16, dtype=torch.float64)), r"text has width 16, expected \(B, T, text_dim\) with width 24"),
        (dict(vision=torch.randn(2, 5, 24, dtype=torch.float64)), r"vision has width 24, expected \(B, V, vision_dim\) with width 16"),
        (dict(vision=torch.randn(5, 16, dtype=torch.float64)), r"vision must have rank 3 \(B, V, vision_dim\), got shape \(5, 16\)"),
        (dict(text=torch.randn(3, 4, 24, dtype=torch.float64)), r"text has batch size 3, expected 2"),
        (dict(text_mask=torch.ones(2, 5, dtype=torch.bool)), r"text_mask has shape \(2, 5\), expected \(B, T\) = \(2, 4\)"),
        (dict(vision_mask=torch.ones(2, 5, dtype=torch.long)), r"vision_mask must be a bool tensor .*torch.int64"),
        (dict(vision=torch.randn(2, 5, 16)), r"vision has dtype torch.float32 but EmbQ's parameters are torch.float64"),
        (dict(text=torch.ones(2, 4, 24, dtype=torch.long)), r"text must be a floating-point tensor, got dtype torch.int64"),
    ],
)
def test_padded_input_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        padded_call(**overrides)()


def packed_call(**overrides):
    module = build()
    args = dict(
        queries=torch.randn(6, 24, dtype=torch.float64),
        text=torch.randn(4, 24, dtype=torch.float64),
        vision=torch.randn(7, 16, dtype=torch.float64),
        cu_seqlens_queries=torch.tensor([0, 3, 6]),
        cu_seqlens_text=torch.tensor([0, 1, 4]),
        cu_seqlens_vision=torch.tensor([0, 5, 7]),
    )
    args.update(overrides)
    return lambda: module.forward_packed(**args)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(queries=torch.randn(6, 1, 24, dtype=torch.float64)), r"queries must have rank 2 \(total_queries, text_dim\)"),
        (dict(queries=torch.randn(0, 24, dtype=torch.float64), cu_seqlens_queries=torch.tensor([0, 0, 0])), r"queries has no tokens"),
        (dict(cu_seqlens_queries=torch.tensor([0])), r"cu_seqlens_queries=\[0\] describes no segment"),
        (dict(cu_seqlens_text=torch.tensor([0, 4])), r"cu_seqlens_text has 1 segments, expected 2"),
        (dict(cu_seqlens_vision=torch.tensor([0, 5, 6])), r"cu_seqlens_vision=\[0, 5, 6\] must .* end at 7"),
        (dict(cu_seqlens_text=torch.tensor([0.0, 1.0, 4.0])), r"cu_seqlens_text must be a 1-D integer tensor"),
        (dict(cu_seqlens_vision=torch.tensor([0, 7])), r"cu_seqlens_vision has 1 segments, expected 2 .*or pass vision_index"),
        (dict(vision_index=torch.tensor([0, 2])), r"vision_index holds \[2\], expected indices in \[0, 2\)"),
        (dict(vision_index=torch.tensor([0])), r"vision_index must be an integer tensor of shape \(S,\) = \(2,\)"),
        (dict(text=torch.randn(4, 24)), r"text has dtype torch.float32 but EmbQ's parameters are torch.float64"),
    ],
)
def test_packed_input_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        packed_call(**overrides)()


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(text_dim=24, vision_dim=16, inner_dim=10, num_heads=4), r"inner_dim=10 is not divisible by num_heads=4"),
        (dict(text_dim=24, vision_dim=18, inner_dim=12, num_heads=4), r"vision_dim=18 is not divisible by num_heads=4"),
        (dict(text_dim=0, vision_dim=16), r"text_dim must be a positive int, got 0"),
        (dict(text_dim=24, vision_dim=16, num_heads=2.0), r"num_heads must be a positive int, got 2.0"),
    ],
)
def test_constructor_errors(config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EmbQ(**config)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autocast_matches_reference(dtype: torch.dtype) -> None:
    """Paper sizes on the GPU under autocast, through whichever fused backend is chosen."""
    module = build(torch.float32, text_dim=2560, vision_dim=1152)
    queries, text, vision, text_mask, vision_mask = make_inputs(module, 2, 9, 13, 729, dtype=torch.float32)
    text_mask[1] = False
    expected, _ = reference_embq(module, *(x.double() for x in (queries, text, vision)), text_mask, vision_mask)
    module = module.cuda()
    with torch.autocast("cuda", dtype=dtype):
        update = module(*(x.cuda() for x in (queries, text, vision, text_mask, vision_mask)))
    error = (update.double().cpu() - expected).abs().max().item()
    assert error <= 2**-5 * expected.abs().max().item()
