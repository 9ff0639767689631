"""Shared fixtures for the recipe tests: a tiny tokenizer and a tiny synthetic data set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from recipes.flashsloth.data import conversation_texts, load_llava_json
from recipes.flashsloth.synthetic import generate_dataset
from recipes.flashsloth.tokenizer import build_tiny_tokenizer

TINY_IMAGE_SIZE = 48


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic data set of 8 train and 4 test pictures (read-only: copy to modify)."""
    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(out, num_train=8, num_test=4, seed=0, image_size=TINY_IMAGE_SIZE,
                     text_only_fraction=0.25, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(synthetic_dir: Path):
    """A byte-level BPE tokenizer trained on the synthetic texts (no downloads)."""
    texts = []
    for name in ("pretrain.json", "instruct.json", "test.json"):
        texts += list(conversation_texts(load_llava_json(synthetic_dir / name)))
    return build_tiny_tokenizer(texts, vocab_size=400)


@pytest.fixture
def one_cpu_thread() -> Iterator[None]:
    """Bitwise-equal runs on CPU need a fixed thread count: with several threads some
    kernels (SDPA's CPU backward among them) reduce in a varying order, so two identical
    runs already differ in the 8th digit, resumed or not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
