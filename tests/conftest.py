"""Suite-wide settings: deterministic seeds, hypothesis without deadlines, gpu/slow marks,
and no deprecated transformers or torch API on our code paths."""

from __future__ import annotations

import logging
import os
import random
from typing import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

# Shared, noisy 2-core machines: never time a test, keep hypothesis reproducible.
settings.register_profile(
    "tokencompress",
    deadline=None,
    derandomize=True,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("tokencompress")


def pytest_report_header(config: pytest.Config) -> str:
    """Say which versions the suite runs with: `.ci/run` runs it at both ends of the range."""
    from importlib.metadata import version

    names = ("torch", "transformers", "tokenizers", "safetensors", "numpy")
    return "tokencompress versions: " + ", ".join(f"{name} {version(name)}" for name in names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    torch.manual_seed(0)


class _DeprecationLog(logging.Handler):
    """Collects what transformers logs about deprecations (some are logged, not warned)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.messages.append(f"{record.name}: {message}")


_DEPRECATIONS = _DeprecationLog()
logging.getLogger("transformers").addHandler(_DEPRECATIONS)


@pytest.fixture(autouse=True)
def _fail_on_logged_deprecations() -> Iterator[None]:
    """A test whose calls make transformers log a deprecation fails, naming it.

    transformers logs many deprecations once per process (`warning_once`), so the first
    test to reach one is the one that fails; that is enough to keep them out of our code.
    """
    before = len(_DEPRECATIONS.messages)
    yield
    new = _DEPRECATIONS.messages[before:]
    if new:
        pytest.fail("transformers logged a deprecation: " + "; ".join(new), pytrace=False)
