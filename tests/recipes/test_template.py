"""Templates: the exact prompt text, targets only on replies, block positions, truncation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recipes.flashsloth.template import (
    IGNORE_INDEX,
    IMAGE_MARKER,
    ConversationFormatError,
    ConversationTemplate,
    PlainTemplate,
    build_template,
    llava_to_messages,
)
from tokencompress.adapters.prompt import VICUNA_V1_SYSTEM, build_prompt

N_IMAGE, N_QUERY = 5, 3


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    tok = tiny_tokenizer
    return {
        "image": tok.convert_tokens_to_ids("<image>"),
        "query": tok.convert_tokens_to_ids("<query>"),
        "eos": tok.eos_token_id,
    }


@pytest.fixture(scope="module")
def chat(tiny_tokenizer, ids):
    return ConversationTemplate(
        tiny_tokenizer, image_token_id=ids["image"], num_image_tokens=N_IMAGE,
        query_token_ids=[ids["query"]] * N_QUERY,
    )


@pytest.fixture(scope="module")
def plain(tiny_tokenizer, ids):
    return PlainTemplate(tiny_tokenizer, image_token_id=ids["image"], num_image_tokens=N_IMAGE)


def turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


TWO_ROUNDS = turns("What colour is the shape in the centre cell?\n<image>", "red",
                   "How many blue shapes are there?", "two")


def test_vicuna_prompt_text_is_exactly_the_release_format(chat, tiny_tokenizer):
    prompt = chat.encode(TWO_ROUNDS, num_images=1)
    images, queries = "<image>" * N_IMAGE, "<query>" * N_QUERY
    expected = (
        f"{VICUNA_V1_SYSTEM} USER: {images}\nWhat colour is the shape in the centre cell?{queries} "
        f"ASSISTANT: red</s>USER: How many blue shapes are there?{queries} ASSISTANT: two</s>"
    )
    assert tiny_tokenizer.decode(prompt.input_ids) == expected
    assert prompt.num_images == 1
    assert prompt.input_ids.count(chat.image_token_id) == N_IMAGE


def test_only_replies_and_their_eos_are_targets(chat, tiny_tokenizer, ids):
    prompt = chat.encode(TWO_ROUNDS, num_images=1)
    trained = [i for i, label in enumerate(prompt.labels) if label != IGNORE_INDEX]
    assert [prompt.labels[i] for i in trained] == [prompt.input_ids[i] for i in trained]
    text = tiny_tokenizer.decode([prompt.input_ids[i] for i in trained])
    assert text == " red</s> two</s>"
    assert sum(1 for i in trained if prompt.input_ids[i] == ids["eos"]) == 2
    # Each reply ends right at its eos and nothing of the prompt around it is trained.
    assert prompt.labels[-1] == ids["eos"]


def test_query_blocks_follow_each_instruction_and_read_it(chat, tiny_tokenizer, ids):
    prompt = chat.encode(TWO_ROUNDS, num_images=1)
    assert len(prompt.blocks) == 2
    instructions = ["\nWhat colour is the shape in the centre cell?", " How many blue shapes are there?"]
    for block, instruction in zip(prompt.blocks, instructions):
        positions = list(block.query_positions)
        assert [prompt.input_ids[p] for p in positions] == [ids["query"]] * N_QUERY
        assert all(prompt.labels[p] == IGNORE_INDEX for p in positions)
        read = block.instruction_positions
        assert tiny_tokenizer.decode([prompt.input_ids[p] for p in read]).strip() == instruction.strip()
        assert list(read) == list(range(read[0], read[-1] + 1))  # contiguous
        assert read[-1] + 1 == positions[0]  # the block comes right after the instruction
        after = tiny_tokenizer.decode(prompt.input_ids[positions[-1] + 1:])
        assert after.startswith(" ASSISTANT:")  # ... and right before the assistant's turn
        assert ids["image"] not in [prompt.input_ids[p] for p in read]  # images are not instruction
    instruction_map = prompt.instruction_map()
    assert sorted(set(instruction_map)) == [0, 1, 2]


def test_image_marker_moves_to_the_front_as_in_llava():
    messages = llava_to_messages(TWO_ROUNDS)
    assert messages[0] == {"role": "user", "content": "<image>\nWhat colour is the shape in the centre cell?"}
    assert messages[1] == {"role": "assistant", "content": "red"}
    assert messages[2]["content"] == "How many blue shapes are there?"  # untouched without an image


def test_image_in_a_later_round(chat, tiny_tokenizer):
    conversation = turns("Hello?", "hi", "<image>\nWhat shape is in the centre cell?", "circle")
    prompt = chat.encode(conversation, num_images=1)
    text = tiny_tokenizer.decode(prompt.input_ids)
    assert "ASSISTANT: hi</s>USER: " + "<image>" * N_IMAGE + "\nWhat shape" in text


def test_text_only_sample(chat, tiny_tokenizer):
    prompt = chat.encode(turns("What is two plus two?", "four"), num_images=0)
    assert prompt.num_images == 0 and chat.image_token_id not in prompt.input_ids
    assert tiny_tokenizer.decode(prompt.input_ids).endswith(
        "USER: What is two plus two?" + "<query>" * N_QUERY + " ASSISTANT: four</s>"
    )


def test_generation_prompt_ends_with_the_assistant_header(chat, tiny_tokenizer):
    prompt = chat.encode(turns("<image>\nWhat shape is in the centre cell?"), num_images=1,
                         add_generation_prompt=True)
    assert tiny_tokenizer.decode(prompt.input_ids).endswith("<query>" * N_QUERY + " ASSISTANT:")
    assert set(prompt.labels) == {IGNORE_INDEX}
    assert len(prompt.blocks) == 1


def test_training_and_inference_tokenize_alike(chat, tiny_tokenizer, ids):
    # Inference builds prompts with the adapters' own helper; the recipe's template must
    # give the same ids, or the model would be served a tokenization it never saw.
    question = "<image>\nWhat shape is in the centre cell?"
    served = build_prompt(
        [{"role": "user", "content": question}], tiny_tokenizer,
        query_token_ids=[ids["query"]] * N_QUERY, image_token_id=ids["image"], num_image_tokens=N_IMAGE,
    )
    trained = chat.encode(turns(question), num_images=1, add_generation_prompt=True)
    assert trained == served
    full = chat.encode(turns(question, "circle"), num_images=1)
    assert full.input_ids[: len(served)] == served.input_ids  # training extends the served prompt


def test_reply_ends_with_the_tokenizers_eos_not_a_literal_string(tiny_tokenizer, ids):
    template = ConversationTemplate(tiny_tokenizer, image_token_id=ids["image"], num_image_tokens=1,
                                    query_token_ids=[ids["query"]], end_of_reply="\n###")
    prompt = template.encode(turns("Hi?", "yes"), num_images=0)
    assert tiny_tokenizer.decode(prompt.input_ids).endswith("ASSISTANT: yes\n###")
    default = ConversationTemplate(tiny_tokenizer, image_token_id=ids["image"], num_image_tokens=1,
                                   query_token_ids=[ids["query"]])
    assert default.end_of_reply == tiny_tokenizer.eos_token
    assert default.encode(turns("Hi?", "yes"), num_images=0).input_ids[-1] == ids["eos"]


@pytest.mark.parametrize(
    "conversation, num_images, match",
    [
        (turns("<image>\nHi?", "yes"), 0, "1 <image> marker\\(s\\) in the text but 0 image"),
        (turns("Hi?", "yes"), 1, "0 <image> marker\\(s\\) in the text but 1 image"),
        ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}], 0, "turn 0 is from 'gpt'"),
        ([{"from": "human", "value": "x"}, {"from": "human", "value": "y"}], 0, "turn 1 is from 'human'"),
        (turns("Hi?"), 0, "must be the assistant's"),
        ([], 0, "empty conversation"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}], 0, "string 'value'"),
    ],
)
def test_bad_conversations_name_the_sample(chat, conversation, num_images, match):
    with pytest.raises(ConversationFormatError, match=match) as info:
        chat.encode(conversation, num_images=num_images, sample_id="s-42")
    assert "sample 's-42'" in str(info.value)


def test_generation_prompt_needs_the_user_last(chat):
    with pytest.raises(ConversationFormatError, match="the user's to add a generation prompt"):
        chat.encode(turns("Hi?", "yes"), num_images=0, add_generation_prompt=True)


def test_truncation_keeps_whole_blocks_or_raises(tiny_tokenizer, ids):
    def make(max_length):
        return ConversationTemplate(tiny_tokenizer, image_token_id=ids["image"], num_image_tokens=N_IMAGE,
                                    query_token_ids=[ids["query"]] * N_QUERY, max_length=max_length)

    full = make(None).encode(TWO_ROUNDS, num_images=1)
    image_start = full.input_ids.index(ids["image"])
    # Cutting inside the image placeholders is refused, naming the sample.
    with pytest.raises(ConversationFormatError, match="sample 'cut'.*cuts image 1"):
        make(image_start + 2).encode(TWO_ROUNDS, num_images=1, sample_id="cut")
    # Cutting inside the second query block is refused.
    second = full.blocks[1].query_positions
    with pytest.raises(ConversationFormatError, match="cuts query block 2"):
        make(second.start + 1).encode(TWO_ROUNDS, num_images=1)
    # Cutting after the first block keeps it whole and drops the second.
    cut = full.blocks[0].query_positions.stop + 2
    short = make(cut).encode(TWO_ROUNDS, num_images=1)
    assert short.input_ids == full.input_ids[:cut] and len(short.blocks) == 1
    assert short.blocks[0] == full.blocks[0]


QUESTIONS = st.sampled_from(["Hi?", "What shape is in the centre cell?", "Count them."])
ANSWERS = st.sampled_from(["yes", "circle", "three blue shapes"])


@given(
    rounds=st.lists(st.tuples(QUESTIONS, ANSWERS), min_size=1, max_size=4),
    image_round=st.integers(0, 3),
    max_length=st.integers(60, 400),
)
def test_truncated_prompts_never_hold_a_partial_block(tiny_tokenizer, ids, rounds, image_round, max_length):
    values = []
    for i, (question, answer) in enumerate(rounds):
        values += [("<image>\n" if i == image_round else "") + question, answer]
    conversation = turns(*values)
    num_images = 1 if image_round < len(rounds) else 0
    template = ConversationTemplate(tiny_tokenizer, image_token_id=ids["image"], num_image_tokens=N_IMAGE,
                                    query_token_ids=[ids["query"]] * N_QUERY, max_length=max_length)
    try:
        prompt = template.encode(conversation, num_images=num_images)
    except ConversationFormatError as exc:
        assert "cuts" in str(exc)
        return
    assert len(prompt.input_ids) == len(prompt.labels) <= max_length
    image_count = prompt.input_ids.count(ids["image"])
    assert image_count in (0, N_IMAGE)
    assert prompt.input_ids.count(ids["query"]) == N_QUERY * len(prompt.blocks)
    for block in prompt.blocks:
        assert all(prompt.input_ids[p] == ids["query"] for p in block.query_positions)
    for position, label in enumerate(prompt.labels):
        assert label in (IGNORE_INDEX, prompt.input_ids[position])


def test_plain_format_is_image_caption_newline(plain, tiny_tokenizer, ids):
    caption = "A grid with a red circle in the centre cell."
    prompt = plain.encode(turns("<image>", caption), num_images=1)
    assert tiny_tokenizer.decode(prompt.input_ids) == "<image>" * N_IMAGE + caption + "\n"
    assert prompt.labels[:N_IMAGE] == [IGNORE_INDEX] * N_IMAGE
    assert prompt.labels[N_IMAGE:] == prompt.input_ids[N_IMAGE:]
    assert prompt.blocks == () and prompt.num_images == 1
    # The human text is ignored apart from its marker, as in LLaVA.
    assert plain.encode(turns("Describe <image> briefly", caption), num_images=1) == prompt
    generation = plain.encode(turns("<image>"), num_images=1, add_generation_prompt=True)
    assert generation.input_ids == [ids["image"]] * N_IMAGE


def test_plain_truncation_cuts_the_caption_never_the_image(tiny_tokenizer, ids):
    template = PlainTemplate(tiny_tokenizer, image_token_id=ids["image"], num_image_tokens=N_IMAGE,
                             max_length=N_IMAGE + 2)
    prompt = template.encode(turns("<image>", "a long caption of many words"), num_images=1)
    assert len(prompt.input_ids) == N_IMAGE + 2 and prompt.input_ids[:N_IMAGE] == [ids["image"]] * N_IMAGE
    with pytest.raises(ValueError, match="max_length=3 is shorter than one image \\(5 tokens\\)"):
        PlainTemplate(tiny_tokenizer, image_token_id=ids["image"], num_image_tokens=N_IMAGE, max_length=3)


@pytest.mark.parametrize(
    "conversation, num_images, match",
    [
        (turns("<image>", "cap", "more?", "no"), 1, "takes 2 turn\\(s\\), got 4"),
        (turns("no marker", "cap"), 1, "one <image> marker"),
        (turns("<image><image>", "cap"), 2, "one <image> marker"),
        (turns("<image>", "cap"), 0, "got 0 image"),
    ],
)
def test_plain_errors_name_the_sample(plain, conversation, num_images, match):
    with pytest.raises(ConversationFormatError, match=match) as info:
        plain.encode(conversation, num_images=num_images, sample_id="p-1")
    assert "sample 'p-1'" in str(info.value)


def test_build_template(tiny_tokenizer, ids):
    kwargs = dict(image_token_id=ids["image"], num_image_tokens=N_IMAGE)
    assert isinstance(build_template("plain", tiny_tokenizer, **kwargs), PlainTemplate)
    chat = build_template("vicuna_v1", tiny_tokenizer, query_token_ids=[ids["query"]] * 2, max_length=99,
                          **kwargs)
    assert isinstance(chat, ConversationTemplate) and chat.max_length == 99
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        build_template("chatml", tiny_tokenizer, **kwargs)
    with pytest.raises(ValueError, match="num_queries must be 0"):
        build_template("plain", tiny_tokenizer, query_token_ids=[ids["query"]], **kwargs)
    with pytest.raises(ValueError, match="query_token_ids is empty"):
        build_template("vicuna_v1", tiny_tokenizer, **kwargs)
    assert IMAGE_MARKER == "<image>"
