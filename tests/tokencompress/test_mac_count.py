"""MacCounter: our own multiply-add rules, the same on meta and CPU and on every torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, LlamaConfig

from tokencompress.mac_count import MacCounter, attention_macs, convolution_macs, count_macs, matmul_macs

DEVICES = ["meta", "cpu"]


def _tensors(*shapes: tuple[int, ...], device: str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.randn(shape, device=device, dtype=dtype) for shape in shapes]


# -- attention ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "q_shape, kv_shape, v_dim, kwargs, expected",
    [
        ((2, 4, 33, 8), (2, 4, 33, 8), 8, {}, 2 * 4 * 33 * 33 * (8 + 8)),
        ((2, 4, 33, 8), (2, 4, 33, 8), 8, {"is_causal": True}, 2 * 4 * 33 * 33 * 16),  # full square
        ((1, 8, 7, 16), (1, 2, 19, 16), 16, {"enable_gqa": True}, 8 * 7 * 19 * 32),  # grouped heads
        ((3, 5, 8), (3, 11, 8), 12, {}, 3 * 5 * 11 * (8 + 12)),  # no head axis, Dv != Dqk
        ((2, 4, 6, 8), (1, 4, 9, 8), 8, {}, 2 * 4 * 6 * 9 * 16),  # broadcast batch
    ],
)
def test_attention_is_counted_once_from_its_shapes(device, q_shape, kv_shape, v_dim, kwargs, expected) -> None:
    q, k, v = _tensors(q_shape, kv_shape, (*kv_shape[:-1], v_dim), device=device)
    with MacCounter() as counter:
        F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert counter.macs == expected == attention_macs(q.shape, k.shape, v.shape)


def test_attention_with_a_mask_counts_the_full_square() -> None:
    q, k, v = _tensors((1, 2, 5, 4), (1, 2, 9, 4), (1, 2, 9, 4), device="cpu")
    mask = torch.rand(1, 1, 5, 9) > 0.5
    mask[..., 0] = True
    with MacCounter() as counter:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert counter.macs == 2 * 5 * 9 * 8


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_every_cpu_kernel_gives_the_same_count(backend) -> None:
    """The math path decomposes into bmm, the fused kernel is one op: one count for both."""
    q, k, v = _tensors((1, 4, 17, 8), (1, 4, 17, 8), (1, 4, 17, 8), device="cpu")
    with sdpa_kernel(backend), MacCounter() as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert counter.macs == 4 * 17 * 17 * 16


@pytest.mark.parametrize(
    "op, args",
    [
        ("_scaled_dot_product_flash_attention_for_cpu", ()),
        ("_scaled_dot_product_efficient_attention", (None, False)),
        ("_scaled_dot_product_flash_attention", ()),
    ],
)
def test_fused_attention_ops_called_directly_are_counted(op, args) -> None:
    q, k, v = _tensors((2, 4, 10, 8), (2, 4, 12, 8), (2, 4, 12, 8), device="meta")
    with MacCounter() as counter:
        getattr(torch.ops.aten, op)(q, k, v, *args)
    assert counter.macs == 2 * 4 * 10 * 12 * 16


# -- matrix products and convolutions ---------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_linear_matmul_einsum_match_formulas(device) -> None:
    x, w, b = _tensors((3, 5, 8), (8, 2), (3, 8, 4), device=device)
    linear = torch.nn.Linear(8, 16).to(device)
    vector = torch.randn(8, device=device)
    with MacCounter() as counter:
        linear(x)  # addmm over 15 rows
        x @ w  # mm after a reshape
        torch.einsum("bij,bjk->bik", x, b)  # bmm
        torch.baddbmm(torch.zeros(3, 5, 4, device=device), x, b)
        w.T @ vector  # mv
    expected = 15 * 8 * 16 + 15 * 8 * 2 + 2 * (3 * 5 * 8 * 4) + 2 * 8
    assert counter.macs == expected
    assert matmul_macs((3, 5, 8), (3, 8, 4)) == 3 * 5 * 8 * 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups", [1, 3])
def test_convolutions_match_formulas(device, groups) -> None:
    x = torch.randn(2, 6, 9, 7, device=device)
    conv = torch.nn.Conv2d(6, 12, kernel_size=3, stride=2, padding=1, groups=groups).to(device)
    transposed = torch.nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2, groups=groups if groups == 1 else 2).to(device)
    with MacCounter() as counter:
        out = conv(x)
    assert counter.macs == 2 * 12 * (6 // groups) * 9 * out.shape[-2] * out.shape[-1]
    assert counter.macs == convolution_macs(x.shape, conv.weight.shape, out.shape)
    with MacCounter() as counter:
        up = transposed(x)
    # Each input position meets every (input channel, output channel of its group, tap).
    assert counter.macs == 2 * 9 * 7 * transposed.weight.numel()
    assert up.shape[-2:] == (18, 14)


# -- a whole model -----------------------------------------------------------------------------
def _tiny_llama(attn_implementation: str) -> LlamaConfig:
    config = LlamaConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=120)
    config._attn_implementation = attn_implementation
    return config


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_tiny_llama_attention_matches_the_hand_formula(device, attn_implementation) -> None:
    """Grouped-query attention over the full square, q/o at full width, k/v at kv width."""
    config = _tiny_llama(attn_implementation)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).eval()
    tokens, dim, kv_dim, inner = 13, 64, 2 * 8, 80
    embeds = torch.randn(1, tokens, dim, device=device)
    _, macs = count_macs(model.base_model, inputs_embeds=embeds)
    linear = tokens * (2 * dim * dim + 2 * dim * kv_dim + 3 * dim * inner)
    attention = 2 * tokens * tokens * dim  # scores and values, 8 query heads of 8
    assert macs == 2 * (linear + attention)


def test_counting_leaves_results_unchanged() -> None:
    q, k, v = _tensors((1, 2, 6, 4), (1, 2, 6, 4), (1, 2, 6, 4), device="cpu", dtype=torch.float64)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    counted, macs = count_macs(F.scaled_dot_product_attention, q, k, v, is_causal=True)
    assert torch.equal(plain, counted) and macs == 2 * 6 * 6 * 8


def test_a_counter_is_not_reentrant() -> None:
    counter = MacCounter()
    with counter:
        with pytest.raises(RuntimeError, match="already active"):
            counter.__enter__()
    with counter:  # usable again once closed
        torch.ones(2, 3) @ torch.ones(3, 4)
    assert counter.macs == 2 * 3 * 4


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_inference_mode_counts_what_no_grad_counts(attn_implementation) -> None:
    """Under inference_mode composite ops (linear, matmul, conv2d, einsum) reach the counter
    whole; it decomposes them, so the count and the results are those of no_grad."""
    x, b = _tensors((3, 5, 8), (3, 8, 4), device="cpu")
    linear, conv = torch.nn.Linear(8, 16), torch.nn.Conv2d(3, 6, kernel_size=3, padding=1)
    image = torch.randn(2, 3, 9, 7)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_llama(attn_implementation)).eval()
    embeds = torch.randn(1, 13, 64)

    def run() -> list[torch.Tensor]:
        return [linear(x), x @ b, torch.einsum("bij,bjk->bik", x, b), conv(image),
                model.base_model(inputs_embeds=embeds).last_hidden_state]

    with torch.no_grad(), MacCounter() as plain:
        expected = run()
    with torch.inference_mode(), MacCounter() as inference:
        got = run()
    assert inference.macs == plain.macs > 0
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, rtol=0, atol=0)
