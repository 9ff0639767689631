"""Convert the authors' published checkpoints (FlashSloth-3.2B, FlashSloth_HD-3.2B).

    python -m recipes.flashsloth.convert --source path/to/FlashSloth-3.2B --out flashsloth
    python -m recipes.flashsloth.convert --source path/to/FlashSloth_HD-3.2B --out flashsloth-hd --hd

The source is a local folder as published: ``config.json``, ``model.safetensors`` or
``model.safetensors.index.json`` + shards, and the tokenizer's files. Every tensor of the
release is mapped to one tensor of this project's model and every tensor of the model
must come from one of the release's: an unmapped, missing, repeated or misshapen tensor
is an error that lists them. Nothing is unpickled and no code from the folder runs.

The release's names (``FlashSlothForCausalLM``, read from ``codefanw/FlashSloth``):

====================================================================  ===============================================
release                                                               canonical (`FlashSloth.canonical_state_dict`)
====================================================================  ===============================================
model.vision_tower.vision_tower.vision_model.embeddings.*             model.vision_tower.embeddings.*
model.vision_tower.vision_tower.vision_model.encoder.layers.{i}.*     model.vision_tower.encoder.layers.{i}.*
model.pooling.mlp.{0,3}.*                                             compressor.score.{0,3}.*   (SAP)
model.mm_projector.{0,2}.*                                            model.multi_modal_projector.linear_{1,2}.*
model.embed_tokens.weight                                             model.language_model.embed_tokens.weight
model.layers.{i}.{self_attn,mlp,input_layernorm}.*                    model.language_model.layers.{i}.(same)
model.final_layernorm.*                                               model.language_model.final_layernorm.*
lm_head.{weight,bias}                                                 lm_head.{weight,bias}
model.learnable_tokens.token                                          query_vectors
model.lqformer.down_projector_learnable_text.*                        embq.down_text.*
model.lqformer.down_projector_image.*                                 embq.down_vision.*
model.lqformer.layers.0.{ln_q,ln_text,ln_kv}.*                        embq.{norm_query,norm_text,norm_vision}.*
model.lqformer.layers.0.{t2q_attn,i2q_attn}.{q,k,v}_proj.*            embq.{text_attn,vision_attn}.{q,k,v}_proj.*
model.lqformer.up_projector.*                                         embq.up.*
====================================================================  ===============================================

Notes on the release:
- Its phi-2 is transformers' Phi layout (separate ``q_proj``/``k_proj``/``v_proj`` and
  ``dense``; ``mlp.fc1``/``fc2``; ``input_layernorm``; ``final_layernorm``), so no fused
  QKV is split. Its rotary ``inv_freq`` buffers are not persistent.
- Its SigLIP keeps 26 of 27 encoder layers (``mm_vision_select_layer`` -2) and replaces
  ``post_layernorm`` and ``head`` by identities, so none of those are stored; a
  ``position_ids`` buffer, if stored, is checked to be 0..N-1 and dropped.
- The query tokens' embedding adds the word embedding of token id 764 (hard-coded in the
  release's ``prepare_inputs_labels_for_multimodal``; in phi-2's GPT-2 vocabulary this is
  " .", with its leading space), so the converted EmbQ graft uses ``dot_token_id=764``.
- HD and non-HD checkpoints have the same tensors; ``--hd`` selects the 5-view input.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from .model import FlashSloth, FlashSlothConfig, build_flashsloth, read_safetensors

__all__ = [
    "RELEASE_DOT_TOKEN_ID",
    "ConversionError",
    "canonical_name",
    "convert_release_checkpoint",
    "main",
    "map_release_state_dict",
    "read_release_state_dict",
]

RELEASE_DOT_TOKEN_ID = 764

_VISION = r"model\.vision_tower\.vision_tower\.vision_model\."
_WB = r"(weight|bias)"
_VISION_LAYER = r"encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])"
_PHI_LAYER = r"layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|dense)|mlp\.fc[12]|input_layernorm)"

# (release pattern, canonical replacement); patterns are anchored and tried in order.
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"{_VISION}(embeddings\.(?:patch_embedding\.{_WB}|position_embedding\.weight))"),
     r"model.vision_tower.\1"),
    (re.compile(rf"{_VISION}({_VISION_LAYER}\.{_WB})"), r"model.vision_tower.\1"),
    (re.compile(rf"model\.pooling\.mlp\.([03])\.{_WB}"), r"compressor.score.\1.\2"),
    (re.compile(rf"model\.mm_projector\.0\.{_WB}"), r"model.multi_modal_projector.linear_1.\1"),
    (re.compile(rf"model\.mm_projector\.2\.{_WB}"), r"model.multi_modal_projector.linear_2.\1"),
    (re.compile(r"model\.(embed_tokens\.weight)"), r"model.language_model.\1"),
    (re.compile(rf"model\.({_PHI_LAYER}\.{_WB})"), r"model.language_model.\1"),
    (re.compile(rf"model\.(final_layernorm\.{_WB})"), r"model.language_model.\1"),
    (re.compile(rf"lm_head\.{_WB}"), r"lm_head.\1"),
    (re.compile(r"model\.learnable_tokens\.token"), "query_vectors"),
    (re.compile(rf"model\.lqformer\.down_projector_learnable_text\.{_WB}"), r"embq.down_text.\1"),
    (re.compile(rf"model\.lqformer\.down_projector_image\.{_WB}"), r"embq.down_vision.\1"),
    (re.compile(rf"model\.lqformer\.layers\.0\.ln_q\.{_WB}"), r"embq.norm_query.\1"),
    (re.compile(rf"model\.lqformer\.layers\.0\.ln_text\.{_WB}"), r"embq.norm_text.\1"),
    (re.compile(rf"model\.lqformer\.layers\.0\.ln_kv\.{_WB}"), r"embq.norm_vision.\1"),
    (re.compile(rf"model\.lqformer\.layers\.0\.t2q_attn\.([qkv]_proj)\.{_WB}"), r"embq.text_attn.\1.\2"),
    (re.compile(rf"model\.lqformer\.layers\.0\.i2q_attn\.([qkv]_proj)\.{_WB}"), r"embq.vision_attn.\1.\2"),
    (re.compile(rf"model\.lqformer\.up_projector\.{_WB}"), r"embq.up.\1"),
]

# Derived buffers the release may store: checked, then dropped.
_POSITION_IDS = re.compile(rf"{_VISION}embeddings\.position_ids")

# The release config's fields that must agree with the model built here.
_RELEASE_CONFIG_FIELDS = {
    "hidden_size": lambda c: c.text["hidden_size"],
    "num_hidden_layers": lambda c: c.text["num_hidden_layers"],
    "num_attention_heads": lambda c: c.text["num_attention_heads"],
    "intermediate_size": lambda c: c.text["intermediate_size"],
    "vocab_size": lambda c: c.text["vocab_size"],
    "mm_hidden_size": lambda c: c.vision["hidden_size"],
    "mm_projector_type": lambda c: "mlp2x_gelu",
    "mm_vision_select_layer": lambda c: -2,
}


class ConversionError(ValueError):
    """The release checkpoint does not map one-to-one onto the model; lists the tensors."""


def canonical_name(release_name: str) -> str | None:
    """The canonical name of a release tensor, or None if no rule maps it."""
    for pattern, replacement in _RULES:
        match = pattern.fullmatch(release_name)
        if match:
            return match.expand(replacement)
    return None


def read_release_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """The release's tensors: ``model.safetensors``, or the shards its index lists."""
    return read_safetensors(source)


def _check_derived_buffer(name: str, tensor: torch.Tensor) -> None:
    expected = torch.arange(tensor.shape[-1]).expand_as(tensor)
    if not torch.equal(tensor.to(torch.long), expected):
        raise ConversionError(f"{name} is not the positions 0..{tensor.shape[-1] - 1}")


def _listing(title: str, names: Sequence[str]) -> str:
    return f"{title} ({len(names)}):\n  " + "\n  ".join(names)


def map_release_state_dict(
    release: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size | Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Rename the release's tensors to canonical names, checking them against `expected`
    (canonical name -> shape, e.g. from `FlashSloth.canonical_state_dict()`).

    Raises `ConversionError` listing every unmapped, repeated, missing or misshapen tensor.
    """
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped, repeated, wrong_shape = [], [], []
    misshapen: set[str] = set()
    for name in sorted(release):
        tensor = release[name]
        if _POSITION_IDS.fullmatch(name):
            _check_derived_buffer(name, tensor)
            continue
        target = canonical_name(name)
        if target is None or target not in expected:
            unmapped.append(name if target is None else f"{name} -> {target} (not in the model)")
        elif target in mapped:
            repeated.append(f"{name} and {origin[target]} -> {target}")
        elif tuple(tensor.shape) != tuple(expected[target]):
            wrong_shape.append(f"{name}: {tuple(tensor.shape)}, the model's {target}: {tuple(expected[target])}")
            misshapen.add(target)
        else:
            mapped[target], origin[target] = tensor, name
    missing = sorted(set(expected) - set(mapped) - misshapen)
    problems = [
        _listing(title, names)
        for title, names in (
            ("release tensors with no place in the model", unmapped),
            ("model tensors the release does not provide", missing),
            ("release tensors mapped twice", repeated),
            ("tensors of the wrong shape", wrong_shape),
        )
        if names
    ]
    if problems:
        raise ConversionError("the release checkpoint does not match the model:\n" + "\n".join(problems))
    return mapped


def _check_release_config(source: Path, config: FlashSlothConfig) -> None:
    path = source / "config.json"
    if not path.is_file():
        return  # the tensors' shapes are checked one by one anyway
    release = json.loads(path.read_text(encoding="utf-8"))
    wrong = {
        key: (release[key], want(config))
        for key, want in _RELEASE_CONFIG_FIELDS.items()
        if key in release and want(config) is not None and release[key] != want(config)
    }
    if wrong:
        raise ConversionError(
            f"{path} does not describe this model: "
            + ", ".join(f"{key}: release {got!r}, model {want!r}" for key, (got, want) in wrong.items())
        )


def convert_release_checkpoint(
    source: str | Path,
    *,
    hd: bool = False,
    config: FlashSlothConfig | None = None,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    dot_token_id: int = RELEASE_DOT_TOKEN_ID,
) -> FlashSloth:
    """A `FlashSloth` holding the weights of the release checkpoint in `source`.

    Args:
        source: the published folder (safetensors, config.json, tokenizer files).
        hd: FlashSloth_HD-3.2B (5-view input); ignored when `config` is given.
        config: the sizes; default `FlashSlothConfig.paper()` / `.paper_hd()`.
        tokenizer: default the folder's own (`AutoTokenizer`); gets the image, pad and
            query tokens it lacks.
        dot_token_id: the token the query vectors add to (the release's 764).
    """
    source = Path(source)
    config = config or (FlashSlothConfig.paper_hd() if hd else FlashSlothConfig.paper())
    _check_release_config(source, config)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(source)
    model = build_flashsloth(config, tokenizer, device=device, dtype=dtype, dot_token_id=dot_token_id,
                             initialize=False)
    expected = {name: tensor.shape for name, tensor in model.canonical_state_dict().items()}
    model.load_components(map_release_state_dict(read_release_state_dict(source), expected))
    return model


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a FlashSloth release checkpoint to this project's format.")
    parser.add_argument("--source", required=True, help="local folder of FlashSloth-3.2B or FlashSloth_HD-3.2B")
    parser.add_argument("--out", required=True, help="folder to write (FlashSloth.save_pretrained)")
    parser.add_argument("--hd", action="store_true", help="the HD checkpoint (thumbnail + 4 tiles per image)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    args = parser.parse_args(argv)
    model = convert_release_checkpoint(args.source, hd=args.hd, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: {model.parameter_counts()['total']:,} parameters")


if __name__ == "__main__":
    main()
