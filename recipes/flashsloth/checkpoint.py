"""Atomic, pickle-free training checkpoints for exact resume.

Layout of one checkpoint, ``<checkpoint_dir>/step_00000100/``:

- ``model.safetensors``: the model's state dict.
- ``training_state.safetensors``: every tensor found in ``training_state`` (optimizer
  moments, RNG states, ...), keyed by its path in the tree.
- ``training_state.json``: the rest of ``training_state`` (step, scheduler, sampler,
  optimizer hyperparameters, Python/NumPy RNG states), with tensors referenced by key.
  Tuples, bytes, NumPy arrays and non-string dict keys are tagged so they load back as
  they were.

Writing is atomic: files go to a hidden temporary directory in the same parent, are
fsynced, and the directory is renamed into place (then the parent is fsynced). A crash
leaves either the complete new checkpoint or none (the previous ones stay intact); stale
temporary directories are removed by the next save. Old checkpoints beyond ``keep_last``
are deleted only after the new one is in place. Loading uses safetensors and JSON only:
nothing is unpickled.

One process writes (rank 0 in distributed runs, after gathering full state dicts).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "Checkpoint",
    "capture_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_TENSORS_FILE = "training_state.safetensors"
STATE_JSON_FILE = "training_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    training_state: dict[str, Any]


# ----------------------------------------------------------------------------- tree codec


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-safe form of ``obj``; tensors move to ``tensors`` under their tree path."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        while key in tensors:
            key += "_"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}" if path else k, tensors) for k, v in obj.items()}
        # Non-string keys (optimizer state is keyed by int) or keys that look like tags.
        return {
            "__items__": [
                [_encode(k, f"{path}/key{i}", tensors), _encode(v, f"{path}/{k}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise TypeError(
        f"cannot store a {type(obj).__name__} at {path or 'the root'!r} in a checkpoint "
        "(tensors, numbers, strings, bytes, lists, tuples, dicts and NumPy arrays only)"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; safetensors refuses tensors that share memory (tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state[{name!r}] is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:  # a tied weight or a view of another tensor
            tensor = tensor.clone()
        seen.add(storage)
        out[name] = tensor
    return out


# ----------------------------------------------------------------------------- files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``checkpoint_dir``, oldest step first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / STATE_JSON_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``checkpoint_dir``, or None."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else the latest checkpoint inside it."""
    path = Path(path)
    if (path / STATE_JSON_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{str(path)!r} is not a checkpoint and holds none")
    return latest


def _remove_stale_temporaries(root: Path) -> None:
    for child in root.iterdir():
        if child.name.startswith(_TMP_PREFIX) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    *,
    model_state: Mapping[str, torch.Tensor],
    training_state: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``<checkpoint_dir>/step_<step>`` atomically; returns its path.

    ``training_state`` is any tree of dicts/lists/tuples holding tensors, numbers,
    strings, bytes and NumPy arrays: typically ``{"optimizer": opt.state_dict(),
    "scheduler": sched.state_dict(), "sampler": sampler.state_dict(), "rng":
    capture_rng_state()}``. An existing checkpoint of the same step is replaced.
    ``keep_last`` (None: keep all) deletes the oldest checkpoints after the save.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    final = root / _step_dir_name(step)

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(dict(training_state or {}), "", tensors)
    document = {
        "format_version": _FORMAT_VERSION,
        "step": step,
        "model_keys": list(model_state),  # safetensors does not keep the state dict's order
        "training_state": tree,
    }

    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=root))
    try:
        save_file(_unshared(model_state), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        save_file(_unshared(tensors), str(tmp / STATE_TENSORS_FILE), metadata={"format": "pt"})
        with open(tmp / STATE_JSON_FILE, "w", encoding="utf-8") as f:
            json.dump(document, f)
        for name in (MODEL_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():  # same step saved again: move the old one aside first
            old = root / f"{_TMP_PREFIX}old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(path: str | Path, *, device: str = "cpu") -> Checkpoint:
    """Read a checkpoint (a step directory, or a run directory: its latest). No pickle."""
    path = resolve_checkpoint(path)
    with open(path / STATE_JSON_FILE, encoding="utf-8") as f:
        document = json.load(f)
    version = document.get("format_version")
    if version != _FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version!r}, expected {_FORMAT_VERSION}")
    tensors = load_file(str(path / STATE_TENSORS_FILE), device=device)
    model_tensors = load_file(str(path / MODEL_FILE), device=device)
    return Checkpoint(
        path=path,
        step=int(document["step"]),
        model_state={key: model_tensors[key] for key in document["model_keys"]},
        training_state=_decode(document["training_state"], tensors),
    )


# ----------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if initialised) CUDA generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what `capture_rng_state` took."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning("checkpoint holds CUDA RNG states but CUDA is not available")
