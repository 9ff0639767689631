"""The EmbQ graft on the 6 tiny LLaVA models (Phi/Qwen2/Llama x SigLIP/CLIP)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from tokencompress import AvgPool, EmbQ
from tokencompress.adapters import EmbQGraft, graft_compressor, graft_embq, load_embq_graft, pad_prompts
from tokencompress.adapters._embq_call import group_vision, plan_query_blocks
from tokencompress.adapters._embq_layers import EmbQDecoderLayer, QueryEmbedding
from tokencompress.adapters._wrap import WrappedSubmodule
from tokencompress.adapters.embq_io import EMBQ_CONFIG_NAME, EMBQ_WEIGHTS_NAME
from tokencompress.adapters.prompt import INSTRUCTION_MAP_KEY, EncodedPrompt

from .conftest import TINY, TinyLlava, build_tiny_llava, make_images, make_inputs

LAYER = 2  # of 4: EmbQ reads the hidden states after the first decoder layer
NUM_QUERIES = 3
NEW_TOKENS = 6

ONE_TURN = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
SHORT = [{"role": "user", "content": "<image>\nColour?"}]
TWO_TURNS = [
    {"role": "user", "content": "<image>\nWhat is it?"},
    {"role": "assistant", "content": "A box."},
    {"role": "user", "content": "How big is it?"},
]
TWO_IMAGES = [{"role": "user", "content": "<image><image>\nAre these the same?"}]
TEXT_ONLY = [{"role": "user", "content": "Tell me a story."}]


# -- helpers ----------------------------------------------------------------------------
def make_embq() -> EmbQ:
    return EmbQ(TINY["text_hidden"], TINY["vision_hidden"], inner_dim=16, num_heads=2)


def graft(tiny: TinyLlava, dtype: torch.dtype = torch.float32, seed: int = 0) -> EmbQGraft:
    """The tiny model (in `dtype`) with an EmbQ graft whose weights make a visible difference."""
    tiny.model.to(dtype)
    torch.manual_seed(seed)
    handle = graft_embq(
        tiny.model, make_embq(), layer=LAYER, num_queries=NUM_QUERIES, tokenizer=tiny.processor.tokenizer
    )
    with torch.no_grad():
        handle.query_vectors.normal_(std=0.5)
        handle.embq.up.weight.mul_(4.0)
    return handle


def encode(tiny: TinyLlava, handle: EmbQGraft, conversations: Sequence[list[dict]], dtype: torch.dtype):
    """Prompts, the padded batch (left padding) and the pixel values of their images."""
    prompts = [handle.build_prompt(messages) for messages in conversations]
    batch = pad_prompts(prompts, pad_token_id=handle.tokenizer.pad_token_id, labels=True)
    images = make_images(sum(prompt.num_images for prompt in prompts))
    pixel_values = tiny.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    batch["pixel_values"] = pixel_values.to(dtype)
    return prompts, batch


def build(text_model: str, vision_model: str, **overrides: Any) -> TinyLlava:
    return TinyLlava(*build_tiny_llava(text_model, vision_model, **overrides), text_model, vision_model)


@pytest.fixture
def tiny(tiny_llava: TinyLlava) -> TinyLlava:
    return tiny_llava


def inputs_of(batch: dict[str, torch.Tensor], *drop: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in batch.items() if key not in ("labels", *drop)}


def greedy_without_cache(model, batch, handle: EmbQGraft, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding that recomputes the whole sequence at every step (EmbQ each time).

    Returns the new tokens (B, steps) and the logits of each step (B, steps, vocab).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    instruction_map = batch[INSTRUCTION_MAP_KEY]
    banned = list(handle.token_ids) + [handle.tokenizer.eos_token_id]  # as generate(min_new_tokens=steps)
    all_logits = []
    for _ in range(steps):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=batch["pixel_values"],
            embq_instruction_map=instruction_map,
            use_cache=False,
        ).logits[:, -1]
        all_logits.append(logits)
        next_token = logits.index_fill(1, torch.tensor(banned), float("-inf")).argmax(dim=-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
        instruction_map = torch.cat([instruction_map, torch.zeros_like(next_token)], dim=1)
    return input_ids[:, batch["input_ids"].shape[1]:], torch.stack(all_logits, dim=1)


def generate(model, batch, steps: int = NEW_TOKENS, **kwargs: Any) -> torch.Tensor:
    """Greedy `generate` with the KV cache: the new tokens (B, steps)."""
    return generate_with_logits(model, batch, steps, **kwargs)[0]


def generate_with_logits(
    model, batch, steps: int = NEW_TOKENS, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy `generate` with the KV cache: the new tokens and each step's logits."""
    out = model.generate(
        **inputs_of(batch), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        return_dict_in_generate=True, output_logits=True, **kwargs,
    )
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


@contextmanager
def skipped_embq(handle: EmbQGraft) -> Iterator[None]:
    """Within the block the grafted layer leaves the hidden states as they are."""
    layer = handle.model.model.language_model.layers[LAYER - 1]
    layer.add_update = lambda hidden_states, call: hidden_states
    try:
        yield
    finally:
        del layer.add_update


class LayerSpy:
    """Records the grafted layer's input and the input its base layer gets (after EmbQ)."""

    def __init__(self, model) -> None:
        self.wrapper = model.model.language_model.layers[LAYER - 1]
        assert isinstance(self.wrapper, EmbQDecoderLayer)
        self.records: dict[str, torch.Tensor] = {}
        self.handles = [
            self.wrapper.register_forward_pre_hook(self._record("input")),
            self.wrapper.base_layer.register_forward_pre_hook(self._record("updated")),
            # What the projector gets: the raw, selected vision features, as transformers computes them.
            model.model.multi_modal_projector.register_forward_pre_hook(self._record("raw_vision")),
        ]

    def _record(self, name: str):
        def hook(module, args):
            self.records[name] = args[0].detach().clone()

        return hook

    def updates(self, prompts: Sequence[EncodedPrompt], width: int) -> list[list[torch.Tensor]]:
        """Per prompt, per block: updated - input at the block's query positions."""
        delta = self.records["updated"] - self.records["input"]
        return [
            [delta[row, [p + width - len(prompt) for p in block.query_positions]] for block in prompt.blocks]
            for row, prompt in enumerate(prompts)
        ]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


# -- generation ---------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cached_generate_matches_recompute_without_cache(tiny: TinyLlava, attention: str) -> None:
    tiny.model.set_attn_implementation(attention)
    handle = graft(tiny, torch.float64)
    for conversation in (ONE_TURN, TWO_TURNS):
        _, batch = encode(tiny, handle, [conversation], torch.float64)
        with torch.no_grad():
            expected_tokens, expected_logits = greedy_without_cache(tiny.model, batch, handle, NEW_TOKENS)
            tokens, logits = generate_with_logits(tiny.model, batch)
            # EmbQ moves these tiny models' logits by ~1e-2, rarely enough to change a token,
            # so compare the logits too (generate returns them in float32).
            assert torch.equal(tokens, expected_tokens)
            torch.testing.assert_close(logits, expected_logits.float(), atol=1e-6, rtol=1e-6)
            with skipped_embq(handle):
                _, without_embq = generate_with_logits(tiny.model, batch, steps=1)
            assert (without_embq[:, 0] - expected_logits[:, 0].float()).abs().max() > 1e-4


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny: TinyLlava) -> None:
    handle = graft(tiny, torch.float64)
    conversations = [ONE_TURN, SHORT, TWO_TURNS, TWO_IMAGES]
    _, batch = encode(tiny, handle, conversations, torch.float64)
    assert len({int(n) for n in batch["attention_mask"].sum(1)}) == 4  # four lengths: real padding
    first_image = 0
    with torch.no_grad():
        tokens, logits = generate_with_logits(tiny.model, batch)
        for row, conversation in enumerate(conversations):
            _, alone = encode(tiny, handle, [conversation], torch.float64)
            count = alone["pixel_values"].shape[0]  # this prompt's own pictures, as in the batch
            alone["pixel_values"] = batch["pixel_values"][first_image:first_image + count]
            first_image += count
            alone_tokens, alone_logits = generate_with_logits(tiny.model, alone)
            assert torch.equal(alone_tokens, tokens[row:row + 1]), f"prompt {row}"
            torch.testing.assert_close(alone_logits, logits[row:row + 1], atol=1e-6, rtol=1e-6)


def test_embq_changes_only_the_query_tokens_and_what_follows(tiny: TinyLlava) -> None:
    handle = graft(tiny)
    prompts, batch = encode(tiny, handle, [TWO_TURNS], torch.float32)
    with torch.no_grad():
        grafted = tiny.model(**inputs_of(batch)).logits
        with handle.lifted():  # the same tokens through the ungrafted model
            lifted = tiny.model(**inputs_of(batch, INSTRUCTION_MAP_KEY)).logits
    first_query = prompts[0].blocks[0].query_positions.start
    assert torch.equal(grafted[:, :first_query], lifted[:, :first_query])  # causal: nothing leaks back
    assert not torch.allclose(grafted[:, first_query:], lifted[:, first_query:], atol=1e-3)


def test_beam_search_reads_each_prompts_own_images() -> None:
    # generate() encodes the images once, then repeats each prompt for the beams: every
    # repeated row must still read its own prompt's images.
    tiny = build("llama", "clip")
    handle = graft(tiny, torch.float64)
    conversations = [TWO_IMAGES, TWO_TURNS]
    _, batch = encode(tiny, handle, conversations, torch.float64)
    spy = LayerSpy(tiny.model)
    read: dict[str, torch.Tensor] = {}
    forward_packed = handle.embq.forward_packed

    def spy_packed(queries, text, vision, cu_queries, cu_text, cu_vision, vision_index=None):
        read.update(vision=vision, cu_vision=cu_vision)
        return forward_packed(queries, text, vision, cu_queries, cu_text, cu_vision, vision_index=vision_index)

    handle.embq.forward_packed = spy_packed
    try:
        with torch.no_grad():
            together = generate(tiny.model, batch, num_beams=2, num_return_sequences=2)
    finally:
        del handle.embq.forward_packed
        spy.close()
    raw = spy.records["raw_vision"]  # encoded once: 3 images, before the beams' expansion
    assert raw.shape[0] == 3
    own_images = [raw[:2], raw[:2], raw[2:], raw[2:]]  # rows: prompt 0 twice, prompt 1 twice
    bounds = read["cu_vision"].tolist()
    for row, images in enumerate(own_images):
        assert torch.equal(read["vision"][bounds[row]:bounds[row + 1]], images.flatten(0, 1)), f"row {row}"
    with torch.no_grad():
        assert together.shape == (4, NEW_TOKENS)
        for row, conversation in enumerate(conversations):
            _, alone = encode(tiny, handle, [conversation], torch.float64)
            alone["pixel_values"] = batch["pixel_values"][:2] if row == 0 else batch["pixel_values"][2:]
            expected = generate(tiny.model, alone, num_beams=2, num_return_sequences=2)
            assert torch.equal(together[2 * row:2 * row + 2], expected), f"prompt {row}"


def test_output_hidden_states_and_an_llava_model_root() -> None:
    tiny = build("qwen2", "siglip")
    handle = graft(tiny)
    _, batch = encode(tiny, handle, [TWO_TURNS], torch.float32)
    with torch.no_grad():
        out = tiny.model(**inputs_of(batch), output_hidden_states=True)
        assert len(out.hidden_states) == TINY["text_layers"] + 1
        handle.remove()
        # The same graft on the bare LlavaModel (no LM head, no generate).
        core = tiny.model.model
        handle = graft_embq(
            core, make_embq(), layer=LAYER, num_queries=NUM_QUERIES, tokenizer=tiny.processor.tokenizer
        )
        hidden = core(**inputs_of(batch)).last_hidden_state
    assert hidden.shape[:2] == batch["input_ids"].shape
    handle.remove()
    assert type(core.get_input_embeddings()) is torch.nn.Embedding


# -- what EmbQ computes ---------------------------------------------------------------------
def test_update_equals_a_direct_call_of_embq(tiny: TinyLlava) -> None:
    handle = graft(tiny)
    # Two blocks and one image; one block and two images; one block and no image (EmbQ then
    # reads no vision: its update is what EmbQ gives for an empty vision input).
    conversations = [TWO_TURNS, TWO_IMAGES, TEXT_ONLY]
    prompts, batch = encode(tiny, handle, conversations, torch.float32)
    width = batch["input_ids"].shape[1]
    spy = LayerSpy(tiny.model)
    with torch.no_grad():
        tiny.model(**inputs_of(batch))
        spy.close()
        hidden, raw = spy.records["input"], spy.records["raw_vision"]
        images_of_row = [raw[:1], raw[1:3], raw[3:]]
        assert raw.shape[0] == 3
        touched = torch.zeros(hidden.shape[:2], dtype=torch.bool)
        for row, (prompt, updates) in enumerate(zip(prompts, spy.updates(prompts, width))):
            offset = width - len(prompt)
            for block, update in zip(prompt.blocks, updates):
                queries = [p + offset for p in block.query_positions]
                text = [p + offset for p in block.instruction_positions]
                expected = handle.embq(
                    hidden[row, queries][None], hidden[row, text][None], images_of_row[row].flatten(0, 1)[None]
                )[0]
                torch.testing.assert_close(update, expected, atol=1e-5, rtol=1e-5)
                touched[row, queries] = True
        # Every other hidden state goes into the layer unchanged.
        assert torch.equal(spy.records["updated"][~touched], hidden[~touched])


def test_blocks_read_their_own_turn(tiny: TinyLlava) -> None:
    handle = graft(tiny)
    other_second_turn = TWO_TURNS[:2] + [{"role": "user", "content": "Is it heavy or light?"}]
    other_first_turn = [{"role": "user", "content": "<image>\nWho made it?"}] + TWO_TURNS[1:]

    def block_updates(conversation):
        prompts, batch = encode(tiny, handle, [conversation], torch.float32)
        spy = LayerSpy(tiny.model)
        with torch.no_grad():
            tiny.model(**inputs_of(batch))
        spy.close()
        return spy.updates(prompts, batch["input_ids"].shape[1])[0]

    base = block_updates(TWO_TURNS)
    second_changed = block_updates(other_second_turn)
    first_changed = block_updates(other_first_turn)
    assert len(base) == 2
    # Block 1 comes before turn 2: a new turn-2 instruction leaves its update as it was,
    # and changes block 2's.
    torch.testing.assert_close(second_changed[0], base[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(second_changed[1], base[1], atol=1e-4)
    # A new turn-1 instruction changes block 1's update.
    assert not torch.allclose(first_changed[0], base[0], atol=1e-4)


@pytest.mark.parametrize("order", ["embq_first", "compressor_first"])
def test_embq_reads_the_features_before_a_compressor(order: str, tmp_path) -> None:
    tiny = build("phi", "clip")  # CLIP: the CLS token is dropped first
    model, processor = tiny.model, tiny.processor
    if order == "compressor_first":
        compressor = graft_compressor(model, AvgPool(2), processor=processor)
        handle = graft(tiny)
    else:
        handle = graft(tiny)
        compressor = graft_compressor(model, AvgPool(2), processor=processor)
    prompts, batch = encode(tiny, handle, [TWO_IMAGES], torch.float32)
    assert batch["input_ids"].eq(model.config.image_token_id).sum() == 2 * 16  # compressed 8x8 -> 4x4
    seen: dict[str, torch.Tensor] = {}
    wrapper = model.model.multi_modal_projector  # the compressor graft's wrapper
    hook = wrapper.register_forward_pre_hook(lambda module, args: seen.__setitem__("compressor_input", args[0]))
    forward_packed = handle.embq.forward_packed

    def spy(*args, **kwargs):
        seen["embq_vision"] = args[2]
        return forward_packed(*args, **kwargs)

    handle.embq.forward_packed = spy
    try:
        with torch.no_grad():
            model(**inputs_of(batch))
            generate(model, batch, steps=2)
    finally:
        del handle.embq.forward_packed
        hook.remove()
    assert seen["embq_vision"].shape == (2 * 64, TINY["vision_hidden"])  # uncompressed: 64 per image
    assert torch.equal(seen["embq_vision"], seen["compressor_input"].flatten(0, 1))
    with pytest.raises(RuntimeError, match="other grafts .*multi_modal_projector"):
        handle.save_pretrained(tmp_path, save_base_model=True)  # would write the compressor's wrapper
    grafts = [compressor, handle] if order == "embq_first" else [handle, compressor]
    for last_made in reversed(grafts):
        last_made.remove()


# -- training ---------------------------------------------------------------------------------
def _gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradients_agree_with_and_without_checkpointing(tiny: TinyLlava, reentrant: bool) -> None:
    handle = graft(tiny)
    messages = TWO_TURNS + [{"role": "assistant", "content": "Small."}]
    other = ONE_TURN + [{"role": "assistant", "content": "Nothing."}]
    _, batch = encode(tiny, handle, [messages, other], torch.float32)
    model = tiny.model.train()
    calls = []
    forward_packed = handle.embq.forward_packed
    handle.embq.forward_packed = lambda *a, **k: calls.append(1) or forward_packed(*a, **k)
    try:
        plain = _gradients(model, batch)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        checkpointed = _gradients(model, batch)
    finally:
        del handle.embq.forward_packed
    assert calls == [1, 1]  # EmbQ runs once per forward, never again in a re-run
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(name.endswith("query_vectors") for name in plain)
    grafted = [name for name in plain if ".embq." in name or name.endswith("query_vectors")]
    assert all(plain[name].abs().sum() > 0 for name in grafted)


def test_query_tokens_never_count_in_the_loss(tiny: TinyLlava) -> None:
    handle = graft(tiny)
    _, batch = encode(tiny, handle, [TWO_TURNS], torch.float32)
    ids = batch["input_ids"]
    masked = ids.masked_fill(torch.isin(ids, torch.tensor(handle.token_ids)), -100)
    with torch.no_grad():
        naive = tiny.model(**inputs_of(batch), labels=ids).loss
        explicit = tiny.model(**inputs_of(batch), labels=masked).loss
    assert torch.equal(naive, explicit)


# -- undo, save, load ---------------------------------------------------------------------------
def _hook_counts(module) -> list[int]:
    return [len(module._forward_pre_hooks), len(module._forward_hooks)]


def test_remove_restores_bit_identical_logits(tiny: TinyLlava) -> None:
    model = tiny.model
    plain = make_inputs(tiny.processor, n_images=1)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        before = model(**plain).logits
    # After a first call: transformers installs its output-capturing hooks lazily.
    hooks = {name: _hook_counts(module) for name, module in model.named_modules()}
    rows = model.config.text_config.vocab_size
    handle = graft(tiny)
    assert model.get_input_embeddings().weight.shape[0] == rows + NUM_QUERIES  # grown for the queries
    _, batch = encode(tiny, handle, [TWO_TURNS], torch.float32)
    with torch.no_grad():
        model(**inputs_of(batch))
        generate(model, batch, steps=2)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**plain).logits, before)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert {name: _hook_counts(module) for name, module in model.named_modules()} == hooks
    assert model.config.text_config.vocab_size == rows
    assert "prepare_inputs_for_generation" not in model.__dict__ and "vocab_size" not in model.__dict__
    assert model.generation_config.suppress_tokens is None
    assert not any(isinstance(m, (EmbQDecoderLayer, QueryEmbedding)) for m in model.modules())
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()


def test_remove_keeps_tied_embeddings_tied() -> None:
    model, processor = build_tiny_llava("qwen2", "siglip", text_tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    handle = graft_embq(model, make_embq(), layer=LAYER, num_queries=NUM_QUERIES, tokenizer=processor.tokenizer)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # through the wrapper
    handle.remove()
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_free_embedding_rows_are_used_without_resizing() -> None:
    model, processor = build_tiny_llava("qwen2", "siglip", text_vocab_size=300)
    handle = graft_embq(model, make_embq(), layer=LAYER, num_queries=NUM_QUERIES, tokenizer=processor.tokenizer)
    assert max(handle.token_ids) < 300 and model.get_input_embeddings().weight.shape[0] == 300
    handle.remove()
    assert model.get_input_embeddings().weight.shape[0] == 300


def test_save_and_load_round_trip(tiny: TinyLlava, tmp_path) -> None:
    handle = graft(tiny)
    _, batch = encode(tiny, handle, [TWO_TURNS, TWO_IMAGES], torch.float32)
    with torch.no_grad():
        expected = tiny.model(**inputs_of(batch)).logits
    handle.save_pretrained(tmp_path, save_base_model=True)

    record = json.loads((tmp_path / EMBQ_CONFIG_NAME).read_text())
    assert record["layer"] == LAYER and record["query_token_ids"] == list(handle.token_ids)
    assert (tmp_path / EMBQ_WEIGHTS_NAME).is_file()
    model, info = LlavaForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))  # a plain LLaVA
    assert model.generation_config.suppress_tokens is None  # the graft's setting stayed out of the files
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = load_embq_graft(model.eval(), tmp_path, tokenizer=tokenizer)
    assert reloaded.token_ids == handle.token_ids and reloaded.layer == LAYER
    with torch.no_grad():
        assert torch.equal(model(**inputs_of(batch)).logits, expected)


def test_loading_with_a_tokenizer_that_gives_other_ids_fails_cleanly(tiny: TinyLlava, tmp_path) -> None:
    handle = graft(tiny)
    handle.save_pretrained(tmp_path, save_base_model=True)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.add_tokens(["<other>"], special_tokens=True)
    tokenizer.add_tokens(["<query_9>"], special_tokens=True)
    record = json.loads((tmp_path / EMBQ_CONFIG_NAME).read_text())
    record["query_tokens"][0] = "<query_9>"  # as if the graft had been saved with this token
    (tmp_path / EMBQ_CONFIG_NAME).write_text(json.dumps(record))
    names = [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match="load the tokenizer saved with the graft"):
        load_embq_graft(model, tmp_path, tokenizer=tokenizer)
    assert [name for name, _ in model.named_modules()] == names  # the failed graft was removed


# -- the per-call plan, on hand-made tensors -------------------------------------------------
Q = torch.tensor([90, 91])  # two query token ids


@pytest.mark.parametrize(
    "ids, instruction_map, message",
    [
        ([[1, 2, 90, 91, 3]], [[1, 1, 0, 0, 0]], None),
        ([[1, 2, 91, 90, 3]], [[1, 1, 0, 0, 0]], "incomplete query block"),  # wrong order
        ([[1, 90, 2, 91, 3]], [[1, 0, 0, 0, 0]], "incomplete query block"),  # not together
        ([[1, 2, 90, 91, 90]], [[1, 1, 0, 0, 0]], "incomplete query block"),  # cut in half
        ([[1, 2, 90, 91, 3]], [[1, 2, 0, 0, 0]], "names block 2 in batch row 0"),
        ([[1, 2, 90, 91, 3]], [[0, 0, 0, 0, 1]], "after a query block"),
        ([[1, 2, 90, 91, 3]], [[0, 0, 0, 0, 0]], "has no instruction tokens"),
        ([[1, 2, 90, 91, 3]], [[1, 1, 1, 0, 0]], "0 on query tokens"),
        ([[1, 2, 3, 4, 5]], [[1, 1, 0, 0, 0]], "holds no query block"),
    ],
)
def test_plan_query_blocks_checks(ids, instruction_map, message) -> None:
    ids, instruction_map = torch.tensor(ids), torch.tensor(instruction_map)
    if message is None:
        plan = plan_query_blocks(ids, instruction_map, Q)
        assert plan.query_positions.tolist() == [[2, 3]] and plan.text_positions.tolist() == [0, 1]
    else:
        with pytest.raises(ValueError, match=message):
            plan_query_blocks(ids, instruction_map, Q)


def test_plan_groups_instructions_by_block_across_rows() -> None:
    ids = torch.tensor([[0, 5, 90, 91, 6, 7, 90, 91], [0, 0, 0, 0, 8, 9, 90, 91]])
    instruction_map = torch.tensor([[0, 1, 0, 0, 2, 2, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]])
    attention_mask = torch.tensor([[1] * 8, [0, 0, 0, 0, 1, 1, 1, 1]])
    plan = plan_query_blocks(ids, instruction_map, Q, attention_mask)
    assert plan.query_rows[:, 0].tolist() == [0, 0, 1]
    assert plan.cu_seqlens_text.tolist() == [0, 1, 3, 5]
    text = list(zip(plan.text_rows.tolist(), plan.text_positions.tolist()))
    assert text == [(0, 1), (0, 4), (0, 5), (1, 4), (1, 5)]
    on_padding = instruction_map.clone()
    on_padding[1, 3] = 1  # a left-padding position of row 1
    with pytest.raises(ValueError, match="marks padding tokens"):
        plan_query_blocks(ids, on_padding, Q, attention_mask)


def test_group_vision_per_row_and_for_repeated_rows() -> None:
    image = 7
    ids = torch.tensor([[image, image, 1], [1, 1, 1], [image, 1, 1]])  # 1 placeholder per image here
    raw = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4)  # 3 images of 2 tokens, width 4
    vision, cu = group_vision(ids, image, raw, 3, 4, torch.float32)
    assert cu.tolist() == [0, 4, 4, 6] and vision[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    # Each row repeated twice (beams) after the 2 images of the 2 rows were encoded once.
    ids = torch.tensor([[image, 1], [image, 1], [image, image], [image, image]])
    raw = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4)
    vision, cu = group_vision(ids, image, raw, 6, 4, torch.float32)
    assert cu.tolist() == [0, 2, 4, 8, 12]
    assert vision[:, 0].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="not a whole number of images per row"):
        group_vision(torch.tensor([[image, 1], [image, image]]), image, raw[:2], 2, 4, torch.float32)


# -- misuse ---------------------------------------------------------------------------------------
def test_runtime_errors() -> None:
    tiny = build("phi", "siglip")
    model = tiny.model
    handle = graft(tiny)
    prompts, batch = encode(tiny, handle, [TWO_TURNS], torch.float32)
    cut = prompts[0].blocks[1].query_positions.start + 1
    with torch.no_grad():
        truncated = {k: v[:, :cut] if v.dim() == 2 else v for k, v in inputs_of(batch).items()}
        with pytest.raises(ValueError, match="incomplete query block"):
            model(**truncated)
        with pytest.raises(ValueError, match="no embq_instruction_map came with the call"):
            model(**inputs_of(batch, INSTRUCTION_MAP_KEY))
        with pytest.raises(ValueError, match="no embq_instruction_map came with the call"):
            model.generate(**inputs_of(batch, INSTRUCTION_MAP_KEY), max_new_tokens=1)
        misaligned = dict(inputs_of(batch), embq_instruction_map=batch[INSTRUCTION_MAP_KEY][:, 1:])
        with pytest.raises(ValueError, match="must be aligned"):
            model(**misaligned)
        shifted = dict(inputs_of(batch), embq_instruction_map=batch[INSTRUCTION_MAP_KEY].roll(40, dims=1))
        with pytest.raises(ValueError, match="after a query block|0 on query tokens"):
            model(**shifted)
        no_pixels = inputs_of(batch, "pixel_values")
        with pytest.raises(ValueError):  # placeholders without images: transformers or EmbQ says so
            model(**no_pixels)


def test_a_graft_that_fails_halfway_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = build_tiny_llava("phi", "siglip")
    names = [name for name, _ in model.named_modules()]
    rows = model.get_input_embeddings().weight.shape[0]
    install = WrappedSubmodule.install
    calls = []

    def failing_install(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the decoder layer, after the embedding was grown and wrapped
            raise RuntimeError("boom")
        return install(*args, **kwargs)

    monkeypatch.setattr(WrappedSubmodule, "install", failing_install)
    with pytest.raises(RuntimeError, match="boom"):
        graft_embq(model, make_embq(), layer=LAYER, num_queries=NUM_QUERIES, tokenizer=processor.tokenizer)
    assert [name for name, _ in model.named_modules()] == names
    assert model.get_input_embeddings().weight.shape[0] == rows and model.config.text_config.vocab_size == rows
    assert model.generation_config.suppress_tokens is None
    assert "prepare_inputs_for_generation" not in model.__dict__


def test_graft_checks_its_arguments() -> None:
    model, processor = build_tiny_llava("qwen2", "clip")
    tokenizer = processor.tokenizer
    with pytest.raises(ValueError, match="layer must be a 1-based"):
        graft_embq(model, make_embq(), layer=0, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="layer must be a 1-based"):
        graft_embq(model, make_embq(), layer=TINY["text_layers"] + 1, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="embq.vision_dim is 48"):
        wrong_width = EmbQ(TINY["text_hidden"], 48, inner_dim=16, num_heads=2)
        graft_embq(model, wrong_width, layer=1, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        graft_embq(model.model.language_model, make_embq(), layer=1, tokenizer=tokenizer)
    handle = graft_embq(model, make_embq(), layer=TINY["text_layers"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="already has an EmbQ graft"):
        graft_embq(model, make_embq(), layer=1, tokenizer=tokenizer)
    assert handle.num_queries == 9 and handle.query_tokens[0] == "<query_0>"
    assert tokenizer.decode([handle.dot_token_id]) == "."
    handle.remove()
