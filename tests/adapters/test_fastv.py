"""The FastV graft on tiny LLaVA (Qwen2 / Llama / Phi backbones), Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA-NeXT and InternVL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tokencompress import EmbQ
from tokencompress.adapters import FastVGraft, graft_embq, graft_fastv, pad_prompts
from tokencompress.adapters import _fastv_layers
from tokencompress.adapters._fastv_call import select_kept
from tokencompress.adapters._fastv_layers import FastVDecoderLayer
from tokencompress.adapters.prompt import INSTRUCTION_MAP_KEY

from .conftest import TINY, build_tiny_llava, make_images, make_prompt
from .tiny_internvl import build_tiny_internvl
from .tiny_llava_next import build_tiny_llava_next
from .tiny_llava_next import make_image as make_tiled_image
from .tiny_qwen2_vl import build_tiny_qwen2_vl, make_image, prompt_text
from .tiny_qwen3_vl import build_tiny_qwen3_vl

LAYER = 2  # of 4: layers 1-2 see every token, layers 3-4 the kept ones
KEEP = 0.25
NEW_TOKENS = 5
QUESTIONS = ("What is here?", "Colour?", "Is there a cat on the mat, or not?")
LLAVA = ("llava-qwen2", "llava-llama", "llava-phi")
QWEN = ("qwen2_vl", "qwen2_5_vl")


# -- helpers ------------------------------------------------------------------------------
def build(name: str) -> tuple[nn.Module, Any]:
    """A tiny float64 model in eval mode (SDPA attention) and its processor, padding on the left."""
    if name.startswith("llava-"):
        model, processor = build_tiny_llava(name.removeprefix("llava-"), "siglip")
    elif name == "llava_next":
        model, processor = build_tiny_llava_next()
    elif name == "internvl":
        model, processor = build_tiny_internvl()
    elif name == "qwen3_vl":
        model, processor = build_tiny_qwen3_vl()
    else:
        model, processor = build_tiny_qwen2_vl(name)
    processor.tokenizer.padding_side = "left"
    return model.to(torch.float64), processor


def encode(name: str, processor: Any, questions: tuple[str, ...] | list[str], first_image: int = 0) -> dict:
    """One prompt per question with one image each: prompt i gets image `first_image + i`."""
    seeds = range(first_image, first_image + len(questions))
    if name.startswith("llava-"):
        texts = [make_prompt(1, question) for question in questions]
        pictures = [make_images(1, seed=seed)[0] for seed in seeds]
    elif name in ("llava_next", "internvl"):  # AnyRes tiles / InternVL tiles: one size, one count
        texts = [f"{processor.image_token} {question}" for question in questions]
        size = (56, 112) if name == "llava_next" else (112, 112)
        pictures = [make_tiled_image(*size, seed=seed) for seed in seeds]
    else:
        texts = [prompt_text(1, question) for question in questions]
        pictures = [make_image(40, 56, seed) for seed in seeds]
    inputs = dict(processor(images=pictures, text=texts, return_tensors="pt", padding=True))
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.float64)
    return inputs


def image_mask(model: nn.Module, inputs: dict) -> torch.Tensor:
    return inputs["input_ids"] == model.config.image_token_id


def logits_of(model: nn.Module, inputs: dict, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def generate(model: nn.Module, inputs: dict, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy `generate` with the KV cache: the new tokens and each step's logits (float32)."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            return_dict_in_generate=True, output_logits=True, **kwargs,
        )
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


def greedy_without_cache(model: nn.Module, inputs: dict, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding that runs the whole sequence at every step, ranking the image tokens
    by the prompt's last token (`fastv_query_index`), as the cached prefill does."""
    inputs = dict(inputs)
    start = inputs["input_ids"].shape[1]
    grown = [key for key in ("input_ids", "attention_mask", "mm_token_type_ids", INSTRUCTION_MAP_KEY) if key in inputs]
    all_logits = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(**inputs, use_cache=False, fastv_query_index=start - 1).logits[:, -1]
            all_logits.append(logits)
            next_token = logits.index_fill(1, torch.tensor(banned), float("-inf")).argmax(dim=-1, keepdim=True)
            extra = {"input_ids": next_token, "attention_mask": torch.ones_like(next_token)}
            for key in grown:
                inputs[key] = torch.cat([inputs[key], extra.get(key, torch.zeros_like(next_token))], dim=1)
    return inputs["input_ids"][:, start:], torch.stack(all_logits, dim=1)


@contextmanager
def recorded_scores() -> Iterator[list[torch.Tensor]]:
    """The image token scores FastV's ranking layer computes within the block."""
    seen: list[torch.Tensor] = []
    original = _fastv_layers.image_token_scores

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        scores = original(*args, **kwargs)
        seen.append(scores)
        return scores

    _fastv_layers.image_token_scores = spy
    try:
        yield seen
    finally:
        _fastv_layers.image_token_scores = original


@contextmanager
def eager_language_model(model: nn.Module) -> Iterator[None]:
    language_model = model.model.language_model
    language_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        language_model.set_attn_implementation("sdpa")


def eager_scores(model: nn.Module, inputs: dict, layer: int) -> torch.Tensor:
    """What FastV ranks, read from eager attention: the last row of layer `layer`'s attention
    (1-based), averaged over heads, at the image tokens: (B, image tokens). Only the language
    model turns eager: the vision tower's features stay those of the SDPA model."""
    with eager_language_model(model):
        attentions = model(**inputs, output_attentions=True).attentions[layer - 1]
    mask = image_mask(model, inputs)
    return attentions[:, :, -1].mean(dim=1)[mask].view(mask.shape[0], -1)


def banned_tokens(processor: Any) -> list[int]:
    return [processor.tokenizer.eos_token_id]  # as generate(min_new_tokens=...) bans it


# -- the ranking ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*LLAVA, *QWEN])
def test_scores_are_the_eager_attention_of_the_last_token_while_sdpa_stays_on(name: str) -> None:
    model, processor = build(name)
    inputs = encode(name, processor, ["What is here?", "What is that?"])  # equal lengths: no padding
    with torch.no_grad():
        # Layer 1 ranks: its input, the embeddings, is the same with either attention.
        expected = eager_scores(model, inputs, layer=1)
        graft_fastv(model, layer=1, keep=KEEP)
        with recorded_scores() as seen:
            model(**inputs)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert len(seen) == 1 and seen[0].shape == expected.shape
    assert seen[0].dtype == torch.float64
    torch.testing.assert_close(seen[0], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["llava-qwen2", "llava-phi", "qwen2_vl"])
def test_scores_of_a_deeper_layer_with_left_padding_are_its_eager_attention(name: str) -> None:
    model, processor = build(name)
    inputs = encode(name, processor, QUESTIONS[:2])  # left-padded
    graft_fastv(model, layer=LAYER, keep=KEEP)
    ranking = model.model.language_model.layers[LAYER - 1]
    seen_input: dict[str, Any] = {}

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen_input.update(hidden_states=args[0], **kwargs)

    handle = ranking.base_layer.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad(), recorded_scores() as seen:
        model(**inputs)
    handle.remove()
    # The same layer's attention, eager, on the input the SDPA model gave it.
    hidden, mask = seen_input["hidden_states"], seen_input["attention_mask"]
    assert mask is not None and mask.dtype == torch.bool  # SDPA's mask, with the padding
    with torch.no_grad(), eager_language_model(model):
        additive = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill(~mask, torch.finfo(hidden.dtype).min)
        _, weights = ranking.self_attn(
            hidden_states=ranking.input_layernorm(hidden), attention_mask=additive,
            position_embeddings=seen_input["position_embeddings"],
        )
    images = image_mask(model, inputs)
    expected = weights[:, :, -1].mean(dim=1)[images].view(2, -1)
    torch.testing.assert_close(seen[0], expected, atol=1e-10, rtol=0)


def test_ties_go_to_the_lower_position_and_kept_tokens_keep_their_order() -> None:
    scores = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.3]])
    image = torch.tensor([[False, True, True, True, True, True, False]])
    kept = select_kept(scores, image, keep=3)
    # image slots 1, 2, 4 (scores 0.3, 0.3, 0.3 beat 0.2 and 0.1) are positions 2, 3, 5.
    assert kept.tolist() == [[0, 2, 3, 5, 6]]


# -- what the layers compute ---------------------------------------------------------------
def test_keeping_every_image_token_gives_the_ungrafted_logits() -> None:
    for name in ("llava-qwen2", "qwen2_vl"):
        model, processor = build(name)
        inputs = encode(name, processor, QUESTIONS[:2])
        expected = logits_of(model, inputs)
        count = int(image_mask(model, inputs)[0].sum())
        for keep in (count, 1.0):
            handle = graft_fastv(model, layer=LAYER, keep=keep)
            assert torch.equal(logits_of(model, inputs), expected), (name, keep)
            handle.remove()


def _reference_logits(model: nn.Module, inputs: dict, layer: int, keep: int) -> torch.Tensor:
    """Layers 1..`layer` on every token, then the `keep` image tokens the eager attention of
    the last token ranks best (and every other token) through the other layers, each at its
    original position: by hand, for one prompt without padding."""
    core = model.model
    language_model = core.language_model
    seen: dict[str, Any] = {}

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.update(embeddings=kwargs["inputs_embeds"], position_ids=kwargs.get("position_ids"))

    handle = language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        scores = eager_scores(model, inputs, layer)[0]
    finally:
        handle.remove()
    hidden = seen["embeddings"]
    length = hidden.shape[1]
    positions = seen["position_ids"]
    if positions is None:  # LLaVA: 0..L-1
        positions = torch.arange(length)[None]
    cos, sin = language_model.rotary_emb(hidden, positions)

    mask = image_mask(model, inputs)[0]
    image_positions = mask.nonzero()[:, 0]
    best = sorted(sorted(range(len(scores)), key=lambda i: -float(scores[i]))[:keep])
    kept = sorted([*(~mask).nonzero()[:, 0].tolist(), *image_positions[best].tolist()])

    def run(layers: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(hidden.shape[1], hidden.shape[1], dtype=torch.bool).tril()[None, None]
        for decoder_layer in layers:
            hidden = decoder_layer(hidden, attention_mask=causal, position_embeddings=(cos, sin))
        return hidden

    hidden = run(language_model.layers[:layer], hidden, cos, sin)
    hidden = run(language_model.layers[layer:], hidden[:, kept], cos[:, kept], sin[:, kept])
    final_norm = getattr(language_model, "norm", None) or language_model.final_layernorm  # Phi: final_layernorm
    return model.lm_head(final_norm(hidden))


@pytest.mark.parametrize("name", ["llava-qwen2", "llava-llama", "llava-phi", "qwen2_vl", "qwen2_5_vl"])
def test_prefill_logits_equal_layers_run_by_hand_on_the_kept_tokens(name: str) -> None:
    model, processor = build(name)
    inputs = encode(name, processor, QUESTIONS[:1])
    handle = graft_fastv(model, layer=LAYER, keep=KEEP)
    count = int(image_mask(model, inputs).sum())
    with torch.no_grad():
        logits = model(**inputs).logits
        with handle.lifted():
            expected = _reference_logits(model, inputs, LAYER, handle.num_kept(count))
    assert logits.shape[1] == inputs["input_ids"].shape[1] - count + handle.num_kept(count)
    torch.testing.assert_close(logits, expected, atol=1e-10, rtol=0)


# -- decoding and batches ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["llava-qwen2", "llava-llama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "internvl"]
)
def test_cached_generation_equals_recomputation_without_cache(name: str) -> None:
    model, processor = build(name)
    graft_fastv(model, layer=LAYER, keep=KEEP)
    inputs = encode(name, processor, QUESTIONS[:2])
    tokens, logits = generate(model, inputs)
    expected_tokens, expected_logits = greedy_without_cache(model, inputs, banned_tokens(processor))
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llava-qwen2", "qwen2_vl"])
def test_generate_without_the_cache_ranks_by_the_prompts_last_token(name: str) -> None:
    model, processor = build(name)
    graft = graft_fastv(model, layer=LAYER, keep=KEEP)
    inputs = encode(name, processor, QUESTIONS[:2])
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    cached = model.generate(**inputs, **settings)
    assert torch.equal(model.generate(**inputs, **settings, use_cache=False), cached)
    assert "generate" in vars(model)
    graft.remove()
    assert "generate" not in vars(model)


@pytest.mark.parametrize("name", ["llava-qwen2", "qwen2_vl", "qwen2_5_vl"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(name: str) -> None:
    model, processor = build(name)
    graft_fastv(model, layer=LAYER, keep=KEEP)
    batch = encode(name, processor, QUESTIONS)
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) == len(QUESTIONS)  # three lengths
    tokens, logits = generate(model, batch)
    for row, question in enumerate(QUESTIONS):
        alone_tokens, alone_logits = generate(model, encode(name, processor, [question], first_image=row))
        assert torch.equal(alone_tokens, tokens[row:row + 1]), f"prompt {row}"
        torch.testing.assert_close(alone_logits, logits[row:row + 1], atol=1e-5, rtol=1e-5)


def test_a_prompt_without_images_passes_through() -> None:
    model, processor = build("llava-qwen2")
    inputs = dict(processor.tokenizer(["USER: Tell me a story. ASSISTANT:"], return_tensors="pt"))
    expected = logits_of(model, inputs)
    graft_fastv(model, layer=LAYER, keep=KEEP)
    assert torch.equal(logits_of(model, inputs), expected)
    tokens, _ = generate(model, inputs)
    assert tokens.shape == (1, NEW_TOKENS)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(reentrant: bool) -> None:
    model, processor = build("llava-llama")
    graft_fastv(model, layer=LAYER, keep=KEEP)
    inputs = encode("llava-llama", processor, QUESTIONS[:2])
    model.train()

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        with recorded_scores() as seen:
            model(**inputs, use_cache=False).logits.square().mean().backward()
        assert len(seen) == 1  # ranked once per forward, never again in a re-run
        return [parameter.grad.clone() for parameter in model.model.language_model.parameters()]

    plain = gradients()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = gradients()
    for expected, got in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


# -- with EmbQ -------------------------------------------------------------------------------------
def _embq_model(fastv_first: bool, embq_layer: int) -> tuple[nn.Module, Any, Any, FastVGraft]:
    model, processor = build("llava-qwen2")
    tokenizer = processor.tokenizer

    def add_embq() -> Any:
        torch.manual_seed(0)
        embq = EmbQ(TINY["text_hidden"], TINY["vision_hidden"], inner_dim=16, num_heads=2)
        handle = graft_embq(model, embq, layer=embq_layer, num_queries=3, tokenizer=tokenizer)
        with torch.no_grad():
            handle.query_vectors.normal_(std=0.5)
            handle.embq.up.weight.mul_(4.0)
        return handle

    if fastv_first:
        fastv = graft_fastv(model, layer=LAYER, keep=KEEP)
        queries = add_embq()
    else:
        queries = add_embq()
        fastv = graft_fastv(model, layer=LAYER, keep=KEEP)
    return model, processor, queries, fastv


def _embq_batch(processor: Any, queries: Any) -> dict:
    conversations = [
        [{"role": "user", "content": "<image>\nWhat is in the picture?"}],
        [{"role": "user", "content": "<image>\nColour?"}],
    ]
    prompts = [queries.build_prompt(messages) for messages in conversations]
    batch = dict(pad_prompts(prompts, pad_token_id=processor.tokenizer.pad_token_id))
    pixel_values = processor.image_processor(make_images(2), return_tensors="pt")["pixel_values"]
    batch["pixel_values"] = pixel_values.to(torch.float64)
    return batch


@pytest.mark.parametrize(("fastv_first", "embq_layer"), [(False, 1), (True, 1), (True, LAYER), (True, LAYER + 1)])
def test_with_embq_cached_generation_equals_recomputation(fastv_first: bool, embq_layer: int) -> None:
    model, processor, queries, _ = _embq_model(fastv_first, embq_layer)
    batch = _embq_batch(processor, queries)
    tokens, logits = generate(model, batch)
    expected_tokens, expected_logits = greedy_without_cache(
        model, batch, [*queries.token_ids, processor.tokenizer.eos_token_id]
    )
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits.float(), atol=1e-5, rtol=1e-5)


def test_embq_on_a_pruned_layer_is_refused() -> None:
    with pytest.raises(ValueError, match=f"decoder layer {LAYER} is already wrapped"):
        _embq_model(fastv_first=False, embq_layer=LAYER)
    model, processor, queries, _ = _embq_model(fastv_first=True, embq_layer=LAYER + 2)
    with pytest.raises(ValueError, match=f"decoder layer {LAYER + 2} is now a EmbQDecoderLayer"):
        logits_of(model, _embq_batch(processor, queries))


def test_grafts_come_off_last_made_first() -> None:
    model, processor, queries, fastv = _embq_model(fastv_first=True, embq_layer=LAYER)  # EmbQ around FastV's layer
    with pytest.raises(RuntimeError, match="remove the grafts made after this one first"):
        fastv.remove()
    queries.remove()
    fastv.remove()
    inputs = encode("llava-qwen2", processor, QUESTIONS[:2])
    plain, _ = build("llava-qwen2")  # the same seeded weights, never grafted
    assert torch.equal(logits_of(model, inputs), logits_of(plain, inputs))


# -- undo and refusals ---------------------------------------------------------------------------------
def test_remove_gives_back_bit_identical_logits() -> None:
    for name in ("llava-llama", "qwen2_5_vl"):
        model, processor = build(name)
        inputs = encode(name, processor, QUESTIONS[:2])
        expected = logits_of(model, inputs)
        handle = graft_fastv(model, layer=LAYER, keep=3)
        assert isinstance(handle, FastVGraft) and handle.active
        assert logits_of(model, inputs).shape[1] < expected.shape[1]
        with handle.lifted():
            assert torch.equal(logits_of(model, inputs), expected)
        handle.remove()
        assert not any(isinstance(module, FastVDecoderLayer) for module in model.modules())
        assert torch.equal(logits_of(model, inputs), expected)
        with pytest.raises(RuntimeError, match="already removed"):
            handle.remove()


def test_a_second_graft_is_refused() -> None:
    model, _ = build("llava-qwen2")
    graft_fastv(model, layer=LAYER, keep=KEEP)
    with pytest.raises(ValueError, match="already has a FastV graft"):
        graft_fastv(model, layer=1, keep=4)


@pytest.mark.parametrize(
    ("argument", "value"),
    [("layer", 0), ("layer", 4), ("layer", -1), ("layer", True), ("layer", 2.0),
     ("keep", 0), ("keep", -3), ("keep", 0.0), ("keep", 1.5), ("keep", float("nan")), ("keep", True),
     ("keep", "half"), ("keep", None)],
)
def test_bad_layer_or_keep_is_a_value_error_naming_it(argument: str, value: Any) -> None:
    model, _ = build("llava-qwen2")
    kwargs = {"layer": LAYER, "keep": KEEP, argument: value}
    with pytest.raises(ValueError, match=rf"{argument}.*{value!r}".replace("(", r"\(").replace(")", r"\)")):
        graft_fastv(model, **kwargs)
    assert not any(isinstance(module, FastVDecoderLayer) for module in model.modules())


def test_bad_calls_are_clear_errors() -> None:
    model, processor = build("qwen2_vl")
    graft_fastv(model, layer=LAYER, keep=36)
    one = encode("qwen2_vl", processor, QUESTIONS[:1])  # 35 image tokens
    with pytest.raises(ValueError, match="keep=36 image tokens, but the prompts hold only 35"):
        logits_of(model, one)

    model, processor = build("qwen2_vl")
    graft_fastv(model, layer=LAYER, keep=KEEP)
    texts = [prompt_text(1, question) for question in QUESTIONS[:2]]
    images = [make_image(40, 56), make_image(24, 24)]  # 35 and 9 image tokens
    mixed = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    mixed["pixel_values"] = mixed["pixel_values"].to(torch.float64)
    with pytest.raises(ValueError, match=r"same number of image tokens; this batch holds \[35, 9\]"):
        logits_of(model, mixed)
    with pytest.raises(ValueError, match="needs a DynamicCache"):
        generate(model, one, cache_implementation="static")
    with pytest.raises(ValueError, match="must not be an image token"):
        logits_of(model, one, fastv_query_index=int(image_mask(model, one)[0].nonzero()[0]))
    processor.tokenizer.padding_side = "right"
    right = encode("qwen2_vl", processor, QUESTIONS[:2])
    with pytest.raises(ValueError, match="is padding"):
        logits_of(model, right)
    last = right["attention_mask"].sum(dim=1) - 1  # each prompt's last token
    assert logits_of(model, right, fastv_query_index=last).shape[1] == right["input_ids"].shape[1] - 35 + 9


def test_a_family_fastv_cannot_follow_is_refused() -> None:
    model, _ = build_tiny_qwen3_vl()
    with pytest.raises(ValueError, match="layer must be at least 2 on this model: DeepStack"):
        graft_fastv(model, layer=1, keep=KEEP)
    with pytest.raises(TypeError, match="graft_fastv supports these models"):
        graft_fastv(nn.Linear(2, 2), layer=1, keep=KEEP)


# -- docs/adapters.md ---------------------------------------------------------------------
def test_docs_example_runs() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "adapters.md").read_text(encoding="utf-8")
    section = doc.split("## FastV: pruning image tokens inside the LLM\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "no python example in the FastV section"
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(blocks), "docs/adapters.md", "exec"), namespace)
    assert namespace["fastv"].active is False  # the example ends by removing the graft
