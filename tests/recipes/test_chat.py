"""Chat: batched greedy answers equal one-by-one answers, and decode the generated ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipes.flashsloth.chat import FlashSlothChat, main

from .test_model import make_image, tiny_model

QUESTIONS = ["What colour is the square?", "Is there a circle in the top left cell?", "Describe the picture."]
NEW_TOKENS = 5


def chatty_model(**overrides):
    """A tiny model that never ends its answer early (so every answer has NEW_TOKENS tokens)."""
    model = tiny_model(**overrides)
    with torch.no_grad():
        model.llava.lm_head.bias[model.tokenizer.eos_token_id] = -1e4
    return model


@pytest.fixture(scope="module")
def chat() -> FlashSlothChat:
    return FlashSlothChat(chatty_model())


def test_batched_answers_equal_one_by_one(chat: FlashSlothChat) -> None:
    images = [make_image(0), make_image(1, size=(30, 70)), None]  # the last question has no image
    batched = chat.generate_ids(images, QUESTIONS, max_new_tokens=NEW_TOKENS)
    alone = [chat.generate_ids([image], [question], max_new_tokens=NEW_TOKENS)[0]
             for image, question in zip(images, QUESTIONS)]
    assert batched == alone
    assert all(len(ids) == NEW_TOKENS for ids in batched)
    assert chat.answer(images, QUESTIONS, max_new_tokens=NEW_TOKENS) == chat.answer(
        images, QUESTIONS, max_new_tokens=NEW_TOKENS, batch_size=1
    )


def test_answers_decode_the_generated_ids(chat: FlashSlothChat) -> None:
    images = [make_image(2), make_image(3)]
    ids = chat.generate_ids(images, QUESTIONS[:2], max_new_tokens=NEW_TOKENS)
    answers = chat.answer(images, QUESTIONS[:2], max_new_tokens=NEW_TOKENS)
    tokenizer = chat.model.tokenizer
    assert answers == [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    # The ids are what the model generates after the prompt, up to end-of-sequence.
    sample = chat.encode(images[0], QUESTIONS[0])
    prompt = torch.tensor([sample["prompt"].input_ids])
    out = chat.model.generate(
        prompt, torch.ones_like(prompt), sample["pixel_values"],
        torch.tensor([sample["prompt"].instruction_map()]), max_new_tokens=NEW_TOKENS, do_sample=False,
    )
    assert out[0, prompt.shape[1]:].tolist() == ids[0]


def test_answers_stop_at_end_of_sequence() -> None:
    model = tiny_model()
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():
        model.llava.lm_head.bias[eos] = 1e4  # the first token is always end-of-sequence
    chat = FlashSlothChat(model)
    assert chat.generate_ids([make_image()], ["Why?"], max_new_tokens=3) == [[]]
    assert chat.answer([make_image()], ["Why?"], max_new_tokens=3) == [""]


def test_hd_model_and_saved_folder(tmp_path: Path) -> None:
    model = chatty_model(hd=True)
    images = [make_image(0), make_image(1)]
    expected = FlashSlothChat(model).answer(images, QUESTIONS[:2], max_new_tokens=NEW_TOKENS)
    model.save_pretrained(tmp_path)
    assert FlashSlothChat(tmp_path).answer(images, QUESTIONS[:2], max_new_tokens=NEW_TOKENS) == expected


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = chatty_model()
    model.save_pretrained(tmp_path / "model")
    make_image(4).save(tmp_path / "picture.png")
    expected = FlashSlothChat(model).answer([make_image(4)] * 2, QUESTIONS[:2], max_new_tokens=NEW_TOKENS)
    main(["--model", str(tmp_path / "model"), "--image", str(tmp_path / "picture.png"), "--device", "cpu",
          "--question", QUESTIONS[0], "--question", QUESTIONS[1], "--max-new-tokens", str(NEW_TOKENS)])
    printed = capsys.readouterr().out
    assert printed == "".join(f"Q: {q}\nA: {a}\n" for q, a in zip(QUESTIONS[:2], expected))


def test_misuse_is_refused(chat: FlashSlothChat) -> None:
    with pytest.raises(ValueError, match="stage-1"):
        FlashSlothChat(tiny_model(num_queries=0))
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        chat.answer([None, None], ["Why?"])
    with pytest.raises(ValueError, match="pass the image separately"):
        chat.answer([None], ["<image> what?"])
