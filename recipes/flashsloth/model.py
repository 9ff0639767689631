"""FlashSloth, assembled by one builder for every size: LLaVA + a SAP graft + an EmbQ graft.

    config = FlashSlothConfig.paper()               # or .paper_hd(), .tiny()
    model = build_flashsloth(config, tokenizer, vision_weights="google/siglip-so400m-patch14-384",
                             llm_weights="microsoft/phi-2")
    model.save_pretrained("flashsloth")             # safetensors + JSON, no pickle
    model = FlashSloth.from_pretrained("flashsloth")

What `build_flashsloth` assembles (paper sizes):

- transformers' `LlavaForConditionalGeneration`: SigLIP so400m/14 at 384 px as the vision
  tower (27x27 = 729 tokens of width 1152, select strategy "full": SigLIP has no CLS
  token), phi-2 as the LLM, and LLaVA's projector Linear(1152, 2560) -> GELU ->
  Linear(2560, 2560) with bias (the release's "mlp2x_gelu").
- `graft_compressor(SAP(1152, window=3))`: 729 -> 81 tokens per image, before the projector.
  `compressor="avgpool"` grafts `AvgPool(window=3)` instead (the paper's Table 3 "Avg.Pool"
  row), and `compressor="none"` grafts nothing: the 729-token baseline, LLaVA's own path.
- `graft_embq(EmbQ(2560, 1152, 576, 32), layer=8, num_queries=9)`: the query tokens and
  EmbQ on the input of the 8th decoder layer. `num_queries=0` builds no EmbQ (stage 1).

Two departures from a stock LLaVA, both the release's architecture:

- The vision tower is built with 26 encoder layers, not SigLIP's 27: FlashSloth reads the
  penultimate layer, so the last one is not built (`vision_feature_layer=-1` of the 26
  is layer -2 of the 27), nor the attention-pooling head (`vision_use_head=False`);
  `post_layernorm` is replaced by `nn.Identity` (SigLIP's forward always applies it to
  its last hidden state, which LLaVA does not use). So nothing unused is built or run.
- phi-2's LM head has a bias, LLaVA's has none: `lm_head` is a biased `nn.Linear`.
  A folder saved here is therefore loaded with `FlashSloth.from_pretrained`, which builds
  this architecture and loads every tensor strictly, not with
  `LlavaForConditionalGeneration.from_pretrained` (which would drop the bias).

FlashSloth-HD: every picture is 5 views of 384 px ([thumbnail, TL, TR, BL, BR], see
`image_processing`). To the grafted LLaVA each view is one image: `FlashSloth.forward`
flattens pixel values (N, 5, 3, S, S) to (5N, 3, S, S), the prompt holds 5 x 81 = 405
consecutive placeholders per picture (`num_image_tokens`), SAP runs per view and LLaVA
scatters the 5 x 81 tokens in order, and EmbQ's graft groups the raw features per batch
row by placeholder count, so each query block reads all 5 x 729 uncompressed tokens of
its sample.

Parameter names: `canonical_state_dict()` names every tensor as a plain (ungrafted) LLaVA
does (`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
`lm_head.*`), plus the grafts' own files' names (`compressor.*`, `embq.*`,
`query_vectors`). Components (`COMPONENTS` of the recipe config) select among them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PhiConfig,
    PhiForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.initialization import no_init_weights

from tokencompress import SAP, AvgPool, EmbQ, TokenCompressor
from tokencompress.adapters import (
    CompressorGraft,
    EmbQGraft,
    graft_compressor,
    graft_embq,
    load_compressor_graft,
    load_embq_graft,
)
from tokencompress.adapters.embq import DEFAULT_QUERY_TOKEN

from .config import COMPONENTS
from .image_processing import SiglipProcessor, build_image_processor
from .template import ConversationTemplate, PlainTemplate, build_template
from .tokenizer import IMAGE_TOKEN, PAD_TOKEN

__all__ = [
    "COMPRESSORS",
    "CONFIG_NAME",
    "FlashSloth",
    "FlashSlothConfig",
    "WEIGHTS_NAME",
    "build_flashsloth",
    "component_of",
    "prepare_tokenizer",
    "read_safetensors",
]

CONFIG_NAME = "flashsloth_config.json"
WEIGHTS_NAME = "model.safetensors"  # the ungrafted LLaVA's tensors, canonical names
_FORMAT = "tokencompress.flashsloth"
_FORMAT_VERSION = 1
HD_NUM_VIEWS = 5
# The visual compressor choices of the paper's Table 3: its SAP, average pooling, or none.
COMPRESSORS = ("sap", "avgpool", "none")

# SigLIP so400m/14 at 384 px, as FlashSloth builds it: the checkpoint has 27 encoder
# layers; FlashSloth reads the 26th (the penultimate), so 26 are built.
SIGLIP_SO400M_384: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}

# microsoft/phi-2 (its config.json).
PHI_2: dict[str, Any] = {
    "vocab_size": 51200,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "gelu_new",
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4},
    "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}

# Settings that fix a checkpoint's tensor shapes (checked when loading pretrained parts).
_VISION_ARCHITECTURE = ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size")
_TEXT_ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads")

# Component -> canonical name prefixes; every canonical tensor is in exactly one.
_COMPONENT_PREFIXES: dict[str, tuple[str, ...]] = {
    "vision_encoder": ("model.vision_tower.",),
    "compressor": ("compressor.",),
    "projector": ("model.multi_modal_projector.",),
    "embq": ("embq.", "query_vectors"),
    "llm": ("model.language_model.", "lm_head."),
}
assert set(_COMPONENT_PREFIXES) == set(COMPONENTS)


def component_of(name: str) -> str:
    """The component ("vision_encoder", "compressor", ...) of a canonical tensor name."""
    for component, prefixes in _COMPONENT_PREFIXES.items():
        if any(name == prefix or name.startswith(prefix) for prefix in prefixes):
            return component
    raise KeyError(f"{name!r} is not a canonical FlashSloth tensor name")


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FlashSlothConfig:
    """The sizes of a FlashSloth model; `paper()`, `paper_hd()` and `tiny()` are presets.

    Attributes:
        vision: `SiglipVisionConfig` settings of the vision tower as built
            (`num_hidden_layers` counts the layers up to the one whose output is used).
        text: `PhiConfig` settings of the LLM; `vocab_size` None sizes the vocabulary from
            the tokenizer (its length plus the query tokens, rounded up to 64).
        compressor: "sap" (FlashSloth), "avgpool" (same windows, uniform weights) or
            "none" (every vision token reaches the LLM): Table 3's compression rows.
        sap_window, sap_dropout: the window side s (SAP and AvgPool) and SAP's score-MLP
            dropout.
        projector_hidden_act: the projector's activation (transformers' name).
        lm_head_bias: phi-2's LM head has a bias.
        num_queries: EmbQ query tokens per user turn; 0 builds no EmbQ (stage 1).
        embq_layer: 1-based decoder layer whose input EmbQ updates (8: after 7 layers).
        embq_inner_dim, embq_num_heads: EmbQ's inner width and heads.
        hd: FlashSloth-HD input: 5 views (thumbnail + 4 tiles) of `image_size` each.
    """

    vision: Mapping[str, Any]
    text: Mapping[str, Any]
    sap_window: int = 3
    sap_dropout: float = 0.1
    projector_hidden_act: str = "gelu"
    lm_head_bias: bool = True
    num_queries: int = 9
    embq_layer: int = 8
    embq_inner_dim: int = 576
    embq_num_heads: int = 32
    hd: bool = False
    compressor: str = "sap"

    def __post_init__(self) -> None:
        object.__setattr__(self, "vision", dict(self.vision))
        object.__setattr__(self, "text", dict(self.text))
        for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
            if key not in self.vision:
                raise ValueError(f"vision config lacks {key!r}")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in self.text:
                raise ValueError(f"text config lacks {key!r}")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.sap_window < 1:
            raise ValueError(f"sap_window must be >= 1, got {self.sap_window}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        if self.num_queries < 0:
            raise ValueError(f"num_queries must be >= 0, got {self.num_queries}")
        if self.num_queries and not 1 <= self.embq_layer <= self.text["num_hidden_layers"]:
            raise ValueError(
                f"embq_layer is 1-based (the paper's 8th layer is 8): need 1..{self.text['num_hidden_layers']}, "
                f"got {self.embq_layer}"
            )

    # -- presets ------------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides: Any) -> FlashSlothConfig:
        """FlashSloth (3.2B): SigLIP so400m/14-384 + phi-2, 81 visual + 9 query tokens."""
        return cls(**{"vision": SIGLIP_SO400M_384, "text": PHI_2, **overrides})

    @classmethod
    def paper_hd(cls, **overrides: Any) -> FlashSlothConfig:
        """FlashSloth-HD (3.2B): as `paper()`, 5 views -> 405 visual + 9 query tokens."""
        return cls.paper(**{"hd": True, **overrides})

    @classmethod
    def tiny(cls, image_size: int = 48, **overrides: Any) -> FlashSlothConfig:
        """A tiny random model for CPU runs and tests (patch 8: 48 px -> 6x6 -> 2x2 tokens)."""
        vision = {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": image_size, "patch_size": 8,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        }  # fmt: skip
        text = {
            "vocab_size": None, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "gelu_new",
            "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            "resid_pdrop": 0.0, "initializer_range": 0.02,
        }  # fmt: skip
        defaults = {"vision": vision, "text": text, "embq_layer": 2, "embq_inner_dim": 32, "embq_num_heads": 4}
        return cls(**{**defaults, **overrides})

    # -- derived sizes ------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision["patch_size"])

    @property
    def grid(self) -> tuple[int, int]:
        """The vision grid of one view: (27, 27) at paper size (384 // 14; the patch
        convolution drops the last 6 pixels, as SigLIP does)."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_views(self) -> int:
        return HD_NUM_VIEWS if self.hd else 1

    @property
    def tokens_per_view(self) -> int:
        """Visual tokens per view after the compressor: ceil(27 / 3)^2 = 81 (SAP or
        AvgPool), or the whole 27 x 27 = 729 grid without one."""
        if self.compressor == "none":
            return self.grid[0] * self.grid[1]
        rows, cols = (math.ceil(side / self.sap_window) for side in self.grid)
        return rows * cols

    @property
    def num_image_tokens(self) -> int:
        """Image placeholders per picture in a prompt: 81, or 5 x 81 = 405 with HD."""
        return self.tokens_per_view * self.num_views

    @property
    def token_budget(self) -> int:
        """Visual plus query tokens of a one-picture, one-turn prompt: 90, or 414 with HD."""
        return self.num_image_tokens + self.num_queries

    # -- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlashSlothConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FlashSloth config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


# ----------------------------------------------------------------------------- tokenizer


def prepare_tokenizer(tokenizer: Any) -> None:
    """Give `tokenizer` (in place) the image placeholder token and a pad token if it lacks them.

    The EmbQ graft adds the query tokens itself. phi-2's tokenizer has neither token; both
    land in phi-2's unused embedding rows (its vocabulary has 50,295 of 51,200 rows).
    """
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def _vocab_size(config: FlashSlothConfig, tokenizer: Any) -> int:
    """Embedding rows: the config's, or the tokenizer's tokens plus the query tokens that
    the EmbQ graft will add, rounded up to 64 (as phi-2 pads 50,295 tokens to 51,200)."""
    vocabulary = tokenizer.get_vocab()
    new_queries = sum(DEFAULT_QUERY_TOKEN.format(i) not in vocabulary for i in range(config.num_queries))
    needed = len(tokenizer) + new_queries
    size = config.text.get("vocab_size")
    if size is None:
        return -(-needed // 64) * 64
    if needed > size:
        # The graft would grow the embedding, and pretrained LLM weights would not fit it.
        raise ValueError(
            f"the tokenizer needs {needed} embedding rows ({len(tokenizer)} tokens + {new_queries} query "
            f"tokens) but the LLM has {size}"
        )
    return int(size)


# ----------------------------------------------------------------------------- building


def _llava_config(config: FlashSlothConfig, tokenizer: Any, vocab_size: int) -> LlavaConfig:
    text = PhiConfig(
        **{**config.text, "vocab_size": vocab_size},
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = SiglipVisionConfig(**config.vision, vision_use_head=False)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=config.grid[0] * config.grid[1],  # the compressor graft sets 81
        vision_feature_layer=-1,  # the last *built* layer: SigLIP's penultimate
        vision_feature_select_strategy="full",  # SigLIP has no CLS token
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def _build_llava(
    config: FlashSlothConfig,
    tokenizer: Any,
    vocab_size: int,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    initialize: bool,
) -> LlavaForConditionalGeneration:
    """The ungrafted LLaVA of `config`; `initialize=False` leaves its memory uninitialised
    (every tensor is then loaded from files; non-persistent buffers are still computed)."""
    llava_config = _llava_config(config, tokenizer, vocab_size)
    skip_init = contextlib.nullcontext() if initialize else no_init_weights()
    with skip_init, torch.device(device):
        llava = AutoModelForImageTextToText.from_config(llava_config, dtype=dtype)
        if not isinstance(llava, LlavaForConditionalGeneration):
            raise TypeError(f"expected a LlavaForConditionalGeneration, got {type(llava).__name__}")
        # Not run: LLaVA reads the hidden states, which SigLIP records before this norm.
        llava.model.vision_tower.post_layernorm = nn.Identity()
        if config.lm_head_bias:
            head = llava.lm_head
            llava.lm_head = nn.Linear(head.in_features, head.out_features, bias=True, dtype=dtype)
            if initialize:  # as transformers initialises a Linear, with this model's std
                nn.init.normal_(llava.lm_head.weight, std=config.text.get("initializer_range", 0.02))
                nn.init.zeros_(llava.lm_head.bias)
    generation = llava.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    return llava.eval()


def _check_sizes(what: str, loaded: Any, expected: Mapping[str, Any], keys: Iterable[str]) -> None:
    wrong = {
        key: (getattr(loaded, key, None), expected[key])
        for key in keys
        if expected.get(key) is not None and getattr(loaded, key, None) != expected[key]
    }
    if wrong:
        details = ", ".join(f"{key}: checkpoint {got}, model {want}" for key, (got, want) in wrong.items())
        raise ValueError(f"the pretrained {what} does not fit this FlashSloth config ({details})")


def _check_complete(what: str, source: str | Path, info: Mapping[str, Any]) -> None:
    # from_pretrained fills missing tensors with random values and only warns: refuse that.
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(key) for key in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise ValueError(
            f"the pretrained {what} at {source} lacks tensors {missing[:10]} or has misshapen ones "
            f"{mismatched[:10]} (of {len(missing)} missing, {len(mismatched)} misshapen)"
        )


def _load_pretrained_vision(llava: LlavaForConditionalGeneration, source: str | Path,
                            config: FlashSlothConfig, dtype: torch.dtype) -> None:
    """SigLIP's first `num_hidden_layers` layers and embeddings from a SigLIP checkpoint."""
    layers = config.vision["num_hidden_layers"]
    # Build only the layers FlashSloth uses; transformers reports the others as unused.
    # A full SiglipModel checkpoint (text + vision, as google/siglip-so400m-patch14-384) works too.
    vision, info = SiglipVisionModel.from_pretrained(
        source, dtype=dtype, num_hidden_layers=layers, vision_use_head=False, output_loading_info=True
    )
    _check_sizes("vision encoder", vision.config, config.vision, _VISION_ARCHITECTURE)
    _check_complete("vision encoder", source, info)
    state = {k: v for k, v in vision.state_dict().items() if not k.startswith("post_layernorm.")}
    llava.model.vision_tower.load_state_dict(state, strict=True)


def _load_pretrained_llm(llava: LlavaForConditionalGeneration, source: str | Path,
                         config: FlashSlothConfig, dtype: torch.dtype) -> None:
    """phi-2's decoder and LM head (with its bias) from a `PhiForCausalLM` checkpoint."""
    phi, info = PhiForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True)
    expected = {**config.text, "vocab_size": llava.config.text_config.vocab_size}
    _check_sizes("LLM", phi.config, expected, _TEXT_ARCHITECTURE)
    _check_complete("LLM", source, info)
    state = phi.state_dict()
    decoder = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    head = {k.removeprefix("lm_head."): v for k, v in state.items() if k.startswith("lm_head.")}
    llava.model.language_model.load_state_dict(decoder, strict=True)
    llava.lm_head.load_state_dict(head, strict=True)


def _new_compressor(config: FlashSlothConfig, llava: LlavaForConditionalGeneration) -> TokenCompressor | None:
    """The configured compressor, new (SAP's score MLP random); None for "none"."""
    if config.compressor == "sap":
        return SAP(llava.config.vision_config.hidden_size, window=config.sap_window, dropout=config.sap_dropout)
    if config.compressor == "avgpool":
        return AvgPool(window=config.sap_window)
    return None


def _new_embq(config: FlashSlothConfig, llava: LlavaForConditionalGeneration) -> EmbQ:
    return EmbQ(
        llava.config.text_config.hidden_size,
        llava.config.vision_config.hidden_size,
        inner_dim=config.embq_inner_dim,
        num_heads=config.embq_num_heads,
    )


def build_flashsloth(
    config: FlashSlothConfig,
    tokenizer: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vision_weights: str | Path | None = None,
    llm_weights: str | Path | None = None,
    dot_token_id: int | None = None,
    initialize: bool = True,
) -> FlashSloth:
    """Assemble a FlashSloth model of `config` (eval mode; call `.train()` to train).

    Args:
        config: the sizes (`FlashSlothConfig.paper()`, `.paper_hd()`, `.tiny()`).
        tokenizer: gets the image, pad and query tokens it lacks (in place).
        device, dtype: where and in what dtype to build; "meta" builds shapes only.
        vision_weights: a SigLIP checkpoint (Hub id or folder) for the vision tower.
        llm_weights: a phi-2 (`PhiForCausalLM`) checkpoint for the LLM and its head.
        dot_token_id: the token whose embedding the query vectors add to; default ".".
        initialize: False skips random initialisation (every tensor is loaded afterwards,
            as `convert.py` does).

    The projector, SAP, EmbQ and the query vectors (zeros: the queries start as ".")
    are new; the rest is random unless loaded from `vision_weights` / `llm_weights`.
    With `config.compressor` "avgpool" the graft is parameter-free; with "none" there is
    no compressor graft (`FlashSloth.compressor_graft` is None).
    """
    prepare_tokenizer(tokenizer)
    vocab_size = _vocab_size(config, tokenizer)
    config = dataclasses.replace(config, text={**config.text, "vocab_size": vocab_size})  # resolved
    llava = _build_llava(config, tokenizer, vocab_size, device=device, dtype=dtype, initialize=initialize)
    if vision_weights is not None:
        _load_pretrained_vision(llava, vision_weights, config, dtype)
    if llm_weights is not None:
        _load_pretrained_llm(llava, llm_weights, config, dtype)
    skip_init = contextlib.nullcontext() if initialize else no_init_weights()
    with skip_init, torch.device(device):
        new_compressor = _new_compressor(config, llava)
        compressor = graft_compressor(llava, new_compressor) if new_compressor is not None else None
        queries = None
        if config.num_queries:
            queries = graft_embq(
                llava, _new_embq(config, llava), layer=config.embq_layer, tokenizer=tokenizer,
                num_queries=config.num_queries, dot_token_id=dot_token_id,
            )
    return FlashSloth(config, llava, tokenizer, compressor, queries)


# ----------------------------------------------------------------------------- files


def read_safetensors(folder: str | Path, name: str = WEIGHTS_NAME, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of `folder/name`, or of the shards its `<name>.index.json` lists.

    Safetensors only: a checkpoint in pickle files (`*.bin`, `*.pt`) is refused.
    """
    folder = Path(folder)
    single = folder / name
    index = folder / f"{name}.index.json"
    if single.is_file():
        files = [single]
        listed = None
    elif index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [folder / shard for shard in sorted(set(weight_map.values()))]
        listed = set(weight_map)
    else:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f"; found pickle files {pickles}, which are not read (convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"no {name} nor {index.name} in {folder}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device=device) as handle:
            for key in handle.keys():
                if key in tensors:
                    raise ValueError(f"tensor {key!r} is stored twice (again in {path.name})")
                tensors[key] = handle.get_tensor(key)
    if listed is not None and listed != set(tensors):
        raise ValueError(
            f"{index.name} does not match its shards: listed only {sorted(listed - set(tensors))[:10]}, "
            f"stored only {sorted(set(tensors) - listed)[:10]}"
        )
    return tensors


# ----------------------------------------------------------------------------- the model


def _strip_wrappers(name: str) -> str:
    # The adapters keep a wrapped module as `base_layer` (the peft convention); a plain
    # LLaVA names the same tensor without that segment.
    return name.replace(".base_layer.", ".")


class FlashSloth(nn.Module):
    """A grafted `LlavaForConditionalGeneration` with its tokenizer and settings.

    Attributes:
        config: the `FlashSlothConfig` it was built from.
        llava: the grafted transformers model (`generate`, gradient checkpointing, ...).
        tokenizer: holds the image, pad and query tokens.
        compressor_graft: the SAP (or AvgPool) graft, or None without compression;
            `embq_graft`: the EmbQ graft, or None.
    """

    def __init__(
        self,
        config: FlashSlothConfig,
        llava: LlavaForConditionalGeneration,
        tokenizer: Any,
        compressor_graft: CompressorGraft | None,
        embq_graft: EmbQGraft | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.llava = llava
        self.tokenizer = tokenizer
        self.compressor_graft = compressor_graft
        self.embq_graft = embq_graft
        self.train(llava.training)  # a new nn.Module is in training mode; follow the model
        if (compressor_graft is None) != (config.compressor == "none"):
            raise ValueError(f"the config's compressor is {config.compressor!r}, the compressor graft "
                             f"{'absent' if compressor_graft is None else 'present'}")
        per_view = compressor_graft.num_image_tokens if compressor_graft is not None else math.prod(config.grid)
        if per_view != config.tokens_per_view:
            raise ValueError(f"the model gives {per_view} tokens per view, the config {config.tokens_per_view}")
        if self.num_image_tokens != config.num_image_tokens:
            raise ValueError(f"the LLaVA takes {self.num_image_tokens} image tokens per picture, "
                             f"the config {config.num_image_tokens}")

    # -- what the data pipeline needs ----------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.llava.config.image_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def query_token_ids(self) -> tuple[int, ...]:
        return tuple(self.embq_graft.token_ids) if self.embq_graft is not None else ()

    @property
    def num_image_tokens(self) -> int:
        """Placeholders per picture: 81, or 405 with HD.

        Read from the LLaVA (its ``image_seq_length`` per view, which a compressor graft
        sets) rather than the config, so that a graft added after building, such as a
        training-free token selector at inference (`benchmarks.training_free`), is
        followed by templates made afterwards (`make_template`, `FlashSlothChat`).
        """
        return int(self.llava.config.image_seq_length) * self.config.num_views

    @property
    def image_processor(self) -> SiglipProcessor:
        """PIL image -> (num_views, 3, S, S) pixel values (SigLIP, or HD's 5 views)."""
        return build_image_processor(self.config.image_size, hd=self.config.hd)

    def make_template(self, name: str = "vicuna_v1", *, max_length: int | None = None
                      ) -> ConversationTemplate | PlainTemplate:
        """The recipe's template ("vicuna_v1" or "plain") with this model's token ids.

        A model built with ``num_queries=0`` gets "vicuna_v1" without query blocks (the
        paper's Table 3 rows without EmbQ); the template cannot forget queries it has.
        """
        return build_template(
            name,
            self.tokenizer,
            image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens,
            query_token_ids=self.query_token_ids if name != "plain" else (),
            max_length=max_length,
            allow_no_queries=self.config.num_queries == 0,
        )

    @property
    def device(self) -> torch.device:
        return self.llava.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llava.dtype

    # -- running ------------------------------------------------------------------------------
    def _llava_inputs(self, pixel_values: torch.Tensor | None, embq_instruction_map: torch.Tensor | None,
                      kwargs: dict[str, Any]) -> dict[str, Any]:
        if pixel_values is not None:
            if pixel_values.dim() == 5:  # (pictures, views, 3, S, S): each view is one LLaVA image
                if pixel_values.shape[1] != self.config.num_views:
                    raise ValueError(
                        f"pixel values have {pixel_values.shape[1]} views per picture; this model "
                        f"takes {self.config.num_views}"
                    )
                pixel_values = pixel_values.flatten(0, 1)
            kwargs["pixel_values"] = pixel_values.to(self.llava.model.vision_tower.dtype)
        if embq_instruction_map is not None:
            if self.embq_graft is not None:
                kwargs["embq_instruction_map"] = embq_instruction_map
            elif bool((embq_instruction_map != 0).any()):
                raise ValueError("the batch marks EmbQ instructions, but this model has no EmbQ (num_queries=0)")
        return kwargs

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        embq_instruction_map: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """LLaVA's forward on a collated batch; pixel values may be (N, views, 3, S, S)."""
        kwargs = self._llava_inputs(pixel_values, embq_instruction_map, dict(kwargs))
        return self.llava(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        embq_instruction_map: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """`llava.generate` on a (left-padded) batch; returns prompt + new token ids."""
        kwargs = self._llava_inputs(pixel_values, embq_instruction_map, dict(generate_kwargs))
        return self.llava.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # -- canonical names and components ---------------------------------------------------
    def _graft_tensor_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        if self.compressor_graft is not None:
            compressor = self.compressor_graft.compressor
            names = {id(t): f"compressor.{n}" for n, t in compressor.state_dict(keep_vars=True).items()}
            if self.compressor_graft.projector is not None:
                # The builders never give the compressor graft a projector of its own.
                raise RuntimeError("FlashSloth keeps LLaVA's projector, but the compressor graft holds a new one")
        if self.embq_graft is not None:
            names.update({id(t): f"embq.{n}" for n, t in self.embq_graft.embq.state_dict(keep_vars=True).items()})
            names[id(self.embq_graft.query_vectors)] = "query_vectors"
        return names

    def _canonical_to_module_names(self) -> dict[str, str]:
        grafted = self._graft_tensor_names()
        mapping: dict[str, str] = {}
        for name, tensor in self.state_dict(keep_vars=True).items():
            canonical = grafted.get(id(tensor)) or _strip_wrappers(name.removeprefix("llava."))
            if canonical in mapping:
                raise RuntimeError(f"two tensors map to the canonical name {canonical!r}")
            mapping[canonical] = name
        return mapping

    def canonical_state_dict(self, *, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor under its canonical name (see the module docstring)."""
        state = self.state_dict(keep_vars=keep_vars)
        return {canonical: state[name] for canonical, name in self._canonical_to_module_names().items()}

    def component_state_dict(self, components: Iterable[str]) -> dict[str, torch.Tensor]:
        """The canonical tensors of the named components."""
        wanted = _check_components(components)
        return {k: v for k, v in self.canonical_state_dict().items() if component_of(k) in wanted}

    def load_components(self, state: Mapping[str, torch.Tensor], components: Iterable[str] | None = None) -> None:
        """Copy the named components' tensors (default: all) from `state`, strictly.

        `state` may use canonical names or this module's `state_dict()` names (as a
        training checkpoint holds them); every tensor of the components must be there
        with its shape. Stage 2 starts from stage 1 with ``["compressor", "projector"]``.
        """
        wanted = _check_components(COMPONENTS if components is None else components)
        targets = {k: v for k, v in self.canonical_state_dict(keep_vars=True).items() if component_of(k) in wanted}
        module_names = self._canonical_to_module_names()
        missing, wrong_shape, sources = [], [], {}
        for canonical, target in targets.items():
            source = state.get(canonical, state.get(module_names[canonical]))
            if source is None:
                missing.append(canonical)
            elif tuple(source.shape) != tuple(target.shape):
                wrong_shape.append(f"{canonical}: {tuple(source.shape)} vs {tuple(target.shape)}")
            else:
                sources[canonical] = source
        if missing or wrong_shape:
            raise ValueError(
                f"cannot load components {sorted(wanted)}: missing {missing}; wrong shapes {wrong_shape}"
            )
        with torch.no_grad():
            for canonical, target in targets.items():
                target.copy_(sources[canonical])

    def set_trainable(self, components: Iterable[str]) -> None:
        """requires_grad on the named components' parameters only."""
        wanted = _check_components(components)
        for name, tensor in self.canonical_state_dict(keep_vars=True).items():
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(component_of(name) in wanted)

    def component_parameters(self, component: str) -> Iterator[nn.Parameter]:
        """The parameters of one component (e.g. for an optimizer parameter group)."""
        _check_components([component])
        for name, tensor in self.canonical_state_dict(keep_vars=True).items():
            if isinstance(tensor, nn.Parameter) and component_of(name) == component:
                yield tensor

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component, plus "query_vectors" (inside "embq") and "total"."""
        counts = dict.fromkeys(COMPONENTS, 0)
        for name, tensor in self.canonical_state_dict(keep_vars=True).items():
            if isinstance(tensor, nn.Parameter):
                counts[component_of(name)] += tensor.numel()
        counts["query_vectors"] = self.embq_graft.query_vectors.numel() if self.embq_graft is not None else 0
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    # -- save / load --------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Write the model to `folder`: JSON settings and safetensors weights, no pickle.

        ``flashsloth_config.json`` (sizes, with the vocabulary size resolved),
        ``model.safetensors`` (the ungrafted LLaVA, canonical names), the two grafts'
        files (`CompressorGraft.save_pretrained`, `EmbQGraft.save_pretrained`) and the
        tokenizer's files.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab_size = self.llava.get_input_embeddings().weight.shape[0]
        config = dataclasses.replace(self.config, text={**self.config.text, "vocab_size": vocab_size})
        record = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "config": config.to_dict()}
        (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        base = {
            name: tensor.detach().to("cpu").contiguous()
            for name, tensor in self.canonical_state_dict().items()
            if component_of(name) in ("vision_encoder", "projector", "llm")
        }
        save_file(base, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        if self.compressor_graft is not None:
            self.compressor_graft.save_pretrained(folder)
        if self.embq_graft is not None:
            self.embq_graft.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> FlashSloth:
        """Load a folder written by `save_pretrained` (or by `convert.py`). Reads JSON and
        safetensors only; a missing, unexpected or misshapen tensor is an error."""
        folder = Path(folder)
        record = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        if record.get("format") != _FORMAT or record.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{folder / CONFIG_NAME} is not a FlashSloth config of format version {_FORMAT_VERSION}"
            )
        config = FlashSlothConfig.from_dict(record["config"])
        tokenizer = AutoTokenizer.from_pretrained(folder)
        llava = _build_llava(config, tokenizer, config.text["vocab_size"], device=device, dtype=dtype,
                             initialize=False)
        llava.load_state_dict(read_safetensors(folder, device=str(torch.device(device))), strict=True)
        compressor = load_compressor_graft(llava, folder) if config.compressor != "none" else None
        queries = load_embq_graft(llava, folder, tokenizer=tokenizer) if config.num_queries else None
        _check_loaded_grafts(config, compressor, queries)
        return cls(config, llava, tokenizer, compressor, queries)


def _check_components(components: Iterable[str]) -> set[str]:
    wanted = set(components)
    unknown = sorted(wanted - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; known: {list(COMPONENTS)}")
    return wanted


def _check_loaded_grafts(config: FlashSlothConfig, compressor: CompressorGraft | None,
                        queries: EmbQGraft | None) -> None:
    if compressor is not None:
        loaded = compressor.compressor
        wanted = {"sap": SAP, "avgpool": AvgPool}[config.compressor]
        if type(loaded) is not wanted or loaded.window != config.sap_window:
            raise ValueError(
                f"the folder's compressor is {loaded!r}, the config asks for "
                f"{wanted.__name__}(window={config.sap_window})"
            )
    if queries is not None:
        embq = queries.embq
        found = (queries.layer, queries.num_queries, embq.inner_dim, embq.num_heads)
        wanted = (config.embq_layer, config.num_queries, config.embq_inner_dim, config.embq_num_heads)
        if found != wanted:
            raise ValueError(
                f"the folder's EmbQ graft has (layer, num_queries, inner_dim, num_heads) = {found}, "
                f"the config {wanted}"
            )

