"""Prompts with EmbQ query blocks: spans come from the token ids that are returned."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from tokencompress.adapters.prompt import (
    INSTRUCTION_MAP_KEY,
    VICUNA_V1_SYSTEM,
    Image,
    Instruction,
    QuerySlot,
    Reply,
    Text,
    build_prompt,
    chat_template,
    pad_prompts,
    vicuna_v1,
)

from .conftest import IMAGE_TOKEN, build_tiny_tokenizer

NUM_QUERIES = 3
NUM_IMAGE_TOKENS = 5
QUERY_TOKENS = [f"<query_{i}>" for i in range(NUM_QUERIES)]
CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(QUERY_TOKENS, special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def ids(tokenizer):
    return {
        "queries": tokenizer.convert_tokens_to_ids(QUERY_TOKENS),
        "image": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    }


def encode(messages, tokenizer, ids, **kwargs):
    kwargs.setdefault("image_token_id", ids["image"])
    kwargs.setdefault("num_image_tokens", NUM_IMAGE_TOKENS)
    return build_prompt(messages, tokenizer, query_token_ids=ids["queries"], **kwargs)


def decode(tokenizer, token_ids):
    return tokenizer.decode(list(token_ids))


CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat is in the picture?"},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "Which colour is it?"},
]


def test_vicuna_prompt_text_and_spans(tokenizer, ids):
    prompt = encode(CONVERSATION, tokenizer, ids)
    blocks = "".join(QUERY_TOKENS)
    expected = (
        f"{VICUNA_V1_SYSTEM} USER: {IMAGE_TOKEN * NUM_IMAGE_TOKENS}\nWhat is in the picture?{blocks} "
        f"ASSISTANT: A cat.</s>USER: Which colour is it?{blocks} ASSISTANT:"
    )
    assert decode(tokenizer, prompt.input_ids) == expected
    assert len(prompt.blocks) == 2 and prompt.num_images == 1
    # Each block reads exactly the user's words of its turn: no image placeholder, no
    # template text, no reply.
    assert decode(tokenizer, (prompt.input_ids[i] for i in prompt.blocks[0].instruction_positions)) == (
        "\nWhat is in the picture?"
    )
    assert decode(tokenizer, (prompt.input_ids[i] for i in prompt.blocks[1].instruction_positions)) == (
        "Which colour is it?"
    )
    for block in prompt.blocks:
        assert [prompt.input_ids[i] for i in block.query_positions] == ids["queries"]
        assert max(block.instruction_positions) < block.query_positions.start
    assert prompt.input_ids.count(ids["image"]) == NUM_IMAGE_TOKENS


def test_labels_are_the_replies_only(tokenizer, ids):
    messages = CONVERSATION + [{"role": "assistant", "content": "Black."}]
    prompt = encode(messages, tokenizer, ids)
    assert not decode(tokenizer, prompt.input_ids).endswith("ASSISTANT:")  # no generation prompt
    targets = [t for t in prompt.labels if t != -100]
    assert decode(tokenizer, targets) == " A cat.</s> Black.</s>"
    for block in prompt.blocks:  # query tokens carry no loss
        assert all(prompt.labels[i] == -100 for i in block.query_positions)


def test_image_inside_the_instruction_is_not_instruction(tokenizer, ids):
    prompt = encode([{"role": "user", "content": "Compare <image> with <image> please"}], tokenizer, ids)
    instruction = prompt.blocks[0].instruction_positions
    assert decode(tokenizer, (prompt.input_ids[i] for i in instruction)) == "Compare  with  please"
    assert all(prompt.input_ids[i] != ids["image"] for i in instruction)
    assert prompt.num_images == 2


def test_typed_content_parts(tokenizer, ids):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = encode(messages, tokenizer, ids)
    assert prompt.num_images == 1
    instruction = prompt.blocks[0].instruction_positions
    assert decode(tokenizer, (prompt.input_ids[i] for i in instruction)) == "Describe it."


def test_chat_template(tokenizer, ids):
    template = chat_template(tokenizer, chat_template=CHATML)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "And its name?"},
    ]
    prompt = encode(messages, tokenizer, ids, template=template)
    blocks = "".join(QUERY_TOKENS)
    assert decode(tokenizer, prompt.input_ids) == (
        f"<|system|>\nBe brief.</s>\n<|user|>\n{IMAGE_TOKEN * NUM_IMAGE_TOKENS}\nWhat is it?{blocks}</s>\n"
        f"<|assistant|>\nA dog.</s>\n<|user|>\nAnd its name?{blocks}</s>\n<|assistant|>\n"
    )
    spans = [decode(tokenizer, (prompt.input_ids[i] for i in b.instruction_positions)) for b in prompt.blocks]
    assert spans == ["What is it?", "And its name?"]
    # The reply and the end of its turn (the tokenizer's eos here) are the targets: the
    # model learns to stop where the template closes the turn.
    targets = [t for t in prompt.labels if t != -100]
    assert decode(tokenizer, targets) == "A dog.</s>" and targets[-1] == tokenizer.eos_token_id


def test_chat_template_end_of_turn_is_configurable(tokenizer, ids):
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]

    def targets(**kwargs):
        prompt = encode(messages, tokenizer, ids, template=chat_template(tokenizer, chat_template=CHATML, **kwargs))
        return decode(tokenizer, [t for t in prompt.labels if t != -100]), prompt.input_ids

    trained, ids_auto = targets()
    untrained, ids_none = targets(end_of_turn=None)
    assert (trained, untrained) == ("Hello.</s>", "Hello.")
    assert ids_auto == ids_none  # the same tokens either way: only the labels differ
    # A marker the template does not write after the reply trains nothing extra.
    assert targets(end_of_turn="<|end|>")[0] == "Hello."
    with pytest.raises(ValueError, match="end_of_turn must be a non-empty string"):
        chat_template(tokenizer, end_of_turn="")


def test_chat_template_that_rewrites_content_is_refused(tokenizer, ids):
    shouting = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    template = chat_template(tokenizer, chat_template=shouting)
    with pytest.raises(ValueError, match="exactly once and in order"):
        encode([{"role": "user", "content": "hi"}], tokenizer, ids, template=template)


def test_custom_template_function(tokenizer, ids):
    def template(messages, add_generation_prompt):
        pieces = []
        for message in messages:
            pieces += [Text("Q: "), Image(), Instruction(message["content"]), QuerySlot(), Text("\n")]
        return pieces + [Text("A:"), Reply(" yes")]

    prompt = encode([{"role": "user", "content": "Red?"}], tokenizer, ids, template=template)
    assert decode(tokenizer, (prompt.input_ids[i] for i in prompt.blocks[0].instruction_positions)) == "Red?"
    assert decode(tokenizer, [t for t in prompt.labels if t != -100]) == " yes"


def test_truncation_through_an_image_or_a_block_raises(tokenizer, ids):
    full = encode(CONVERSATION, tokenizer, ids)
    image_start = full.input_ids.index(ids["image"])
    with pytest.raises(ValueError, match=r"cuts image 1 .*2 of its 5 placeholders"):
        encode(CONVERSATION, tokenizer, ids, max_length=image_start + 2)
    second = full.blocks[1].query_positions
    with pytest.raises(ValueError, match="cuts query block 2 .* in half"):
        encode(CONVERSATION, tokenizer, ids, max_length=second.start + 1)


def test_truncation_between_turns_drops_the_later_block(tokenizer, ids):
    full = encode(CONVERSATION, tokenizer, ids)
    cut = full.blocks[1].query_positions.start  # keeps turn 2's instruction, not its block
    prompt = encode(CONVERSATION, tokenizer, ids, max_length=cut)
    assert prompt.input_ids == full.input_ids[:cut] and len(prompt.blocks) == 1
    first = full.blocks[0].instruction_positions
    assert prompt.instruction_map() == [1 if i in first else 0 for i in range(cut)]


def test_reserved_tokens_in_text_are_refused(tokenizer, ids):
    with pytest.raises(ValueError, match="reserved token ids"):
        encode([{"role": "user", "content": f"say {QUERY_TOKENS[0]}"}], tokenizer, ids)
    with pytest.raises(ValueError, match="reserved token ids"):
        encode([{"role": "user", "content": "<image> here"}], tokenizer, ids, image_marker=None)


def test_user_turn_without_text_is_refused(tokenizer, ids):
    with pytest.raises(ValueError, match="no instruction tokens"):
        encode([{"role": "user", "content": "<image>"}], tokenizer, ids)
    with pytest.raises(ValueError, match="has no text"):
        encode([{"role": "user", "content": [{"type": "image"}]}], tokenizer, ids,
               template=chat_template(tokenizer, chat_template=CHATML))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pad_prompts_keeps_the_map_aligned(tokenizer, ids, padding_side):
    short = encode([{"role": "user", "content": "Hi?"}], tokenizer, ids)
    long = encode(CONVERSATION, tokenizer, ids)
    batch = pad_prompts(
        [short, long], pad_token_id=tokenizer.pad_token_id, padding_side=padding_side, labels=True
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels", INSTRUCTION_MAP_KEY}
    width = len(long)
    offset = width - len(short) if padding_side == "left" else 0
    row = batch[INSTRUCTION_MAP_KEY][0]
    expected = torch.zeros(width, dtype=torch.long)
    expected[[p + offset for p in short.blocks[0].instruction_positions]] = 1
    assert torch.equal(row, expected)
    assert torch.equal(batch["input_ids"][0, offset:offset + len(short)], torch.tensor(short.input_ids))
    assert int(batch["attention_mask"][0].sum()) == len(short)
    assert batch[INSTRUCTION_MAP_KEY][1].tolist() == long.instruction_map()
    assert set(batch[INSTRUCTION_MAP_KEY][1].tolist()) == {0, 1, 2}


def test_vicuna_prefix_is_tokenized_as_the_special_token(tokenizer, ids):
    template = partial(vicuna_v1, prefix="<s>")
    prompt = encode([{"role": "user", "content": "Hi?"}], tokenizer, ids, template=template)
    assert prompt.input_ids[0] == tokenizer.bos_token_id


def test_vicuna_roles_are_checked():
    with pytest.raises(ValueError, match="roles"):
        vicuna_v1([{"role": "tool", "content": "x"}], True)


# -- segments: text between images, query blocks and replies is tokenized as one string --
PHI_EOS = "<|endoftext|>"


def build_bpe_tokenizer(words=("ĠASSISTANT", "USER", "ĠWhat", "Ġis", "Ġit", "ĠA", "Ġcat", "Ġred"), trim_offsets=True):
    """Byte-level BPE (GPT-2 / phi-2 style) whose merges make `words` single tokens, and
    phi-2's eos. Byte-level spelling: "Ġ" is a space. Every other byte is a token alone.
    `trim_offsets`: GPT-2's tokenizer files report offsets without the leading spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in words:  # a chain of merges per word: "Ġ"+"A", "ĠA"+"S", ...
        merged = word[0]
        for symbol in word[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            vocab.setdefault(merged, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=PHI_EOS, pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.add_tokens(QUERY_TOKENS, special_tokens=True)
    return tokenizer


class WithoutOffsets:
    """A tokenizer that cannot report offsets (as a Python, `is_fast=False` one)."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, text, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._tokenizer(text, **kwargs)


@pytest.fixture(scope="module")
def bpe():
    return build_bpe_tokenizer()


def bpe_ids(tokenizer):
    return {
        "queries": tokenizer.convert_tokens_to_ids(QUERY_TOKENS),
        "image": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    }


def tok(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


BPE_CHAT = [
    {"role": "user", "content": "<image>\nWhat is it?"},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What is it?"},
]


def test_the_tokenizer_shows_the_difference(bpe):
    assert bpe.convert_ids_to_tokens(tok(bpe, " ASSISTANT:")) == ["ĠASSISTANT", ":"]
    assert tok(bpe, " ") + tok(bpe, "ASSISTANT:") != tok(bpe, " ASSISTANT:")  # pieces one by one
    assert tok(bpe, "USER: ") + tok(bpe, "What") != tok(bpe, "USER: What")


def test_text_between_images_queries_and_replies_is_tokenized_as_one_string(bpe):
    ids = bpe_ids(bpe)
    prompt = encode(BPE_CHAT, bpe, ids)  # ends with the generation prompt
    queries, image = ids["queries"], [ids["image"]] * NUM_IMAGE_TOKENS
    # The rendered prompt, tokenized segment by segment between the ids that are not text.
    expected = (
        tok(bpe, f"{VICUNA_V1_SYSTEM} USER: ") + image + tok(bpe, "\nWhat is it?") + queries
        + tok(bpe, " ASSISTANT:") + tok(bpe, " A cat.") + [bpe.eos_token_id]
        + tok(bpe, "USER: What is it?") + queries + tok(bpe, " ASSISTANT:")
    )
    assert prompt.input_ids == expected
    after_last_block = prompt.input_ids[prompt.blocks[-1].query_positions.stop:]
    assert after_last_block == tok(bpe, " ASSISTANT:")
    assert bpe.convert_ids_to_tokens(after_last_block) == ["ĠASSISTANT", ":"]


@pytest.mark.parametrize("trim_offsets", [True, False])
def test_instruction_tokens_are_those_that_carry_the_users_words(trim_offsets):
    bpe = build_bpe_tokenizer(trim_offsets=trim_offsets)
    prompt = encode(BPE_CHAT, bpe, bpe_ids(bpe))
    second = prompt.blocks[1]
    tokens = bpe.convert_ids_to_tokens([prompt.input_ids[i] for i in second.instruction_positions])
    # "USER: What" is "USER", ":", " What": " What" carries the user's word (its space is
    # the template's), "USER" and ":" carry none of it.
    assert tokens == ["ĠWhat", "Ġis", "Ġit", "?"]
    before = second.instruction_positions[0]
    assert bpe.convert_ids_to_tokens(prompt.input_ids[before - 2:before]) == ["USER", ":"]
    assert list(second.instruction_positions) == list(range(before, second.query_positions.start))
    first = prompt.blocks[0]
    assert decode(bpe, (prompt.input_ids[i] for i in first.instruction_positions)) == "\nWhat is it?"


@pytest.mark.parametrize("trim_offsets", [True, False])
def test_spaces_of_the_template_are_not_instruction(trim_offsets):
    # "USER: " + "\nWhat": the template's space is a token alone (trimmed offsets: (p, p)).
    bpe = build_bpe_tokenizer(trim_offsets=trim_offsets)
    prompt = encode([{"role": "user", "content": "\nWhat  is it?"}], bpe, bpe_ids(bpe))
    span = prompt.blocks[0].instruction_positions
    assert bpe.convert_ids_to_tokens(prompt.input_ids[span[0] - 3:span[0]]) == ["USER", ":", "Ġ"]
    assert decode(bpe, (prompt.input_ids[i] for i in span)) == "\nWhat  is it?"
    # A character split over several byte tokens: all of them carry it.
    prompt = encode([{"role": "user", "content": "é!"}], bpe, bpe_ids(bpe))
    span = prompt.blocks[0].instruction_positions
    assert len(span) == 3 and decode(bpe, (prompt.input_ids[i] for i in span)) == "é!"  # 2 bytes + "!"


def test_without_offsets_each_instruction_is_tokenized_alone(bpe):
    ids = bpe_ids(bpe)
    prompt = encode(BPE_CHAT[2:], WithoutOffsets(bpe), ids)
    expected = (
        tok(bpe, f"{VICUNA_V1_SYSTEM} USER: ") + tok(bpe, "What is it?") + ids["queries"] + tok(bpe, " ASSISTANT:")
    )
    assert prompt.input_ids == expected  # template text is still joined: " ASSISTANT" is one token
    instruction = [prompt.input_ids[i] for i in prompt.blocks[0].instruction_positions]
    assert instruction == tok(bpe, "What is it?")


def test_a_straddling_token_counts_as_instruction():
    # Template text (" :") and the user's words (")") in one token: it carries user text.
    tokenizer = build_bpe_tokenizer(words=("USER", "Ġ:)"))
    ids = bpe_ids(tokenizer)

    def template(messages, add_generation_prompt):
        return [Text("USER :"), Instruction(") ok"), QuerySlot()]

    prompt = encode([{"role": "user", "content": "-"}], tokenizer, ids, template=template)
    span = [prompt.input_ids[i] for i in prompt.blocks[0].instruction_positions]
    assert tokenizer.convert_ids_to_tokens(span) == ["Ġ:)", "Ġ", "o", "k"]
    assert prompt.input_ids[: prompt.blocks[0].query_positions.start] == tok(tokenizer, "USER :) ok")


# -- 0 queries ------------------------------------------------------------------------------
def test_zero_queries_build_the_prompt_without_blocks(bpe):
    ids = bpe_ids(bpe)
    messages = BPE_CHAT[:2]
    prompt = build_prompt(messages, bpe, query_token_ids=[], image_token_id=ids["image"],
                          num_image_tokens=NUM_IMAGE_TOKENS)
    assert prompt.blocks == () and prompt.num_images == 1
    assert prompt.instruction_map() == [0] * len(prompt)
    assert not set(ids["queries"]) & set(prompt.input_ids)
    # No block between the user's words and " ASSISTANT:": they are one string, as in a
    # plain LLaVA prompt.
    expected = (
        tok(bpe, f"{VICUNA_V1_SYSTEM} USER: ") + [ids["image"]] * NUM_IMAGE_TOKENS
        + tok(bpe, "\nWhat is it? ASSISTANT:") + tok(bpe, " A cat.") + [bpe.eos_token_id]
    )
    assert prompt.input_ids == expected
    batch = pad_prompts([prompt], pad_token_id=bpe.pad_token_id, labels=True)
    assert not batch[INSTRUCTION_MAP_KEY].any()


def test_zero_queries_allow_stage_one_prompts(tokenizer, ids):
    def plain(messages, add_generation_prompt):  # LLaVA's stage-1 "plain" format
        return [Image(), Reply(messages[1]["content"] + "\n")]

    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A red box."}]
    prompt = encode(messages, tokenizer, {**ids, "queries": []}, template=plain)
    assert prompt.input_ids[:NUM_IMAGE_TOKENS] == [ids["image"]] * NUM_IMAGE_TOKENS and prompt.blocks == ()
    assert decode(tokenizer, [t for t in prompt.labels if t != -100]) == "A red box.\n"
    # A user turn with only an image is fine without blocks (with blocks it is refused).
    only_image = encode([{"role": "user", "content": "<image>"}], tokenizer, {**ids, "queries": []})
    assert only_image.blocks == () and only_image.num_images == 1


# -- the end of a reply -------------------------------------------------------------------------
def test_a_reply_ends_with_the_tokenizers_eos_token_id_and_it_is_trained(bpe):
    ids = bpe_ids(bpe)
    prompt = encode(BPE_CHAT[:2], bpe, ids)
    assert bpe.eos_token == PHI_EOS and prompt.input_ids[-1] == bpe.eos_token_id
    assert prompt.labels[-1] == bpe.eos_token_id  # a target: the model learns to stop
    trained = [t for t in prompt.labels if t != -100]
    assert trained == tok(bpe, " A cat.") + [bpe.eos_token_id]
    assert "</s>" not in decode(bpe, prompt.input_ids)


def test_an_explicit_end_of_reply_is_text(bpe):
    ids = bpe_ids(bpe)
    prompt = encode(BPE_CHAT[:2], bpe, ids, template=partial(vicuna_v1, end_of_reply="</s>"))
    trained = [t for t in prompt.labels if t != -100]
    assert trained == tok(bpe, " A cat.</s>")  # the characters: phi-2 has no "</s>" token
    assert bpe.eos_token_id not in prompt.input_ids
    assert vicuna_v1([{"role": "assistant", "content": "x"}], False, end_of_reply="###")[-1] == Reply(" x###")
    assert vicuna_v1([{"role": "assistant", "content": "x"}], False)[-1] == Reply(" x", eos=True)


def test_an_eos_reply_needs_a_tokenizer_with_eos(bpe):
    class NoEos(WithoutOffsets):
        def __init__(self, tokenizer):
            super().__init__(tokenizer)
            self.eos_token_id = None

    with pytest.raises(ValueError, match="has none; give the template an explicit end of reply"):
        encode(BPE_CHAT[:2], NoEos(build_bpe_tokenizer()), bpe_ids(bpe))
