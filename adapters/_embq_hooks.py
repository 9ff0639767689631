"""Per forward call, hand the grafted decoder layer what EmbQ needs for that call.

Hooks on the `LlavaModel` (and on the model with the LM head) do it, in order:
1. LlavaModel pre-hook: take the instruction map out of the call's keyword arguments,
   find the query blocks in `input_ids` (`plan_query_blocks`) and, when there are some,
   arrange to see the vision tower's output of this call (or take the pre-encoded one
   that `generate` passes in);
2. language model pre-hook: select the raw vision features, group them per sample, and
   put an `EmbQCall` into the keyword arguments of the language model, which passes them
   on to every decoder layer; the grafted one uses it, the others ignore it;
3. LlavaModel hook (also on errors): end the call.
The state between 1 and 3 lives on a per-thread stack only for the duration of the call;
the layer reads nothing but its own call's arguments, so a gradient-checkpointing re-run
of it (after the call ended) sees the very same `EmbQCall`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._embq_call import BlockPlan, EmbQCall, group_vision, plan_query_blocks, select_raw_vision
from ._embq_layers import CALL_KEY
from .prompt import INSTRUCTION_MAP_KEY

__all__ = ["CallRouter"]


@dataclass
class _CallState:
    """One forward call of the LlavaModel, from its pre-hook to its hook."""

    input_ids: torch.Tensor | None
    feature_layer: Any = None  # which vision features EmbQ reads (LLaVA's arguments)
    select_strategy: Any = None
    plan: BlockPlan | None = None
    vision_output: Any = None  # the vision tower's output for this call's images
    encoded: bool = False  # vision_output came pre-encoded with the call (generate)
    capture: RemovableHandle | None = None

    def capture_output_of(self, tower: nn.Module) -> None:
        """Keep `tower`'s output as `vision_output` (until the call ends)."""

        def capture(_tower: nn.Module, _args: tuple, output: Any) -> None:
            self.vision_output = output

        self.capture = tower.register_forward_hook(capture)


def _first_given(value: Any, default: Any) -> Any:
    return default if value is None else value


class CallRouter:
    """The hooks of one EmbQ graft; `enabled = False` makes them pass calls through.

    Another backbone's router overrides the last three methods: which vision features
    EmbQ reads, and where they come from.
    """

    def __init__(self, llava: nn.Module, query_token_ids: Sequence[int], embq: nn.Module) -> None:
        self.llava = llava
        self.embq = embq
        self.enabled = True
        self._token_ids = tuple(query_token_ids)
        self._query_ids: dict[torch.device, torch.Tensor] = {}
        self._local = threading.local()  # the stack of calls in flight, per thread

    def install(self, model: nn.Module) -> list[RemovableHandle]:
        """Register the hooks; `model` is the LlavaModel or the model around it."""
        llava = self.llava
        handles = [
            llava.register_forward_pre_hook(self._on_llava_call, with_kwargs=True),
            llava.register_forward_hook(self._on_llava_return, with_kwargs=True, always_call=True),
            llava.language_model.register_forward_pre_hook(self._on_language_model_call, with_kwargs=True),
        ]
        if model is not llava:
            handles.append(model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        return handles

    def query_ids(self, device: torch.device) -> torch.Tensor:
        if device not in self._query_ids:
            self._query_ids[device] = torch.tensor(self._token_ids, dtype=torch.long, device=device)
        return self._query_ids[device]

    def _calls(self) -> list[_CallState]:
        if not hasattr(self._local, "calls"):
            self._local.calls = []
        return self._local.calls

    def _on_llava_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Plan the call's query blocks; arrange to see its vision tower output."""
        instruction_map = kwargs.pop(INSTRUCTION_MAP_KEY, None)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        state = self._call_state(module, input_ids, kwargs)
        # Pushed first: the hook that ends the call runs even when planning raises.
        self._calls().append(state)
        if not self.enabled:
            return args, kwargs
        if input_ids is None:
            if instruction_map is not None and bool((instruction_map != 0).any()):
                raise ValueError("EmbQ finds its query blocks in input_ids; this call passes inputs_embeds only")
            return args, kwargs
        state.plan = plan_query_blocks(
            input_ids, instruction_map, self.query_ids(input_ids.device), kwargs.get("attention_mask")
        )
        if state.plan is None:  # no query block in this call (a decoding step, a plain prompt)
            return args, kwargs
        self._watch_vision(module, state, kwargs)
        return args, kwargs

    def _on_language_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Give the decoder layers this call's `EmbQCall`."""
        calls = self._calls()
        if not calls or calls[-1].plan is None:
            return None
        state = calls[-1]
        vision, cu_seqlens_vision = self._vision(state)
        kwargs[CALL_KEY] = EmbQCall(state.plan, vision, cu_seqlens_vision)
        return args, kwargs

    def _on_llava_return(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """End the call (also when it raised)."""
        calls = self._calls()
        if calls:
            state = calls.pop()
            if state.capture is not None:
                state.capture.remove()

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Query tokens are never targets of the loss."""
        labels, input_ids = kwargs.get("labels"), kwargs.get("input_ids", args[0] if args else None)
        if not self.enabled or labels is None or input_ids is None or labels.shape != input_ids.shape:
            return None
        kwargs["labels"] = labels.masked_fill(torch.isin(input_ids, self.query_ids(input_ids.device)), -100)
        return args, kwargs

    # -- which vision features EmbQ reads, and where from --------------------------------
    def _call_state(self, module: nn.Module, input_ids: torch.Tensor | None, kwargs: dict) -> _CallState:
        """The state of a call of `module` (the LlavaModel) with keyword arguments `kwargs`."""
        config = module.config
        return _CallState(
            input_ids,
            _first_given(kwargs.get("vision_feature_layer"), config.vision_feature_layer),
            _first_given(kwargs.get("vision_feature_select_strategy"), config.vision_feature_select_strategy),
        )

    def _watch_vision(self, module: nn.Module, state: _CallState, kwargs: dict) -> None:
        """Arrange for `state` to get the vision tower output of a call with query blocks."""
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            # generate() encodes the images before prefill and passes the outputs in.
            state.vision_output, state.encoded = encoded, True
        else:
            state.capture_output_of(module.vision_tower)

    def _vision(self, state: _CallState) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's raw vision features packed per batch row, and their cumulative lengths."""
        raw_vision, num_call_images = None, 0
        if state.vision_output is not None:
            raw_vision = select_raw_vision(state.vision_output, state.feature_layer, state.select_strategy)
            # generate() expands pre-encoded outputs for beams, pooler_output only: the
            # images of the call are counted there.
            projected = getattr(state.vision_output, "pooler_output", None)
            num_call_images = len(projected) if state.encoded and projected is not None else raw_vision.shape[0]
        return group_vision(
            state.input_ids,
            self.llava.config.image_token_id,
            raw_vision,
            num_call_images,
            self.embq.vision_dim,
            next(self.embq.parameters()).dtype,
        )
