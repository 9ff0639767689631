"""The functions an lmms-eval task YAML names with ``!function``, for a local VQA task.

A task written by `tokencompress.evaluation.local_task.write_local_task` holds one
document per question, with string columns ``id``, ``question``, ``answer``,
``question_type`` and ``image`` (the absolute path of the picture, or "" for a text-only
question). Its ``utils.py`` re-exports the functions here, so the scoring lives in one
place and matches the FlashSloth recipe's own evaluation (`recipes.flashsloth.evaluate`):
an answer is right when it equals the reference after the recipe's `normalize_answer`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

__all__ = [
    "SKIPPED_ANSWER",
    "doc_to_target",
    "doc_to_text",
    "doc_to_visual",
    "load_recipe_evaluate",
    "load_recipe_module",
    "process_results",
]

#: What a model returns, in place of an answer, for a sample it skipped because the
#: sample's image could not be read (the lmms-eval model's ``on_bad_image=skip``).
#: `process_results` counts such a sample under the ``skipped`` metric and scores its
#: ``exact_match`` 0, so one bad file neither stops a long run nor goes unnoticed. The
#: brackets and colons keep it apart from any answer a model gives (normalised, it
#: matches no one-word reference), and it has no surrounding whitespace because lmms-eval
#: strips every prediction before scoring.
SKIPPED_ANSWER = "[tokencompress: skipped: unreadable image]"

_INSTALLED_RECIPE = "tokencompress.recipes.flashsloth"
_CHECKOUT_RECIPE = "recipes.flashsloth"


def load_recipe_module(name: str) -> ModuleType:
    """The FlashSloth recipe's module `name` ("evaluate", "chat", ...), installed or from a
    source checkout.

    Installed, the recipe is ``tokencompress.recipes``; in a checkout run from its root it
    is also the top-level ``recipes`` package. Where the caller already imported it as
    ``recipes`` (the tests, the benchmarks), that copy is used, so that its classes are the
    caller's (two copies of a module have two `FlashSloth` classes). Otherwise the installed
    one; only a missing ``tokencompress.recipes`` falls back to the checkout: an import
    error from inside the recipe is raised as it is.
    """
    if _CHECKOUT_RECIPE in sys.modules:
        return importlib.import_module(f"{_CHECKOUT_RECIPE}.{name}")
    installed = f"{_INSTALLED_RECIPE}.{name}"
    try:
        return importlib.import_module(installed)
    except ModuleNotFoundError as exc:
        # exc.name is the module that was not found; a missing dependency of the recipe
        # (PIL, say) has another name and must not be masked by the fallback's error.
        if exc.name is None or not (installed + ".").startswith(exc.name + "."):
            raise
    return importlib.import_module(f"{_CHECKOUT_RECIPE}.{name}")


def load_recipe_evaluate() -> ModuleType:
    """The FlashSloth recipe's ``evaluate`` module (`load_recipe_module`)."""
    return load_recipe_module("evaluate")


def doc_to_visual(doc: Mapping[str, Any]) -> list[str]:
    """The document's image path as a one-element list; [] for a text-only document.

    Paths, not decoded images: the model opens the file, so an unreadable picture is
    reported (or skipped) with the sample's id instead of failing the data set's load.
    """
    image = doc.get("image")
    return [image] if image else []


def doc_to_text(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """The question, as the recipe asks it (no ``<image>`` marker, no added instruction).

    A ``pre_prompt`` / ``post_prompt`` in ``lmms_eval_specific_kwargs`` (lmms-eval's
    per-model prompt options) is put around it; the written task sets none.
    """
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: Mapping[str, Any]) -> str:
    """The reference answer."""
    return doc["answer"]


def process_results(doc: Mapping[str, Any], results: Sequence[str | None]) -> dict[str, float]:
    """Score one prediction: ``exact_match`` (the recipe's rule) and ``skipped``.

    ``results`` is what lmms-eval passes for a ``generate_until`` request: a list whose
    first item is the model's answer. A skipped sample (`SKIPPED_ANSWER`) scores
    ``exact_match`` 0 and ``skipped`` 1, so accuracy is over all samples, skipped included.
    """
    if not results:
        raise ValueError(f"sample {doc.get('id')!r}: process_results got no prediction")
    prediction = (results[0] or "").strip()  # lmms-eval strips already; direct callers may not
    if prediction == SKIPPED_ANSWER:
        return {"exact_match": 0.0, "skipped": 1.0}
    normalize_answer = load_recipe_evaluate().normalize_answer
    correct = normalize_answer(prediction) == normalize_answer(doc["answer"])
    return {"exact_match": float(correct), "skipped": 0.0}
