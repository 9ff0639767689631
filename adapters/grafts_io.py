"""A model with several grafts on disk: the plain model, its processor, each graft's files.

    save_grafted(model, "folder", sap, queries)      # e.g. a compressor and an EmbQ graft

    model = LlavaForConditionalGeneration.from_pretrained("folder")   # a plain LLaVA
    processor = LlavaProcessor.from_pretrained("folder")
    sap, queries = load_grafted(model, "folder", processor=processor)

    folder/
      grafts.json                     which grafts, in the order they were passed
      compressor_graft_config.json, compressor_graft.safetensors   (a compressor graft)
      embq_graft_config.json, embq_graft.safetensors               (an EmbQ graft)
      config.json, model.safetensors, processor / tokenizer files  (the ungrafted model)

`save_grafted` lifts every graft (each one's `lifted()`: the wrappers out, the counts and
settings the grafts changed as they were), saves the model with its own
`save_pretrained`, and writes each graft's own files beside it; `load_grafted` grafts them
back, in the same order, with `load_compressor_graft` and `load_embq_graft`. Only JSON
and safetensors are read: no pickle, no code from the folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from torch import nn

from ._graft_io import check_format_version, read_record, write_record
from ._wrap import refuse_other_wrappers
from .embq_io import load_embq_graft
from .families import FAMILIES
from .grafting import load_compressor_graft

__all__ = ["GRAFTS_NAME", "Graft", "save_grafted", "load_grafted"]

GRAFTS_NAME = "grafts.json"
_FORMAT = "tokencompress.grafts"
_FORMAT_VERSION = 1

#: A handle that `graft_compressor` or `graft_embq` returned, of any family.
Graft = Any
#: The name each kind of graft has in grafts.json, by the handle classes of every family.
_KINDS: dict[type, str] = {
    **{family.compressor_graft: "compressor" for family in FAMILIES},
    **{family.embq_graft: "embq" for family in FAMILIES if family.embq_graft is not None},
}


def _kind(graft: Any) -> str:
    for graft_class, kind in _KINDS.items():
        if isinstance(graft, graft_class):
            return kind
    raise TypeError(
        f"save_grafted takes the handles graft_compressor and graft_embq return, got {type(graft).__name__}"
    )


def _files_to_save_with(grafts: Sequence[Graft]) -> Any | None:
    """The processor or tokenizer to save beside the model: the compressor graft's
    processor (its counts follow the graft) holding the EmbQ graft's tokenizer (the
    query tokens), or whichever of them there is."""
    processors = [
        graft.processor for graft in grafts if _kind(graft) == "compressor" and graft.processor is not None
    ]
    tokenizers = [graft.tokenizer for graft in grafts if _kind(graft) == "embq"]
    if processors and tokenizers and getattr(processors[0], "tokenizer", None) is not tokenizers[0]:
        raise ValueError(
            "the compressor graft's processor does not hold the EmbQ graft's tokenizer (the one with the "
            "query tokens), so the two would write different tokenizer files; graft EmbQ with "
            "tokenizer=processor.tokenizer"
        )
    return processors[0] if processors else (tokenizers[0] if tokenizers else None)


def save_grafted(model: nn.Module, folder: str | Path, *grafts: Graft) -> None:
    """Save `model` with all of its `grafts` to `folder` (created if needed).

    Writes the ungrafted model with its own `save_pretrained` (every graft lifted, so it
    loads with `from_pretrained` as the plain model, with the vocabulary an EmbQ graft
    grew), the processor of a compressor graft (with its ungrafted placeholder count) or
    else the tokenizer of an EmbQ graft (with the query tokens), each graft's own files,
    and `grafts.json`, the list `load_grafted` follows. Pass the grafts in the order they
    were made. A wrapper of anything else left in the model (a graft not passed here) is
    a RuntimeError, raised before any file is written.
    """
    if not grafts:
        raise ValueError("no grafts to save; save a plain model with its own save_pretrained")
    kinds = [_kind(graft) for graft in grafts]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"save_grafted takes at most one graft of each kind, got {kinds}")
    for graft in grafts:
        if graft.model is not model:
            raise ValueError(f"the {_kind(graft)} graft was made on another model")
        if not graft.active:
            raise RuntimeError(f"the {_kind(graft)} graft was removed; there is nothing to save")
    beside = _files_to_save_with(grafts)
    folder = Path(folder)
    with ExitStack() as stack:
        for graft in reversed(grafts):  # last made, first lifted
            stack.enter_context(graft.lifted())
        refuse_other_wrappers(model)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        if beside is not None:
            beside.save_pretrained(folder)
    for graft in grafts:
        graft.save_pretrained(folder)  # only the graft's own files
    record = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "grafts": kinds}
    # Last: a folder whose saving failed half-way has no grafts.json and does not load.
    write_record(folder / GRAFTS_NAME, record)


def _read_kinds(folder: Path) -> list[str]:
    path = folder / GRAFTS_NAME
    record = read_record(
        path,
        f"no {GRAFTS_NAME} in {folder}: it was not written by save_grafted (a folder with one "
        "graft's files loads with load_compressor_graft or load_embq_graft)",
    )
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a grafts list (no 'format': {_FORMAT!r})")
    check_format_version(record, path, _FORMAT_VERSION)
    kinds = record.get("grafts")
    known = set(_KINDS.values())
    if not isinstance(kinds, list) or not kinds or not set(kinds) <= known or len(set(kinds)) != len(kinds):
        raise ValueError(f"{path} lists grafts {kinds!r}; expected distinct names among {sorted(known)}")
    return kinds


def load_grafted(
    model: nn.Module,
    folder: str | Path,
    *,
    processor: Any | None = None,
    tokenizer: Any | None = None,
    compressor: nn.Module | None = None,
    projector: nn.Module | None = None,
    embq: nn.Module | None = None,
) -> tuple[Graft, ...]:
    """Graft what `save_grafted` saved in `folder` onto `model`; the grafts, in saved order.

    `model` is typically `from_pretrained(folder)` and `processor` its processor
    (`LlavaProcessor.from_pretrained(folder)`): a compressor graft sets its placeholder
    count, and an EmbQ graft takes its tokenizer unless `tokenizer=` is given (one of
    the two is needed for an EmbQ graft). `compressor`, `projector` and `embq` go to
    `load_compressor_graft` / `load_embq_graft`, for modules that cannot be rebuilt from
    the saved settings. If one graft fails to load, those already made are removed.
    """
    folder = Path(folder)
    kinds = _read_kinds(folder)
    if tokenizer is None and processor is not None:
        tokenizer = getattr(processor, "tokenizer", None)
    if "embq" in kinds and tokenizer is None:
        raise ValueError(
            f"{folder} holds an EmbQ graft: pass tokenizer= (or processor=) with its query tokens, "
            "e.g. AutoTokenizer.from_pretrained(folder)"
        )
    made: list[Graft] = []
    try:
        for kind in kinds:
            if kind == "compressor":
                graft = load_compressor_graft(
                    model, folder, processor=processor, compressor=compressor, projector=projector
                )
            else:
                graft = load_embq_graft(model, folder, tokenizer=tokenizer, embq=embq)
            made.append(graft)
    except Exception:
        for graft in reversed(made):
            graft.remove()
        raise
    return tuple(made)
