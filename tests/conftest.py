"""Shared fixtures: a local Ray bound to 127.0.0.1, real data paths, a tokenizer and tiny models."""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AUTOMIXER_DATA", REPO_ROOT.parent / "shared" / "data"))
CORPUS_DIR = SHARED_DATA / "corpus"
TASKS_DIR = SHARED_DATA / "tasks"

logging.basicConfig(level=logging.INFO)


def pytest_configure(config):
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data folder {SHARED_DATA} not found; set AUTOMIXER_DATA to the shared/data folder")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session with every port on 127.0.0.1 and this machine's CPUs.

    The pipeline sizes its actor pools from these resources (``raycluster.plan_pools``), leaving
    CPUs for the read and tokenize tasks.
    """
    import ray

    from automixer_ray.raycluster import init_local_ray

    init_local_ray()
    yield ray
    ray.shutdown()


def _corpus_texts(limit_chars: int) -> list[str]:
    texts, total = [], 0
    for path in sorted((CORPUS_DIR / "wikitext").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                texts.append(json.loads(line)["text"])
                total += len(texts[-1])
    for path in sorted((CORPUS_DIR / "news").glob("*/*.txt"))[::5]:
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(texts[-1])
        if total > limit_chars:
            break
    return texts


@pytest.fixture(scope="session")
def corpus_texts(shared_data) -> list[str]:
    """Real corpus documents (WikiText articles and BBC news), about 2 MB of text."""
    return _corpus_texts(limit_chars=2_000_000)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_texts) -> str:
    """A byte-level BPE tokenizer (vocab 2048) trained on the real corpus."""
    from automixer_ray.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus_texts, str(path), vocab_size=2048, model_max_length=128)
    return str(path)


def _save_tiny_model(kind: str, tokenizer_dir: str, output_dir: Path, seed: int = 0) -> str:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=128, hidden_size=32,
                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, bos_token_id=tokenizer.eos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    (output_dir / "trainer_state.json").write_text(json.dumps({"global_step": 0, "learning_rate": 0.0}))
    return str(output_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer_dir) -> str:
    """An untrained 2-layer GPT-2 (width 32) saved as a checkpoint folder with the tokenizer."""
    return _save_tiny_model("gpt2", tokenizer_dir, tmp_path_factory.mktemp("tiny") / "gpt2" / "checkpoint-000000")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> str:
    """An untrained 2-layer Llama (width 32, grouped-query attention) saved as a checkpoint folder."""
    return _save_tiny_model("llama", tokenizer_dir, tmp_path_factory.mktemp("tiny") / "llama" / "checkpoint-000000")


@pytest.fixture(scope="session")
def proxy_run(tmp_path_factory, shared_data, tokenizer_dir) -> str:
    """A GPT-2 proxy (2 layers, width 64, context 128) trained 150 steps on the real corpus.

    Returns the run folder, which contains checkpoint-000050, checkpoint-000100 and checkpoint-000150.
    """
    import torch

    from automixer_ray.proxy import train_proxy

    run_dir = tmp_path_factory.mktemp("proxy_run")
    threads = torch.get_num_threads()
    # On a 2-CPU machine at load average 7 (parallel test runs), 10 steps of this model took
    # 10.3 s with two torch threads and 1.3 s with one, because the threads oversubscribe the CPUs.
    torch.set_num_threads(1)
    try:
        train_proxy(corpus_uris=[str(CORPUS_DIR)], output_dir=str(run_dir), steps=150, save_every=50,
                    tokenizer_dir=tokenizer_dir, seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    return str(run_dir)
