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
    assert decode(tokenizer, [t for t in prompt.labels if t != -100]) == "A dog."


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
