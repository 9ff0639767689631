"""LLaVA conversations -> token ids, labels and EmbQ query blocks, for both stages.

The tokenization itself is `tokencompress.adapters.prompt` (the same code the model's
EmbQ graft and inference use, so training and serving tokenize alike): it tokenizes a
conversation piece by piece, so the positions of image placeholders, each user turn's
instruction and its query block come from the construction, never from searching text
or counting from fixed offsets. This module adds what the recipe's data needs:

- `llava_to_messages`: LLaVA's ``{"from": "human" | "gpt", "value"}`` turns to
  ``{"role", "content"}`` messages, with LLaVA's image normalisation (an ``<image>``
  marker moves to the front of its message, followed by a newline).
- `ConversationTemplate` (stage 2): the Vicuna-v1 template of FlashSloth,
  ``"{system} USER: <image>\\n{instruction}{queries} ASSISTANT: {reply}{eos}USER: ..."``,
  one query block per user turn, replies (with the tokenizer's eos) as the only targets.
- `PlainTemplate` (stage 1): LLaVA's "plain" format, ``<image>{caption}\\n``; the caption
  and separator are the targets. No instruction, so no query block.

Both return `EncodedPrompt` (``input_ids``, ``labels``, ``blocks``, ``num_images``).

Truncation to ``max_length`` follows `tokencompress.adapters.prompt.build_prompt`: the
first ``max_length`` tokens are kept; if that cuts through an image's placeholders or a
query block, a `ValueError` is raised instead; a query block wholly cut off is dropped.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Protocol, Sequence

from tokencompress.adapters.prompt import EncodedPrompt, build_prompt, vicuna_v1

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_MARKER",
    "ConversationFormatError",
    "ConversationTemplate",
    "EncodedPrompt",
    "PlainTemplate",
    "Template",
    "build_template",
    "llava_to_messages",
]

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
_ROLES = {"human": "user", "gpt": "assistant"}


class ConversationFormatError(ValueError):
    """A conversation that does not follow the LLaVA format; names the sample."""


class Template(Protocol):
    """What the data set calls: a LLaVA ``conversations`` list -> `EncodedPrompt`."""

    def encode(
        self,
        conversations: Sequence[Mapping[str, Any]],
        *,
        num_images: int,
        sample_id: str | None = None,
        add_generation_prompt: bool = False,
    ) -> EncodedPrompt: ...


def _what(sample_id: str | None) -> str:
    return f"sample {sample_id!r}" if sample_id is not None else "conversation"


def _check_turns(conversations: Sequence[Mapping[str, Any]], sample_id: str | None) -> None:
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
        raise ConversationFormatError(f"{_what(sample_id)}: 'conversations' must be a list")
    if not conversations:
        raise ConversationFormatError(f"{_what(sample_id)}: empty conversation")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise ConversationFormatError(
                f"{_what(sample_id)}: turn {i} must be a mapping with 'from' and a string 'value'"
            )
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise ConversationFormatError(
                f"{_what(sample_id)}: turn {i} is from {turn.get('from')!r}, expected "
                f"{expected!r} (turns alternate, starting with 'human')"
            )


def _count_images(conversations: Sequence[Mapping[str, Any]]) -> int:
    return sum(turn["value"].count(IMAGE_MARKER) for turn in conversations)


def llava_to_messages(
    conversations: Sequence[Mapping[str, Any]], *, sample_id: str | None = None
) -> list[dict[str, str]]:
    """LLaVA turns -> ``{"role": "user" | "assistant", "content"}`` messages.

    A user message with image markers becomes ``"<image>...<image>\\n" + rest.strip()``,
    as LLaVA's training code writes it (the markers then become placeholders in place).
    """
    _check_turns(conversations, sample_id)
    messages = []
    for turn in conversations:
        content = turn["value"]
        count = content.count(IMAGE_MARKER)
        if count and turn["from"] == "human":
            content = IMAGE_MARKER * count + "\n" + content.replace(IMAGE_MARKER, "").strip()
        messages.append({"role": _ROLES[turn["from"]], "content": content})
    return messages


class ConversationTemplate:
    """Stage 2: Vicuna-v1 with one EmbQ query block per user turn.

    Hooks: ``image_token_id`` x ``num_image_tokens`` placeholders per image (81, or 405
    with HD), ``query_token_ids`` (the query block, e.g. 9 ids), ``end_of_reply`` (the
    text ending each reply; default the tokenizer's eos token, so generation stops on eos).
    ``allow_no_queries`` accepts an empty ``query_token_ids`` (a model built without
    EmbQ, as the paper's Table 3 rows without it): no query blocks then.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_token_id: int,
        num_image_tokens: int,
        query_token_ids: Sequence[int],
        max_length: int | None = None,
        end_of_reply: str | None = None,
        allow_no_queries: bool = False,
    ) -> None:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if not query_token_ids and not allow_no_queries:
            raise ValueError("query_token_ids is empty: stage 2 puts a query block in every user turn "
                             "(allow_no_queries=True for a model without EmbQ)")
        end = tokenizer.eos_token if end_of_reply is None else end_of_reply
        if not end:
            raise ValueError("the tokenizer has no eos token: pass end_of_reply")
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.query_token_ids = list(query_token_ids)
        self.max_length = max_length
        self.end_of_reply = end
        self._template = functools.partial(vicuna_v1, end_of_reply=end)

    def encode(
        self,
        conversations: Sequence[Mapping[str, Any]],
        *,
        num_images: int,
        sample_id: str | None = None,
        add_generation_prompt: bool = False,
    ) -> EncodedPrompt:
        """Encode LLaVA turns; training needs the assistant last, generation the user."""
        messages = llava_to_messages(conversations, sample_id=sample_id)
        ends_with_user = messages[-1]["role"] == "user"
        if ends_with_user != add_generation_prompt:
            raise ConversationFormatError(
                f"{_what(sample_id)}: the last turn must be "
                + ("the user's to add a generation prompt" if add_generation_prompt
                   else "the assistant's (there is nothing to train on)")
            )
        markers = _count_images(conversations)
        if markers != num_images:
            raise ConversationFormatError(
                f"{_what(sample_id)}: {markers} {IMAGE_MARKER} marker(s) in the text "
                f"but {num_images} image(s)"
            )
        try:
            return build_prompt(
                messages,
                self.tokenizer,
                query_token_ids=self.query_token_ids,
                template=self._template,
                image_token_id=self.image_token_id,
                num_image_tokens=self.num_image_tokens,
                image_marker=IMAGE_MARKER,
                add_generation_prompt=add_generation_prompt,
                max_length=self.max_length,
            )
        except ValueError as exc:
            raise ConversationFormatError(f"{_what(sample_id)}: {exc}") from exc


class PlainTemplate:
    """Stage 1: ``<image>{caption}{separator}``, image placeholders first, caption trained.

    The human turn is ignored apart from its image marker (as in LLaVA). With
    ``add_generation_prompt`` (a single human turn) the prompt is the image alone.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_token_id: int,
        num_image_tokens: int,
        max_length: int | None = None,
        separator: str = "\n",
    ) -> None:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if max_length is not None and max_length < num_image_tokens:
            raise ValueError(
                f"max_length={max_length} is shorter than one image ({num_image_tokens} tokens)"
            )
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self._separator_ids = self._tokens(separator)

    def _tokens(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        if self.image_token_id in ids:
            raise ValueError(f"the text {text!r} tokenizes to the image token id")
        return ids

    def encode(
        self,
        conversations: Sequence[Mapping[str, Any]],
        *,
        num_images: int,
        sample_id: str | None = None,
        add_generation_prompt: bool = False,
    ) -> EncodedPrompt:
        """Encode ``[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]``."""
        _check_turns(conversations, sample_id)
        expected = 1 if add_generation_prompt else 2
        if len(conversations) != expected:
            raise ConversationFormatError(
                f"{_what(sample_id)}: the plain format takes {expected} turn(s), got {len(conversations)}"
            )
        marker_in_human_turn = IMAGE_MARKER in conversations[0]["value"]
        if num_images != 1 or _count_images(conversations) != 1 or not marker_in_human_turn:
            raise ConversationFormatError(
                f"{_what(sample_id)}: the plain format takes one image and one {IMAGE_MARKER} "
                f"marker in the human turn (got {num_images} image(s))"
            )
        image = [self.image_token_id] * self.num_image_tokens
        try:
            caption = []
            if not add_generation_prompt:
                caption = self._tokens(conversations[1]["value"]) + self._separator_ids
        except ValueError as exc:
            raise ConversationFormatError(f"{_what(sample_id)}: {exc}") from exc
        input_ids = image + caption
        labels = [IGNORE_INDEX] * len(image) + caption
        if self.max_length is not None:  # the image always fits (checked at construction)
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return EncodedPrompt(input_ids, labels, blocks=(), num_images=1)


def build_template(
    name: str,
    tokenizer: Any,
    *,
    image_token_id: int,
    num_image_tokens: int,
    query_token_ids: Sequence[int] = (),
    max_length: int | None = None,
    allow_no_queries: bool = False,
) -> ConversationTemplate | PlainTemplate:
    """The template a config's ``data.template`` names: "vicuna_v1" (stage 2) or "plain".

    ``allow_no_queries``: "vicuna_v1" without query blocks, for a model without EmbQ.
    """
    if name == "vicuna_v1":
        return ConversationTemplate(
            tokenizer,
            image_token_id=image_token_id,
            num_image_tokens=num_image_tokens,
            query_token_ids=query_token_ids,
            max_length=max_length,
            allow_no_queries=allow_no_queries,
        )
    if name == "plain":
        if query_token_ids:
            raise ValueError("the plain format has no instruction, so no query block: num_queries must be 0")
        return PlainTemplate(
            tokenizer, image_token_id=image_token_id, num_image_tokens=num_image_tokens, max_length=max_length
        )
    raise ValueError(f"unknown template {name!r}; known: 'plain', 'vicuna_v1'")
