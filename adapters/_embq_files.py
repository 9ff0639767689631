"""The two files of an EmbQ graft, for every family: settings JSON and safetensors.

    folder/
      embq_graft_config.json     layer, query tokens and ids, "." id, EmbQ's sizes
      embq_graft.safetensors     "embq.*" (EmbQ's weights) and "query_vectors"

`EmbQGraft.save_pretrained` writes them with `save_embq_graft`; `load_embq_graft` reads
them back. Only JSON and safetensors are read: no pickle, no code from the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from tokencompress import EmbQ

from ._graft_io import check_format_version, read_record as read_json_record, write_record

__all__ = ["EMBQ_CONFIG_NAME", "EMBQ_WEIGHTS_NAME", "EMBQ_SIZES", "save_embq_graft", "read_record"]

EMBQ_CONFIG_NAME = "embq_graft_config.json"
EMBQ_WEIGHTS_NAME = "embq_graft.safetensors"
_FORMAT = "tokencompress.embq_graft"
_FORMAT_VERSION = 1
#: The sizes that rebuild a `tokencompress.EmbQ`.
EMBQ_SIZES = ("text_dim", "vision_dim", "inner_dim", "num_heads")


def save_embq_graft(graft: Any, folder: str | Path) -> None:
    """Write `graft`'s (an `EmbQGraft`'s) settings and weights to `folder` (created if needed)."""
    if not graft.active:
        raise RuntimeError("this EmbQ graft was removed; there is nothing to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    embq = graft.embq
    record = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "layer": graft.layer,
        "num_queries": graft.num_queries,
        "query_tokens": list(graft.query_tokens),
        "query_token_ids": list(graft.token_ids),
        "dot_token_id": graft.dot_token_id,
        "embq_class": f"{type(embq).__module__}.{type(embq).__qualname__}",
        # Sizes to rebuild a tokencompress EmbQ; another class is rebuilt by the caller.
        "embq": {name: getattr(embq, name) for name in EMBQ_SIZES} if type(embq) is EmbQ else None,
    }
    write_record(folder / EMBQ_CONFIG_NAME, record)
    tensors = {f"embq.{name}": value for name, value in embq.state_dict().items()}
    tensors["query_vectors"] = graft.query_vectors.detach()
    save_file({name: value.contiguous() for name, value in tensors.items()}, str(folder / EMBQ_WEIGHTS_NAME))


def read_record(folder: Path) -> dict[str, Any]:
    """The EmbQ graft record in `folder`, checked to be one, at a version this code reads."""
    path = folder / EMBQ_CONFIG_NAME
    record = read_json_record(path, f"no EmbQ graft in {folder}: {EMBQ_CONFIG_NAME} is missing")
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an EmbQ graft config (no 'format': {_FORMAT!r})")
    return check_format_version(record, path, _FORMAT_VERSION)
