"""Graft FlashSloth's EmbQ onto a Hugging Face LLaVA model, removably.

    queries = graft_embq(model, EmbQ(text_dim=2560, vision_dim=1152), layer=8,
                         num_queries=9, tokenizer=processor.tokenizer)
    prompt = queries.build_prompt([{"role": "user", "content": "<image>\\nWhat is it?"}])
    batch = pad_prompts([prompt], pad_token_id=processor.tokenizer.pad_token_id)
    model.generate(**batch, pixel_values=pixel_values)
    queries.remove()

What the graft changes, all undone by `remove()`:
- the tokenizer gets `num_queries` special query tokens (kept by `remove()`: a Hugging
  Face tokenizer cannot drop added tokens; they are inert without the graft);
- the embedding matrix grows to cover them, only if it has no free rows for them
  (`remove()` shrinks it back: same values, new embedding modules);
- the input embedding is wrapped (`QueryEmbedding`): query token i embeds as a learnable
  vector (`query_vectors[i]`, zeros when grafted) plus the word embedding of ".";
- decoder layer `layer` (1-based, as the paper counts: layer=8 is `layers[7]`, and EmbQ
  reads the hidden states after 7 layers) is wrapped (`EmbQDecoderLayer`);
- forward hooks on the `LlavaModel` find, per call, the query blocks in `input_ids` and
  the raw vision features (the vision tower's `vision_feature_layer` hidden states, CLS
  dropped under the "default" strategy: what LLaVA hands its projector, so the features
  before any compressor graft), whether the call encodes `pixel_values` itself or gets
  them pre-encoded from `generate`; they hand both to the wrapped layer as a keyword
  argument of that call;
- `generate` accepts `embq_instruction_map` (an instance-level `prepare_inputs_for_generation`
  that declares it, as peft does for its prompt-learning models) and never samples a
  query token (`generation_config.suppress_tokens`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import LlavaModel

from ._embq_files import save_embq_graft
from ._embq_hooks import CallRouter
from ._embq_layers import EmbQDecoderLayer, QueryEmbedding
from ._image_tokens import processor_image_token_count
from ._llava_parts import llava_core, projector_widths
from ._wrap import WrappedSubmodule, refuse_other_wrappers
from .prompt import INSTRUCTION_MAP_KEY, EncodedPrompt, build_prompt

__all__ = ["EmbQGraft", "graft_llava_embq", "graft_embq_onto", "DEFAULT_QUERY_TOKEN"]

#: Query token i is DEFAULT_QUERY_TOKEN.format(i) unless `query_tokens` names them.
DEFAULT_QUERY_TOKEN = "<query_{}>"


@dataclass
class _Changes:
    """What grafting changed outside the two wrappers, as it was before."""

    original_rows: int | None = None  # embedding rows before growing them, if grown
    had_vocab_size_attribute: bool = False
    suppress_tokens: Any = None
    generation_prepare: Any = None  # the instance attribute we shadowed, if any
    hooks: list[RemovableHandle] = field(default_factory=list)


class EmbQGraft:
    """What `graft_embq` changed, and how to undo, lift or save it.

    Attributes:
        model: the grafted model.
        embq: the EmbQ module (inside the wrapped decoder layer).
        layer: the 1-based decoder layer EmbQ runs before (its input is EmbQ's input).
        token_ids, query_tokens: the query tokens of one block, in order.
        dot_token_id: the "." token whose embedding the query vectors add to.
        tokenizer: the tokenizer that holds the query tokens.
    """

    def __init__(self, model: nn.Module, llava: LlavaModel, tokenizer: Any, layer: int,
                 query_tokens: list[str], token_ids: list[int], dot_token_id: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.query_tokens = tuple(query_tokens)
        self.token_ids = tuple(token_ids)
        self.dot_token_id = dot_token_id
        self._llava = llava
        self._embedding: WrappedSubmodule | None = None
        self._decoder_layer: WrappedSubmodule | None = None
        self._changes = _Changes()
        self._router: CallRouter | None = None

    # -- what is grafted ------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._decoder_layer is not None and self._decoder_layer.active

    @property
    def num_queries(self) -> int:
        return len(self.token_ids)

    @property
    def embq(self) -> nn.Module:
        return self._decoder_layer.wrapper.embq

    @property
    def query_vectors(self) -> nn.Parameter:
        return self._embedding.wrapper.query_vectors

    def parameters(self) -> Iterator[nn.Parameter]:
        """The graft's own parameters: EmbQ's, then the query vectors."""
        yield from self.embq.parameters()
        yield self.query_vectors

    def build_prompt(
        self, messages: Sequence[Mapping[str, Any]], *, processor: Any | None = None, **kwargs: Any
    ) -> EncodedPrompt:
        """`build_prompt` with this graft's tokenizer and query tokens and the model's image token.

        Image placeholders per image, unless `num_image_tokens=` is given: as many as
        `processor` (a LlavaProcessor; after a compressor graft, the grafted one) writes,
        else the config's `image_seq_length` (which a compressor graft keeps up to date).
        """
        config = self._llava.config
        kwargs.setdefault("image_token_id", config.image_token_id)
        if "num_image_tokens" not in kwargs:
            if processor is not None:
                image_size = (config.vision_config.image_size,) * 2
                kwargs["num_image_tokens"] = processor_image_token_count(processor, image_size)
            else:
                kwargs["num_image_tokens"] = config.image_seq_length
        return build_prompt(messages, self.tokenizer, query_token_ids=self.token_ids, **kwargs)

    # -- undo -------------------------------------------------------------------------------
    def remove(self) -> None:
        """Put the model back as it was (bit-identical outputs); the tokenizer keeps the tokens."""
        if not self.active:
            raise RuntimeError("this EmbQ graft was already removed")
        self._undo()

    def _undo(self) -> None:
        """Undo whatever of the graft is in place (all of it, or what a failed graft did)."""
        # Unwrap first: it raises, before anything else changes, if a later graft sits on top.
        for wrapped in (self._decoder_layer, self._embedding):
            if wrapped is not None and wrapped.active:
                wrapped.remove()
        changes = self._changes
        for hook in changes.hooks:
            hook.remove()
        changes.hooks.clear()
        if changes.generation_prepare is not None:
            self.model.prepare_inputs_for_generation = changes.generation_prepare
        else:
            self.model.__dict__.pop("prepare_inputs_for_generation", None)
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:
            generation_config.suppress_tokens = changes.suppress_tokens
        if changes.original_rows is not None:
            self.model.resize_token_embeddings(changes.original_rows, mean_resizing=False)
            if not changes.had_vocab_size_attribute:
                self.model.__dict__.pop("vocab_size", None)
            changes.original_rows = None

    @contextmanager
    def lifted(self) -> Iterator[None]:
        """Within the block the model is ungrafted (the wrappers lifted, the hooks idle),
        except for its grown vocabulary; e.g. to save it with its own `save_pretrained`."""
        if not self.active:
            raise RuntimeError("this EmbQ graft was removed")
        generation_config = getattr(self.model, "generation_config", None)
        grafted_suppress = generation_config.suppress_tokens if generation_config is not None else None
        with ExitStack() as stack:
            stack.enter_context(self._decoder_layer.lifted())
            stack.enter_context(self._embedding.lifted())
            self._router.enabled = False
            if generation_config is not None:
                generation_config.suppress_tokens = self._changes.suppress_tokens
            try:
                yield
            finally:
                self._router.enabled = True
                if generation_config is not None:
                    generation_config.suppress_tokens = grafted_suppress

    # -- save -------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, *, save_base_model: bool = False) -> None:
        """Write the graft (settings JSON + safetensors weights) to `folder`.

        With `save_base_model=True`, also the ungrafted model (its own `save_pretrained`,
        with the grown vocabulary) and the tokenizer (with the query tokens), so that
        `from_pretrained` + `load_embq_graft` on `folder` give this grafted model back.
        That refuses (RuntimeError) while another graft is in the model: save a model
        with several grafts with `save_grafted(model, folder, *grafts)`.
        """
        if not save_base_model:
            save_embq_graft(self, folder)
            return
        with self.lifted():  # raises if the graft was removed
            refuse_other_wrappers(self.model)  # before any file is written
            save_embq_graft(self, folder)
            self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"EmbQGraft(layer={self.layer}, num_queries={self.num_queries}, {state})"


def _path_of(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def _add_query_tokens(tokenizer: Any, query_tokens: list[str]) -> list[int]:
    """The ids of `query_tokens`, adding the missing ones as special tokens."""
    from tokenizers import AddedToken

    vocabulary = tokenizer.get_vocab()
    missing = [token for token in query_tokens if token not in vocabulary]
    if missing:
        # add_tokens(special_tokens=True) leaves the tokenizer's named special tokens as they are.
        new_tokens = [AddedToken(token, special=True, normalized=False) for token in missing]
        tokenizer.add_tokens(new_tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(query_tokens)
    if len(set(ids)) != len(ids):
        raise ValueError(f"the query tokens {query_tokens} do not have distinct ids: {ids}")
    return list(ids)


def _resolve_dot(tokenizer: Any, dot_token: str, dot_token_id: int | None) -> int:
    if dot_token_id is not None:
        return int(dot_token_id)
    ids = tokenizer(dot_token, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return int(ids[0])
    token_id = tokenizer.convert_tokens_to_ids(dot_token)
    if token_id is not None and token_id != getattr(tokenizer, "unk_token_id", None):
        return int(token_id)
    raise ValueError(f"{dot_token!r} is not one token for this tokenizer ({ids}); pass dot_token_id=")


def graft_llava_embq(
    model: nn.Module,
    embq: nn.Module,
    *,
    layer: int,
    tokenizer: Any,
    num_queries: int = 9,
    query_tokens: Sequence[str] | None = None,
    dot_token: str = ".",
    dot_token_id: int | None = None,
) -> EmbQGraft:
    """`graft_embq` for LLaVA: add `num_queries` query tokens and run `embq` on them
    before decoder layer `layer`.

    Args:
        model: a transformers LLaVA model (`LlavaForConditionalGeneration` or `LlavaModel`).
        embq: a `tokencompress.EmbQ` (text_dim = the LLM's width, vision_dim = the
            selected vision features' width); moved to the embedding's device and dtype.
        layer: 1-based, as the paper counts: layer=8 applies EmbQ to the input of the 8th
            decoder layer (`layers[7]`), the hidden states after 7 layers; 1..num_layers.
        tokenizer: gets the query tokens (special tokens) if it lacks them.
        num_queries: query tokens per block (FlashSloth: 9).
        query_tokens: their strings; default "<query_0>", "<query_1>", ...
        dot_token, dot_token_id: the token whose embedding the query vectors add to.

    Returns:
        an `EmbQGraft`: `remove()` undoes it, `save_pretrained(folder)` saves it.
    """
    llava = llava_core(model, "graft_embq")
    vision_dim, text_dim = projector_widths(llava.config)
    return graft_embq_onto(
        EmbQGraft, CallRouter, model, llava, embq,
        text_dim=text_dim, vision_dim=vision_dim,
        vision_input="the width of the selected vision features, before the projector",
        layer=layer, tokenizer=tokenizer, num_queries=num_queries,
        query_tokens=query_tokens, dot_token=dot_token, dot_token_id=dot_token_id,
    )


_Graft = TypeVar("_Graft", bound=EmbQGraft)


def graft_embq_onto(
    graft_class: type[_Graft],
    router_class: type[CallRouter],
    model: nn.Module,
    llava: nn.Module,
    embq: nn.Module,
    *,
    text_dim: int,
    vision_dim: int,
    vision_input: str,
    layer: int,
    tokenizer: Any,
    num_queries: int,
    query_tokens: Sequence[str] | None,
    dot_token: str,
    dot_token_id: int | None,
) -> _Graft:
    """`graft_embq` onto `model` whose multimodal core is `llava` (a `LlavaModel`, or
    another backbone's core with the handle and `router_class` for its vision features).

    `text_dim` and `vision_dim` are the widths `embq` must have; `vision_input` says
    what its vision input is on this backbone, for the error message.
    """
    num_layers = len(llava.language_model.layers)
    if not isinstance(layer, int) or not 1 <= layer <= num_layers:
        raise ValueError(f"layer must be a 1-based decoder layer number in 1..{num_layers}, got {layer!r}")
    if any(isinstance(module, (EmbQDecoderLayer, QueryEmbedding)) for module in model.modules()):
        raise ValueError("this model already has an EmbQ graft; remove() it first")
    for name, expected in (("text_dim", text_dim), ("vision_dim", vision_dim)):
        value = getattr(embq, name, None)
        if value != expected:
            raise ValueError(
                f"embq.{name} is {value}, but this model needs {expected} (text_dim: the LLM's hidden "
                f"size; vision_dim: {vision_input})"
            )
    if not callable(getattr(embq, "forward_packed", None)):
        raise TypeError(f"embq must have EmbQ's forward_packed entry point; {type(embq).__name__} has none")
    if query_tokens is None:
        query_tokens = [DEFAULT_QUERY_TOKEN.format(i) for i in range(num_queries)]
    query_tokens = list(query_tokens)
    if len(query_tokens) != num_queries or num_queries < 1:
        raise ValueError(
            f"need num_queries >= 1 query token strings, got {len(query_tokens)} for {num_queries}"
        )

    dot_id = _resolve_dot(tokenizer, dot_token, dot_token_id)
    token_ids = _add_query_tokens(tokenizer, query_tokens)
    graft = graft_class(model, llava, tokenizer, layer, query_tokens, token_ids, dot_id)
    try:
        _apply(graft, model, llava, embq, router_class)
    except Exception:
        graft._undo()
        raise
    return graft


def _apply(
    graft: EmbQGraft, model: nn.Module, llava: nn.Module, embq: nn.Module, router_class: type[CallRouter]
) -> None:
    """Make the changes `graft` records, in the order `EmbQGraft._undo` can take back."""
    changes, token_ids = graft._changes, list(graft.token_ids)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        changes.suppress_tokens = generation_config.suppress_tokens
    changes.generation_prepare = model.__dict__.get("prepare_inputs_for_generation")

    rows = model.get_input_embeddings().weight.shape[0]
    if max(token_ids) >= rows:
        changes.had_vocab_size_attribute = "vocab_size" in model.__dict__
        # Plain normal init for the new rows: their input embedding is never read (query
        # tokens embed through "."), and the mean-resizing default costs a covariance.
        model.resize_token_embeddings(max(len(graft.tokenizer), max(token_ids) + 1), mean_resizing=False)
        changes.original_rows = rows

    embedding = model.get_input_embeddings()
    embq.to(device=embedding.weight.device, dtype=embedding.weight.dtype)
    graft._embedding = WrappedSubmodule.install(
        model, _path_of(model, embedding), lambda base: QueryEmbedding(base, token_ids, graft.dot_token_id)
    )
    decoder_layer = llava.language_model.layers[graft.layer - 1]
    graft._decoder_layer = WrappedSubmodule.install(
        model, _path_of(model, decoder_layer), lambda base: EmbQDecoderLayer(base, embq)
    )
    graft._router = router_class(llava, token_ids, embq)
    changes.hooks += graft._router.install(model)
    if generation_config is not None:
        generation_config.suppress_tokens = sorted(set(changes.suppress_tokens or []) | set(token_ids))
    if hasattr(model, "prepare_inputs_for_generation"):
        model.prepare_inputs_for_generation = _prepare_with_instruction_map(model.prepare_inputs_for_generation)


def _prepare_with_instruction_map(prepare: Any) -> Any:
    """`prepare_inputs_for_generation` that also takes the instruction map.

    Declaring the argument is what lets `generate` accept it (it checks model kwargs
    against this signature, which is otherwise the original's). The map is aligned with
    the full `input_ids` that generate passes; it is extended with 0 over the generated
    tokens (never instruction) and cut to the tokens of this step, as transformers does
    for `token_type_ids`.
    """

    def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> dict:
        instruction_map = kwargs.pop(INSTRUCTION_MAP_KEY, None)
        inputs = prepare(*args, **kwargs)
        if instruction_map is None:
            return inputs
        all_ids = args[0] if args else kwargs["input_ids"]
        step_ids = inputs.get("input_ids")
        if step_ids is None or all_ids.shape[1] == 0:  # a prompt given as inputs_embeds
            inputs[INSTRUCTION_MAP_KEY] = instruction_map
            return inputs
        known = instruction_map.shape[1]
        if known > all_ids.shape[1]:
            raise ValueError(f"{INSTRUCTION_MAP_KEY} has {known} columns but input_ids only {all_ids.shape[1]}")
        full = torch.nn.functional.pad(instruction_map, (0, all_ids.shape[1] - known))
        inputs[INSTRUCTION_MAP_KEY] = full[:, full.shape[1] - step_ids.shape[1]:]
        return inputs

    signature = inspect.signature(prepare)
    parameters = list(signature.parameters.values())
    extra = inspect.Parameter(INSTRUCTION_MAP_KEY, inspect.Parameter.KEYWORD_ONLY, default=None)
    at = len(parameters) - (parameters[-1].kind is inspect.Parameter.VAR_KEYWORD if parameters else 0)
    parameters = [*parameters[:at], extra, *parameters[at:]]
    prepare_inputs_for_generation.__signature__ = signature.replace(parameters=parameters)
    return prepare_inputs_for_generation
