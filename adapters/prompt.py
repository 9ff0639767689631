"""Prompts with EmbQ query blocks, and where each block's instruction lies in the tokens.

    prompt = build_prompt(messages, tokenizer, query_token_ids=queries.token_ids,
                          image_token_id=model.config.image_token_id, num_image_tokens=81)
    batch = pad_prompts([prompt], pad_token_id=tokenizer.pad_token_id)   # left padding
    model.generate(**batch, pixel_values=pixel_values)

A template turns a conversation into pieces (template text, the user's instruction,
images, the slot of a query block, the assistant's reply). `build_prompt` tokenizes the
text between the places where ids that are not text go in (image placeholders, query
blocks) and the replies, and concatenates the token ids, so every position it reports is
a position in the ids it returns: nothing is found afterwards by searching the text for
role names or by counting from a fixed offset. One query block goes into each user turn
(the template says where: `vicuna_v1` and `chat_template` put it right after the user's
words, before the assistant's reply), and the block reads the instruction tokens of its
turn: the tokens that carry the user's text. Image placeholders are vision, not
instruction, so they are never part of an instruction span.

How text is cut into segments, each tokenized with one tokenizer call:

- Adjacent `Text` and `Instruction` pieces are joined and tokenized as one string, as the
  rendered prompt would be: with phi-2's byte-level BPE, `" " + "ASSISTANT:"` is
  `" ASSISTANT", ":"`, and `"USER: " + "What"` is `"USER", ":", " What"`, not `" ",
  "What"`. Which tokens are instruction comes from that tokenization: the tokenizer's
  offsets say which characters each token covers, and a token that covers any of the
  user's characters is instruction (`" What"` is, though its space is template text).
  A tokenizer without offsets (`is_fast` false) tokenizes each instruction alone instead.
- An image placeholder run and a query block end a segment: the text after them is
  tokenized on its own, as a prompt with those tokens in place would be.
- A reply is tokenized alone (its labels are then exactly its tokens, and a generation
  prompt, which ends where the reply starts, gives a prefix of the training ids); its
  end (`Reply(..., eos=True)`) is the tokenizer's eos token id, not text.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

__all__ = [
    "Text",
    "Instruction",
    "Image",
    "QuerySlot",
    "Reply",
    "Piece",
    "Template",
    "QueryBlock",
    "EncodedPrompt",
    "INSTRUCTION_MAP_KEY",
    "VICUNA_V1_SYSTEM",
    "vicuna_v1",
    "chat_template",
    "build_prompt",
    "pad_prompts",
]

#: The keyword argument (and batch key) that carries the instruction map to the model.
INSTRUCTION_MAP_KEY = "embq_instruction_map"
IGNORE_INDEX = -100


# -- pieces a template returns ----------------------------------------------------------
@dataclass(frozen=True)
class Text:
    """Template text: system prompt, role tags, separators. Not instruction, no loss."""

    text: str


@dataclass(frozen=True)
class Instruction:
    """The user's words of one turn; image markers in it become image placeholders."""

    text: str


@dataclass(frozen=True)
class Image:
    """One image: `num_image_tokens` placeholder tokens."""


@dataclass(frozen=True)
class QuerySlot:
    """Where the query block of the instruction pieces before it goes."""


@dataclass(frozen=True)
class Reply:
    """The assistant's words: the training targets (labels).

    `eos=True` ends the reply with the tokenizer's eos token (its id, not its text), a
    target too: what a template whose turns end with eos (`vicuna_v1`) returns.
    """

    text: str
    eos: bool = False


Piece = Union[Text, Instruction, Image, QuerySlot, Reply]
#: `template(messages, add_generation_prompt) -> pieces`.
Template = Callable[[Sequence[Mapping[str, Any]], bool], list[Piece]]


def _user_pieces(content: Any) -> list[Piece]:
    """A user message's content (a string, or a list of typed parts) as pieces."""
    if isinstance(content, str):
        return [Instruction(content)]
    pieces: list[Piece] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            pieces.append(Instruction(part["text"]))
        elif kind == "image":
            pieces.append(Image())
        else:
            raise ValueError(f"unsupported content part type {kind!r}; expected 'text' or 'image'")
    return pieces


def _reply_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


# -- templates --------------------------------------------------------------------------
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_v1(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    *,
    system: str = VICUNA_V1_SYSTEM,
    end_of_reply: str | None = None,
    prefix: str = "",
) -> list[Piece]:
    """LLaVA's Vicuna-v1 format, as FlashSloth trains it, with a query block per user turn.

    `"{prefix}{system} USER: {instruction}{queries} ASSISTANT: {reply}{eos}USER: ..."`:
    the block follows the user's words, as in FlashSloth's release. A leading "system"
    message replaces `system`. The reply's leading space and its end are part of the
    targets, so a model trained on these prompts generates them after "ASSISTANT:".
    The end of a reply is, by default (`end_of_reply=None`), the tokenizer's eos token
    (`build_prompt` appends its id: phi-2's `<|endoftext|>`, Vicuna's `</s>`), so that
    generation stops there; a string is appended to the reply as text instead (e.g.
    `"</s>"`, which is the eos token only where the tokenizer has it as one).
    `prefix` is e.g. a Llama tokenizer's "<s>" (BOS); phi-2 has none. Change the defaults
    with `functools.partial(vicuna_v1, prefix="<s>")`.
    """
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    pieces: list[Piece] = [Text(prefix + system + " ")]
    for message in messages:
        role = message["role"]
        if role == "user":
            pieces += [Text("USER: "), *_user_pieces(message["content"]), QuerySlot(), Text(" ")]
        elif role == "assistant":
            text = " " + _reply_text(message["content"])
            if end_of_reply is None:
                pieces += [Text("ASSISTANT:"), Reply(text, eos=True)]
            else:
                pieces += [Text("ASSISTANT:"), Reply(text + end_of_reply)]
        else:
            raise ValueError(f"vicuna_v1 takes roles 'system' (first), 'user', 'assistant'; got {role!r}")
    if add_generation_prompt:
        pieces.append(Text("ASSISTANT:"))
    return pieces


# Private-use characters: a chat template passes them through and a user never types them.
# Lower-case letters inside, so that a template that changes case is caught too.
_SENTINEL = "\ue000text{}\ue001"
_SENTINEL_PATTERN = re.compile("\ue000text(\\d+)\ue001")


def chat_template(renderer: Any, *, end_of_turn: str | None = "auto", **render_kwargs: Any) -> Template:
    """A `Template` from a tokenizer's (or processor's) Jinja chat template.

    The conversation is rendered once with every text part replaced by a sentinel; the
    rendered text between sentinels is template text, each sentinel is put back as the
    instruction, reply or system text it stands for, and a query block follows the last
    text part of every user message. Images in list-style content stay as they are, so
    the template writes its own image markers. `render_kwargs` go to
    `apply_chat_template` (e.g. `chat_template=` to pass the template itself).

    `end_of_turn` is the template text that closes an assistant turn and is trained with
    the reply, so the model learns to stop: where the text right after a reply starts with
    it, that much is a `Reply` too. `"auto"`: the tokenizer's eos token (`<|im_end|>` for
    Qwen2's chat tokenizers, `<|eot_id|>` for Llama 3's); None: the reply's words only.
    """
    if end_of_turn == "auto":
        end_of_turn = getattr(getattr(renderer, "tokenizer", renderer), "eos_token", None)
    if end_of_turn is not None and not (isinstance(end_of_turn, str) and end_of_turn):
        raise ValueError(f"end_of_turn must be a non-empty string, 'auto' or None, got {end_of_turn!r}")

    def render(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> list[Piece]:
        texts: list[tuple[str, str]] = []  # (role, text) of each sentinel
        closes_turn: set[int] = set()  # sentinels after which a query block goes
        stand_ins = []
        for message in messages:
            role, content = message["role"], message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
                as_string = True
            else:
                as_string = False
            parts = []
            for part in content:
                if part.get("type") == "text":
                    texts.append((role, part["text"]))
                    parts.append({**part, "text": _SENTINEL.format(len(texts) - 1)})
                else:
                    parts.append(dict(part))
            if role == "user":
                if not any(part.get("type") == "text" for part in content):
                    raise ValueError(
                        "a user message has no text: its query block would have no instruction to read"
                    )
                closes_turn.add(len(texts) - 1)
            stand_ins.append({**message, "content": parts[0]["text"] if as_string else parts})

        rendered = renderer.apply_chat_template(
            stand_ins, tokenize=False, add_generation_prompt=add_generation_prompt, **render_kwargs
        )
        if not isinstance(rendered, str):
            raise TypeError(
                f"apply_chat_template(tokenize=False) gave a {type(rendered).__name__}, not a string"
            )
        chunks = _SENTINEL_PATTERN.split(rendered)  # [text, index, text, index, ..., text]
        found = [int(index) for index in chunks[1::2]]
        if found != list(range(len(texts))):
            raise ValueError(
                "the chat template did not write each message text exactly once and in order "
                f"(sentinels found: {found}); it must not drop, repeat or transform message content"
            )
        pieces: list[Piece] = []
        for position, chunk in enumerate(chunks):
            if position % 2 == 0:
                after_reply = bool(pieces) and isinstance(pieces[-1], Reply)
                if after_reply and end_of_turn and chunk.startswith(end_of_turn):
                    pieces.append(Reply(end_of_turn))
                    chunk = chunk[len(end_of_turn):]
                if chunk:
                    pieces.append(Text(chunk))
                continue
            index = int(chunk)
            role, text = texts[index]
            kind = {"user": Instruction, "assistant": Reply}.get(role, Text)
            pieces.append(kind(text))
            if index in closes_turn:
                pieces.append(QuerySlot())
        return pieces

    return render


# -- the encoded prompt -------------------------------------------------------------------
@dataclass(frozen=True)
class QueryBlock:
    """One query block: the positions of its query tokens and of the instruction it reads."""

    query_positions: range
    instruction_positions: tuple[int, ...]


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids, labels (-100 except on replies) and the query blocks of one prompt."""

    input_ids: list[int]
    labels: list[int]
    blocks: tuple[QueryBlock, ...]
    num_images: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def instruction_map(self) -> list[int]:
        """Per token: k >= 1 where the token is instruction read by the k-th block, else 0."""
        values = [0] * len(self.input_ids)
        for number, block in enumerate(self.blocks, start=1):
            for position in block.instruction_positions:
                values[position] = number
        return values


def _coverage(offsets: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The characters `[first, stop)` each token covers, from the tokenizer's offsets.

    A token covers the characters from the end of the token before it to its own end:
    byte-level BPE with `trim_offsets` (GPT-2's and phi-2's tokenizer files) reports
    `" What"` from "W" on and a lone `" "` as `(p, p)`, but the spaces are the token's.
    A token that ends no later than the one before (a byte of a character split over
    several tokens) covers the last character it touches.
    """
    previous = 0
    for _, end in offsets:
        if end > previous:
            yield previous, end
            previous = end
        else:
            yield max(end - 1, 0), end


class _Builder:
    """Accumulates token ids piece by piece and records what each position is.

    Text and instruction pieces collect in `run` until something that is not text comes
    (an image, a query block, a reply, the end): then `flush` tokenizes the run as one
    string and records which of its tokens are instruction.
    """

    def __init__(self, tokenizer: Any, query_ids: list[int], image_token_id: int | None, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.query_ids = query_ids
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.images: list[range] = []
        self.blocks: list[QueryBlock] = []
        self.pending_instruction: list[int] = []
        self.run: list[tuple[str, bool]] = []  # (text, is instruction) not yet tokenized
        self.reserved = set(query_ids) | ({image_token_id} if image_token_id is not None else set())
        # Offsets (which characters each token covers) come with the Rust tokenizers.
        self.has_offsets = bool(getattr(tokenizer, "is_fast", False))

    def _encode(self, text: str, *, offsets: bool = False) -> tuple[list[int], list[tuple[int, int]] | None]:
        extra = {"return_offsets_mapping": True} if offsets else {}
        encoding = self.tokenizer(text, add_special_tokens=False, **extra)
        ids = list(encoding["input_ids"])
        clash = self.reserved.intersection(ids)
        if clash:
            raise ValueError(
                f"the text {text!r} tokenizes to reserved token ids {sorted(clash)} (query or "
                "image tokens); images go in as image markers or Image pieces, queries as QuerySlot"
            )
        return ids, ([tuple(pair) for pair in encoding["offset_mapping"]] if offsets else None)

    def _append(self, ids: Sequence[int], *, target: bool) -> range:
        start = len(self.ids)
        self.ids.extend(ids)
        self.labels.extend(ids if target else [IGNORE_INDEX] * len(ids))
        return range(start, len(self.ids))

    def flush(self) -> None:
        """Tokenize the collected text as one string; its instruction tokens await a block."""
        run, self.run = self.run, []
        if not any(is_instruction for _, is_instruction in run):
            if run:
                self._append(self._encode("".join(text for text, _ in run))[0], target=False)
            return
        if not self.has_offsets:
            # No offsets to tell instruction tokens apart: each instruction is its own string.
            for is_instruction, group in itertools.groupby(run, key=lambda part: part[1]):
                span = self._append(self._encode("".join(text for text, _ in group))[0], target=False)
                if is_instruction:
                    self.pending_instruction.extend(span)
            return
        text, instruction, at = "", [], 0
        for part, is_instruction in run:
            if is_instruction:
                instruction.append((at, at + len(part)))
            text, at = text + part, at + len(part)
        ids, offsets = self._encode(text, offsets=True)
        span = self._append(ids, target=False)
        self.pending_instruction.extend(
            position
            for position, (first, stop) in zip(span, _coverage(offsets))
            if any(first < end and stop > start for start, end in instruction)
        )

    def image(self) -> None:
        if self.image_token_id is None or self.num_image_tokens < 1:
            raise ValueError("the prompt has an image: pass image_token_id and num_image_tokens >= 1")
        self.flush()
        self.images.append(self._append([self.image_token_id] * self.num_image_tokens, target=False))

    def text(self, text: str, image_marker: str | None, *, instruction: bool) -> None:
        # Without query blocks no one reads instructions: they are text like any other.
        instruction = instruction and bool(self.query_ids)
        parts = text.split(image_marker) if image_marker else [text]
        for index, part in enumerate(parts):
            if index > 0:
                self.image()
            if part:
                self.run.append((part, instruction))

    def reply(self, text: str, *, eos: bool) -> None:
        self.flush()
        ids = self._encode(text)[0] if text else []
        if eos:
            eos_id = getattr(self.tokenizer, "eos_token_id", None)
            if eos_id is None:
                raise ValueError(
                    "the reply ends with the tokenizer's eos token, but the tokenizer has none; "
                    "give the template an explicit end of reply (vicuna_v1: end_of_reply=...)"
                )
            ids.append(int(eos_id))
        self._append(ids, target=True)

    def query_block(self) -> None:
        if not self.query_ids:  # 0 queries: no block, and nothing to cut the text at
            return
        self.flush()
        if not self.pending_instruction:
            raise ValueError("a query block has no instruction tokens before it (a user turn without text?)")
        span = self._append(self.query_ids, target=False)
        self.blocks.append(QueryBlock(span, tuple(self.pending_instruction)))
        self.pending_instruction = []


def build_prompt(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    query_token_ids: Sequence[int],
    template: Template = vicuna_v1,
    image_token_id: int | None = None,
    num_image_tokens: int = 0,
    image_marker: str | None = "<image>",
    add_generation_prompt: bool | None = None,
    max_length: int | None = None,
) -> EncodedPrompt:
    """Tokenize a conversation with one query block per user turn.

    Args:
        messages: `{"role": "system" | "user" | "assistant", "content": ...}` dicts; content
            is a string (image markers where images go) or a list of typed parts.
        tokenizer: called as `tokenizer(text, add_special_tokens=False)` on each segment
            (with `return_offsets_mapping=True` where it `is_fast`); a reply with
            `eos=True` ends with `tokenizer.eos_token_id`.
        query_token_ids: the ids of one query block, in order (`EmbQGraft.token_ids`).
            Empty: no query blocks (a model without EmbQ, stage-1 prompts, the 0-query
            ablation); the template's query slots are then ignored, the text around them
            is tokenized as one string, and no instruction spans are recorded.
        template: `vicuna_v1` (FlashSloth), `chat_template(tokenizer)`, or your own.
        image_token_id, num_image_tokens: each image becomes this many placeholder ids
            (after a compressor graft, the compressed count).
        image_marker: the text that stands for an image in string content and template
            text; None: images only as `Image` pieces / typed parts.
        add_generation_prompt: end with the assistant's header; default: when the last
            message is the user's.
        max_length: keep the first `max_length` tokens. Cutting through an image's
            placeholders or through a query block is a ValueError; a block wholly cut off
            is dropped (its instruction tokens stay, read by no block).
    """
    query_ids = [int(i) for i in query_token_ids]
    if add_generation_prompt is None:
        add_generation_prompt = bool(messages) and messages[-1]["role"] == "user"
    builder = _Builder(tokenizer, query_ids, image_token_id, num_image_tokens)
    for piece in template(messages, add_generation_prompt):
        if isinstance(piece, Text):
            builder.text(piece.text, image_marker, instruction=False)
        elif isinstance(piece, Instruction):
            builder.text(piece.text, image_marker, instruction=True)
        elif isinstance(piece, Image):
            builder.image()
        elif isinstance(piece, QuerySlot):
            builder.query_block()
        elif isinstance(piece, Reply):
            builder.reply(piece.text, eos=piece.eos)
        else:
            raise TypeError(f"a template returned {piece!r}, which is not a prompt piece")
    builder.flush()
    if builder.pending_instruction:
        raise ValueError("the template left instruction text without a QuerySlot after it")
    prompt = EncodedPrompt(builder.ids, builder.labels, tuple(builder.blocks), len(builder.images))
    return prompt if max_length is None else _truncate(prompt, builder.images, max_length)


def _truncate(prompt: EncodedPrompt, images: list[range], max_length: int) -> EncodedPrompt:
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if len(prompt) <= max_length:
        return prompt
    for number, image in enumerate(images, start=1):
        if image.start < max_length < image.stop:
            raise ValueError(
                f"max_length={max_length} cuts image {number} (placeholders {image.start}..{image.stop - 1}): "
                f"{max_length - image.start} of its {len(image)} placeholders would remain; "
                "raise max_length or drop the image"
            )
    for number, block in enumerate(prompt.blocks, start=1):
        span = block.query_positions
        if span.start < max_length < span.stop:
            raise ValueError(
                f"max_length={max_length} cuts query block {number} (positions {span.start}..{span.stop - 1}) "
                f"in half; raise max_length or end the prompt before that turn"
            )
    kept = tuple(block for block in prompt.blocks if block.query_positions.stop <= max_length)
    num_images = sum(1 for image in images if image.stop <= max_length)
    return EncodedPrompt(prompt.input_ids[:max_length], prompt.labels[:max_length], kept, num_images)


def pad_prompts(
    prompts: Sequence[EncodedPrompt],
    *,
    pad_token_id: int,
    padding_side: str = "left",
    labels: bool = False,
) -> dict[str, torch.Tensor]:
    """A batch: `input_ids`, `attention_mask`, `embq_instruction_map` (and `labels`).

    Left padding (the default) is what batched generation needs. The instruction map is
    padded with 0 (no instruction) like the ids, so it stays aligned with them.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not prompts:
        raise ValueError("no prompts to pad")
    length = max(len(prompt) for prompt in prompts)
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], INSTRUCTION_MAP_KEY: []}
    if labels:
        columns["labels"] = []
    for prompt in prompts:
        fill = length - len(prompt)
        rows = {
            "input_ids": (prompt.input_ids, pad_token_id),
            "attention_mask": ([1] * len(prompt), 0),
            INSTRUCTION_MAP_KEY: (prompt.instruction_map(), 0),
            "labels": (prompt.labels, IGNORE_INDEX),
        }
        for key in columns:
            values, pad = rows[key]
            columns[key].append([pad] * fill + values if padding_side == "left" else values + [pad] * fill)
    return {key: torch.tensor(rows, dtype=torch.long) for key, rows in columns.items()}
