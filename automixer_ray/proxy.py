"""Train a small causal LM on a corpus and save Hugging Face checkpoints along the way.

AutoMixer (Chang et al., ACL 2025, arXiv 2506.21910) takes its mixers from the checkpoints of a
small proxy pretraining run. This module makes such a run: a GPT-2 or Llama model sized from
arguments, AdamW with linear warmup and cosine decay, gradient clipping, and a checkpoint folder
``checkpoint-{step:06d}/`` every ``save_every`` steps and at the last step. The training loop takes
any stream of token batches, so the proxy simulation of candidate mixtures reuses it.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from typing import Callable, Iterable, Iterator, Literal, Optional

import torch

from automixer_ray.corpus import interleave_by_weight, iter_texts, list_shards, read_shard, shards_by_source

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = "checkpoint-{step:06d}"


def build_model(*, arch: Literal["gpt2", "llama"], vocab_size: int, context_length: int, num_layers: int,
                hidden_size: int, num_heads: int, pad_token_id: int, eos_token_id: int, seed: int):
    """Build a randomly initialised causal LM; the same arguments and seed give the same weights.

    Llama uses an MLP width of 4 x ``hidden_size`` and full multi-head attention.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                         "pick a head count that divides the width")
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=context_length, n_embd=hidden_size,
                            n_layer=num_layers, n_head=num_heads, bos_token_id=eos_token_id,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        return GPT2LMHeadModel(config)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=context_length,
                             hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             num_key_value_heads=num_heads, bos_token_id=eos_token_id,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        return LlamaForCausalLM(config)
    raise ValueError(f"arch={arch!r} is invalid; allowed values: 'gpt2', 'llama'")


def pack_token_batches(token_stream: Iterable[list[int]], *, batch_size: int, context_length: int,
                       eos_id: Optional[int], seed: int, buffer_rows: int = 1024) -> Iterator[torch.Tensor]:
    """Pack documents into [batch_size, context_length] LongTensor batches of token ids.

    Documents are concatenated with ``eos_id`` after each one (None when the items already end
    with their separator) and cut into rows of ``context_length`` tokens. Rows are shuffled in a
    seeded buffer of ``buffer_rows``. Only full batches are yielded, so a finite stream drops its
    last partial row and fewer than ``batch_size`` leftover rows.
    """
    rng = random.Random(seed)
    buffer: list[list[int]] = []
    pending: list[int] = []
    capacity = max(buffer_rows, batch_size)

    def take_batch() -> torch.Tensor:
        rows = []
        for _ in range(batch_size):
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            rows.append(buffer.pop())
        return torch.tensor(rows, dtype=torch.long)  # [batch_size, context_length]

    for tokens in token_stream:
        pending.extend(tokens)
        if eos_id is not None:
            pending.append(eos_id)
        while len(pending) >= context_length:
            buffer.append(pending[:context_length])
            del pending[:context_length]
            if len(buffer) >= capacity:
                yield take_batch()
    while len(buffer) >= batch_size:
        yield take_batch()


def _save_checkpoint(model, tokenizer, output_dir: str, step: int, state: dict) -> str:
    """Write a checkpoint to a temporary folder and rename it, so a crash never leaves half of one."""
    path = os.path.join(output_dir, CHECKPOINT_PATTERN.format(step=step))
    staging = path + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    with open(os.path.join(staging, "trainer_state.json"), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2)
    os.replace(staging, path)
    return path


def _check_empty_output(output_dir: str) -> None:
    if not os.path.isdir(output_dir):
        return
    existing = sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-"))
    if existing:
        raise FileExistsError(f"{output_dir} already contains checkpoints ({', '.join(existing[:3])}); "
                              "pass an empty output folder or delete the old run")


def _loss_labels(batch: torch.Tensor, pad_token_id: Optional[int], eos_token_id: Optional[int]) -> torch.Tensor:
    labels = batch.clone()
    if pad_token_id is not None and pad_token_id != eos_token_id:
        labels[batch == pad_token_id] = -100  # padding never counts in the loss
    return labels


def _make_optimizer(model, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95))


def train_causal_lm(model, tokenizer, batches: Iterable[torch.Tensor], *, steps: int, learning_rate: float,
                    warmup_steps: int, save_every: int, output_dir: str, seed: int,
                    eval_fn: Optional[Callable[[object, int], dict]] = None, eval_every: Optional[int] = None,
                    progress: bool = True, weight_decay: float = 0.1, max_grad_norm: float = 1.0) -> list[str]:
    """Train ``model`` on ``batches`` ([B, T] token ids) and return the saved checkpoint folders.

    Each checkpoint's ``trainer_state.json`` stores ``global_step``, the ``learning_rate`` of that
    step, ``loss`` (mean training loss since the previous checkpoint) and ``log_history``.
    ``eval_fn(model, step)`` runs every ``eval_every`` steps and its metrics join the history.
    A stream that ends early stops training and saves the last step reached.
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    if steps < 1 or save_every < 1:
        raise ValueError(f"steps={steps} and save_every={save_every} must both be at least 1")
    _check_empty_output(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = _make_optimizer(model, learning_rate, weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, steps), steps)
    iterator = iter(batches)
    saved: list[str] = []
    history: list[dict] = []
    window: list[float] = []
    model.train()
    bar = tqdm(total=steps, desc="train", disable=not progress)
    step = 0
    for step in range(1, steps + 1):
        batch = next(iterator, None)
        if batch is None:
            logger.warning("batch stream ended after %d of %d steps; saving the last step reached", step - 1, steps)
            step -= 1
            break
        batch = batch.to(device)  # [B, T]
        lr = scheduler.get_last_lr()[0]
        loss = model(input_ids=batch, labels=_loss_labels(batch, tokenizer.pad_token_id, tokenizer.eos_token_id)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step} (learning rate {lr:.3g}); "
                                     "lower the learning rate or check the input tokens")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        entry = {"step": step, "loss": window[-1], "learning_rate": lr}
        if eval_fn is not None and eval_every and step % eval_every == 0:
            model.eval()
            entry.update(eval_fn(model, step))
            model.train()
        history.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1]:.3f}")
        if step % save_every == 0 or step == steps:
            saved.append(_save_window(model, tokenizer, output_dir, step, lr, window, history, seed))
            window = []
    bar.close()
    if step > 0 and (not saved or not saved[-1].endswith(CHECKPOINT_PATTERN.format(step=step))):
        saved.append(_save_window(model, tokenizer, output_dir, step, history[-1]["learning_rate"], window,
                                  history, seed))
    model.eval()
    return saved


def _save_window(model, tokenizer, output_dir: str, step: int, lr: float, window: list[float],
                 history: list[dict], seed: int) -> str:
    mean_loss = sum(window) / len(window) if window else float("nan")
    state = {"global_step": step, "learning_rate": lr, "loss": mean_loss, "seed": seed, "log_history": history}
    path = _save_checkpoint(model, tokenizer, output_dir, step, state)
    logger.info("saved %s (step %d, loss %.4f, learning rate %.3g)", path, step, mean_loss, lr)
    return path


def _source_pieces(shards, tokenizer, piece_tokens: int, eos_id: int) -> Iterator[list[int]]:
    """Yield a source's documents, repeated forever, as token pieces; a document's last piece ends with eos."""
    for epoch in itertools.count():
        produced = False
        for shard in shards:
            for record in read_shard(shard):
                if record["skip_reason"] is not None:
                    continue
                ids = tokenizer(record["text"], add_special_tokens=False, verbose=False)["input_ids"] + [eos_id]
                produced = True
                for start in range(0, len(ids), piece_tokens):
                    yield ids[start:start + piece_tokens]
        if not produced:
            return
        logger.debug("source %s starts epoch %d", shards[0].source, epoch + 1)


def corpus_token_stream(corpus_uris: list[str], tokenizer, *, piece_tokens: int, seed: int) -> Iterator[list[int]]:
    """Yield an endless stream of token pieces drawn from the sources in proportion to their bytes.

    Pieces of at most ``piece_tokens`` keep long documents (a whole book) from filling many
    batches in a row. Every source repeats when it runs out.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token; documents cannot be separated when packed")
    groups, sizes = shards_by_source(list_shards(corpus_uris))
    shares = ", ".join(f"{source} {size / sum(sizes.values()):.1%}" for source, size in sorted(sizes.items()))
    logger.info("training stream draws from %d sources by bytes: %s", len(groups), shares)
    streams = {source: _source_pieces(shards, tokenizer, piece_tokens, eos_id) for source, shards in groups.items()}
    return interleave_by_weight(streams, sizes, seed=seed)


def _proxy_tokenizer(corpus_uris: list[str], output_dir: str, tokenizer_dir: Optional[str], vocab_size: int,
                     context_length: int, max_chars: Optional[int]):
    from transformers import AutoTokenizer

    from automixer_ray.tokenizer import train_tokenizer

    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        logger.info("loaded tokenizer from %s (vocab %d)", tokenizer_dir, len(tokenizer))
        return tokenizer
    path = os.path.join(output_dir, "tokenizer")
    return train_tokenizer(iter_texts(corpus_uris, max_chars=max_chars), path, vocab_size=vocab_size,
                           model_max_length=context_length)


def train_proxy(*, corpus_uris: list[str], output_dir: str, steps: int, save_every: int,
                tokenizer_dir: Optional[str] = None, vocab_size: int = 4096, arch: str = "gpt2",
                context_length: int = 128, num_layers: int = 2, hidden_size: int = 64, num_heads: int = 2,
                batch_size: int = 16, learning_rate: float = 1e-3, seed: int = 0,
                max_chars: Optional[int] = None, progress: bool = True) -> list[str]:
    """Train a proxy model on a corpus and return its checkpoint folders (the ``train-proxy`` command).

    Without ``tokenizer_dir`` a byte-level BPE tokenizer is trained into ``output_dir/tokenizer``
    on at most ``max_chars`` characters of the corpus (None: all of it). Warmup lasts 10% of
    ``steps``. The model trains on the CPU unless CUDA is available.
    """
    _check_empty_output(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer = _proxy_tokenizer(corpus_uris, output_dir, tokenizer_dir, vocab_size, context_length, max_chars)
    model = build_model(arch=arch, vocab_size=len(tokenizer), context_length=context_length,
                        num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, seed=seed)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("proxy %s: %d layers, width %d, %d heads, context %d, vocab %d, %.2fM parameters; "
                "%d steps of %d x %d tokens (%d tokens), checkpoint every %d steps",
                arch, num_layers, hidden_size, num_heads, context_length, len(tokenizer), num_params / 1e6,
                steps, batch_size, context_length, steps * batch_size * context_length, save_every)
    stream = corpus_token_stream(corpus_uris, tokenizer, piece_tokens=context_length, seed=seed)
    batches = pack_token_batches(stream, batch_size=batch_size, context_length=context_length, eos_id=None,
                                 seed=seed, buffer_rows=max(64 * batch_size, 1024))
    started = time.monotonic()
    paths = train_causal_lm(model, tokenizer, batches, steps=steps, learning_rate=learning_rate,
                            warmup_steps=max(1, math.ceil(0.1 * steps)), save_every=save_every,
                            output_dir=output_dir, seed=seed, progress=progress)
    logger.info("trained %d steps in %.1f s; %d checkpoints in %s", steps, time.monotonic() - started,
                len(paths), output_dir)
    return paths
