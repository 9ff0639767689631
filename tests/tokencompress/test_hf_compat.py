"""The transformers differences we paper over, and the suite's guard against deprecations."""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import torch
from packaging.version import Version
from transformers import DynamicCache, LlamaConfig, LlamaModel

from tests.conftest import _DEPRECATIONS
from tokencompress.hf_compat import CACHE_ARGUMENT, TRANSFORMERS_VERSION, cache_argument


def _tiny_llama() -> LlamaModel:
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    return LlamaModel(config).eval()


def test_the_cache_argument_is_the_one_the_models_take() -> None:
    parameters = inspect.signature(LlamaModel.forward).parameters
    assert CACHE_ARGUMENT in parameters
    assert (CACHE_ARGUMENT == "cache") == (TRANSFORMERS_VERSION >= Version("5.24.0.dev0"))


def test_cache_argument_fills_the_cache_with_the_prompt() -> None:
    model = _tiny_llama()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), use_cache=True, **cache_argument(cache))
    assert cache.get_seq_length() == 5


def test_the_deprecated_cache_name_fails_the_suite_where_it_is_deprecated() -> None:
    """pyproject's filterwarnings turns transformers' FutureWarning into an error."""
    if CACHE_ARGUMENT == "past_key_values":
        pytest.skip(f"transformers {TRANSFORMERS_VERSION} has not renamed past_key_values yet")
    model = _tiny_llama()
    with pytest.raises(FutureWarning, match="past_key_values"):
        model(input_ids=torch.tensor([[1, 2]]), use_cache=True, past_key_values=DynamicCache(config=model.config))


def test_deprecation_warnings_from_torch_are_errors() -> None:
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("old api", DeprecationWarning, "torch/fake.py", 1, module="torch.fake")
    with pytest.raises(FutureWarning):
        warnings.warn_explicit("old api", FutureWarning, "transformers/fake.py", 1, module="transformers.fake")


def test_logged_deprecations_are_collected_for_the_failing_fixture() -> None:
    before = len(_DEPRECATIONS.messages)
    logging.getLogger("transformers.models.fake").warning("`old_name` is deprecated, use `new_name`")
    logging.getLogger("transformers.models.fake").warning("an ordinary warning")
    collected = _DEPRECATIONS.messages[before:]
    del _DEPRECATIONS.messages[before:]  # this test's own message must not fail it
    assert collected == ["transformers.models.fake: `old_name` is deprecated, use `new_name`"]
