"""FastV: prune image tokens inside the LLM, removably (Chen et al., ECCV 2024, "An Image
is Worth 1/2 Tokens After Layer 2").

    fastv = graft_fastv(model, layer=2, keep=0.5)   # layers 1-2 see every token, then half the images
    model.generate(**inputs, max_new_tokens=32)
    fastv.remove()

On a prefill (a prompt run from an empty cache), FastV ranks each prompt's image tokens
by the attention its last token pays them in decoder layer `layer` (1-based: the last
layer that sees every token), averaged over heads, and keeps the `keep` best of them and
every other token, in order. The layers after it run on that shorter sequence: their
hidden states, mask, rotary positions (each kept token keeps its original position, 3-D
mRoPE included) and KV cache hold only the kept tokens. Decoding goes on from that cache.

What the graft changes, all undone by `remove()`:
- decoder layers `layer` .. N (1-based) are wrapped (`FastVDecoderLayer`): the first
  ranks, the second prunes, all from the second on run on the kept tokens;
- hooks on the multimodal core and its language model hand the wrapped layers a
  `FastVCall` per forward call (where the image tokens are, which tokens are kept);
- a prefill leaves what it kept on the cache object it filled, which the decoding steps
  read back (that cache's layers from `layer` + 1 on hold only the kept tokens);
- the model's `generate` (an instance attribute) says where the prompt ends, so that a
  generation without the cache, which re-runs prompt and answer at every step, still
  ranks by the prompt's last token and equals the cached one.

The output of a pruning call covers the kept positions only: its logits are
(batch, kept tokens, vocab), and `generate` reads the last one, the prompt's last token.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._fastv_call import PROMPT_END, QUERY_INDEX_KEY, kept_count
from ._fastv_hooks import FastVRouter
from ._fastv_layers import FastVDecoderLayer, Role
from ._fastv_scores import check_scorable
from ._instance_override import InstanceOverride
from ._wrap import WrappedSubmodule
from .families import family_of

__all__ = ["FastVGraft", "graft_fastv", "QUERY_INDEX_KEY"]


class FastVGraft:
    """What `graft_fastv` changed, and how to undo or lift it.

    Attributes:
        model: the grafted model.
        layer: 1-based; layers 1..`layer` see every token, the later ones the kept tokens.
        keep: image tokens kept per prompt: an int count, or a float ratio of them.
        image_token_id: the token whose positions are the image tokens.
    """

    def __init__(self, model: nn.Module, layer: int, keep: int | float, image_token_id: int) -> None:
        self.model = model
        self.layer = layer
        self.keep = keep
        self.image_token_id = image_token_id
        self._layers: list[WrappedSubmodule] = []
        self._hooks: list[RemovableHandle] = []
        self._router: FastVRouter | None = None
        self._generate: InstanceOverride | None = None

    @property
    def active(self) -> bool:
        return bool(self._layers) and all(wrapped.active for wrapped in self._layers)

    def num_kept(self, num_image_tokens: int) -> int:
        """How many of a prompt's `num_image_tokens` image tokens the graft keeps.

        A ratio is rounded half up (`floor(keep * n + 0.5)`), and keeps at least one.
        """
        return kept_count(self.keep, num_image_tokens)

    def remove(self) -> None:
        """Put the model back as it was (bit-identical outputs)."""
        if not self.active:
            raise RuntimeError("this FastV graft was already removed")
        self._undo()

    def _undo(self) -> None:
        """Undo whatever of the graft is in place (all of it, or what a failed graft did)."""
        # Raise, before anything changes, if a graft made later wraps one of ours.
        if self._generate is not None and self._generate.active:
            self._generate.check_removable()
        for wrapped in self._layers:
            current = wrapped.root.get_submodule(wrapped.path) if wrapped.active else wrapped.wrapper
            if current is not wrapped.wrapper:
                raise RuntimeError(
                    f"{wrapped.path!r} is now a {type(current).__name__}, not FastV's wrapper; remove the grafts "
                    "made after this one first (last made, first removed)"
                )
        for wrapped in reversed(self._layers):
            if wrapped.active:
                wrapped.remove()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._generate is not None and self._generate.active:
            self._generate.remove()

    @contextmanager
    def lifted(self) -> Iterator[None]:
        """Within the block the model is ungrafted (the wrappers lifted, the hooks idle), e.g.
        to save it with its own `save_pretrained` or `save_grafted` with other grafts."""
        if not self.active:
            raise RuntimeError("this FastV graft was removed")
        with ExitStack() as stack:
            for wrapped in reversed(self._layers):
                stack.enter_context(wrapped.lifted())
            self._router.enabled = False
            try:
                yield
            finally:
                self._router.enabled = True

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"FastVGraft(layer={self.layer}, keep={self.keep!r}, {state})"


def _path_of(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def _check_keep(keep: Any) -> int | float:
    """`keep` as an int count (>= 1) or a float ratio in (0, 1]; ValueError otherwise."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep must be an int count >= 1 or a float ratio in (0, 1] of the image tokens, got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep must be an int count >= 1 (or a float ratio in (0, 1]), got {keep!r}")
        return int(keep)
    if not 0.0 < float(keep) <= 1.0:  # also refuses NaN
        raise ValueError(f"keep as a ratio of the image tokens must be in (0, 1], got {keep!r}")
    return float(keep)


def _image_token_id(core: nn.Module) -> int:
    config = core.config
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)  # LLaVA's older name
    if not isinstance(token_id, int):
        raise ValueError(f"graft_fastv needs the config's image_token_id, got {token_id!r}")
    return token_id


def _check_text_model(core: nn.Module, layer: int) -> None:
    """Refuse what FastV's shortened layers cannot follow: sliding windows, DeepStack after `layer`."""
    text_config = core.config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None) or ()
    if any(kind != "full_attention" for kind in layer_types) or getattr(text_config, "use_sliding_window", False):
        raise ValueError(
            "graft_fastv supports language models whose layers all use full attention; this one has "
            f"{list(layer_types) or 'sliding windows'}"
        )
    # Qwen3-VL's DeepStack adds vision features to the image tokens' hidden states after its
    # first layers, at the positions of the full sequence: those layers must see every token.
    deepstack = getattr(getattr(core.config, "vision_config", None), "deepstack_visual_indexes", None)
    if deepstack and layer < len(deepstack):
        raise ValueError(
            f"layer must be at least {len(deepstack)} on this model: DeepStack adds vision features after "
            f"decoder layers 1..{len(deepstack)}, which must see every token; got layer={layer}"
        )


def graft_fastv(model: nn.Module, *, layer: int, keep: int | float) -> FastVGraft:
    """Graft FastV onto `model`: after decoder layer `layer`, keep only `keep` image tokens.

    Args:
        model: a model of a family in `tokencompress.adapters.FAMILIES` (with or without
            the LM head) whose decoder layers FastV can recompute (Llama, Qwen2, Qwen3,
            Phi and the Qwen-VL text models; full attention only).
        layer: 1-based, as the paper's K: layers 1..K see every token, and FastV ranks the
            image tokens by the attention of layer K; 1 <= layer < number of layers.
        keep: image tokens kept per prompt: an int count >= 1, or a float ratio in (0, 1]
            of each prompt's image tokens, rounded half up (at least 1 token).

    Returns:
        a `FastVGraft`: `remove()` undoes it.

    Raises:
        ValueError: a bad `layer` or `keep`, a model FastV cannot follow, a second FastV
            graft, or another graft already wrapping a layer from `layer` on.
        TypeError: a model of no supported family.
    """
    family = family_of(model, "graft_fastv")
    core = family.core(model, "graft_fastv")
    layers = core.get_submodule(family.decoder_layers)
    num_layers = len(layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
        raise ValueError(
            f"layer must be an int in 1..{num_layers - 1} (1-based: the last layer that sees every token; "
            f"this model has {num_layers}), got {layer!r}"
        )
    keep = _check_keep(keep)
    if any(isinstance(module, FastVDecoderLayer) for module in model.modules()):
        raise ValueError("this model already has a FastV graft; remove() it first")
    for index in range(layer - 1, num_layers):
        if isinstance(getattr(layers[index], "base_layer", None), nn.Module):
            raise ValueError(
                f"decoder layer {index + 1} is already wrapped ({type(layers[index]).__name__}): FastV wraps layers "
                f"{layer}..{num_layers} and sees the pruned sequence from layer {layer + 1}. Graft FastV first, or "
                f"the other graft on a layer before {layer}"
            )
    check_scorable(layers[layer - 1], "graft_fastv")
    _check_text_model(core, layer)

    graft = FastVGraft(model, layer, keep, _image_token_id(core))
    try:
        _apply(graft, model, core, layers)
    except Exception:
        graft._undo()
        raise
    return graft


def _apply(graft: FastVGraft, model: nn.Module, core: nn.Module, layers: nn.ModuleList) -> None:
    """Wrap layers K-1..N-1 (0-based) and install the hooks, in the order `_undo` takes back."""
    first = graft.layer  # 0-based index of the first layer that sees only the kept tokens
    layers_path = _path_of(model, layers)
    wrappers: dict[int, FastVDecoderLayer] = {}
    for index in range(first - 1, len(layers)):
        role: Role = "score" if index == first - 1 else "prune" if index == first else "follow"
        wrapped = WrappedSubmodule.install(
            model, f"{layers_path}.{index}", lambda base, role=role: FastVDecoderLayer(base, role, first)
        )
        graft._layers.append(wrapped)
        wrappers[index] = wrapped.wrapper
    graft._router = FastVRouter(core, layers, wrappers, first, graft.keep, graft.image_token_id)
    graft._hooks += graft._router.install(core.language_model)
    if callable(getattr(model, "generate", None)):
        graft._generate = InstanceOverride.install(model, "generate", _generate_with_prompt_end)


def _generate_with_prompt_end(generate: Callable[..., Any]) -> Callable[..., Any]:
    """`generate`, telling FastV where the prompt ends (`PROMPT_END`) for the call's duration."""

    @functools.wraps(generate)
    def generate_with_prompt_end(*args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        prompt_end = input_ids.shape[-1] - 1 if isinstance(input_ids, torch.Tensor) else None
        token = PROMPT_END.set(prompt_end)
        try:
            return generate(*args, **kwargs)
        finally:
            PROMPT_END.reset(token)

    return generate_with_prompt_end
