"""The lmms-eval entry point (group `lmms_eval.models` in pyproject.toml): registers the
model `tokencompress` without importing it (or lmms-eval's heavy modules) until used."""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_ID", "manifest"]

MODEL_ID = "tokencompress"


def manifest() -> Any:
    """lmms-eval's `ModelManifest` of `TokenCompressLMM` (called by lmms-eval's registry)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="tokencompress.evaluation.lmms_model.TokenCompressLMM")
