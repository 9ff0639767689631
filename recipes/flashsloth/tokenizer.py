"""A tiny byte-level BPE tokenizer trained in code: for CPU runs and tests, no downloads.

Byte-level, so every string (newlines included) tokenizes without unknown tokens; the
merges are learnt from the texts given (the synthetic data set and the template's fixed
strings). Training is deterministic for the same texts and vocabulary size.
"""

from __future__ import annotations

from typing import Iterable

from transformers import PreTrainedTokenizerFast

__all__ = ["EOS_TOKEN", "IMAGE_TOKEN", "PAD_TOKEN", "QUERY_TOKEN", "build_tiny_tokenizer"]

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<image>"  # one placeholder per visual token
QUERY_TOKEN = "<query>"  # one placeholder per EmbQ query


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Special tokens get the first ids: ``<pad>`` 0, ``</s>`` 1 (eos), ``<image>`` 2,
    ``<query>`` 3. There is no bos token, like phi-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN, QUERY_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(
            f"vocab_size must be at least {len(specials) + len(alphabet)} "
            f"(special tokens + 256 bytes), got {vocab_size}"
        )
    from tokencompress.adapters.prompt import VICUNA_V1_SYSTEM

    # The template's fixed strings appear in every sample: weight them so they merge well.
    corpus = [VICUNA_V1_SYSTEM, "USER: ASSISTANT:"] * 64 + list(texts)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN, QUERY_TOKEN],
    )
