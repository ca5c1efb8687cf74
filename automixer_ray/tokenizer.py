"""Train a byte-level BPE tokenizer on raw text and save it as a transformers tokenizer."""

from __future__ import annotations

import logging
import os
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(
    texts: Iterable[str],
    output_dir: str,
    *,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    model_max_length: int = 256,
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and save it to ``output_dir`` with eos and pad tokens.

    Byte-level BPE covers every byte, so no text maps to an unknown token.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small; byte-level BPE needs at least 300 (256 bytes + merges)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    num_texts = 0

    def counted(items: Iterable[str]) -> Iterator[str]:
        nonlocal num_texts
        for item in items:
            num_texts += 1
            yield item

    backend.train_from_iterator(counted(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    logger.info("trained byte-level BPE on %d texts: vocab %d, saved to %s",
                num_texts, len(tokenizer), output_dir)
    return tokenizer
