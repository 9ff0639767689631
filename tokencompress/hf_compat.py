"""What differs between the transformers releases we support, kept in one place.

The supported range is the one in `pyproject.toml`; `.ci/run` tests both of its ends.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

__all__ = ["TRANSFORMERS_VERSION", "CACHE_ARGUMENT", "cache_argument"]

TRANSFORMERS_VERSION = Version(transformers.__version__)

# transformers 5.24 renamed the models' `past_key_values` argument (and output field) to
# `cache`; the old name warns there and goes in 5.40.
CACHE_ARGUMENT = "cache" if TRANSFORMERS_VERSION >= Version("5.24.0.dev0") else "past_key_values"


def cache_argument(cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the name this transformers gives a model's cache argument."""
    return {CACHE_ARGUMENT: cache}
