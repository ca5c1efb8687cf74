"""Shared pieces of the benchmark scripts: machine facts, real corpus batches, GPT-2 models, timing.

Every script builds its models with random initialisation from a tokenizer trained on the real
corpus, cuts real corpus text into fixed-length token chunks, and writes one JSON file under
``benchmarks/results/``. Timings are medians of several repeats because the benchmark machine
may be shared with other work; the load average is recorded next to every result.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"
DATA_DIR = Path(os.environ.get("AUTOMIXER_DATA", REPO_ROOT.parent / "shared" / "data"))
CORPUS_DIR = DATA_DIR / "corpus"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

logger = logging.getLogger(__name__)


def machine_info() -> dict[str, Any]:
    """Return the CPU model, core count, RAM, load average and library versions of this machine."""
    import torch

    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        logger.warning("lscpu is not available; recording platform.processor() as the CPU model")
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "ram_gib": round(ram_gib, 1),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def corpus_texts(max_chars: int = 3_000_000) -> list[str]:
    """Read real corpus documents: WikiText articles, then BBC news articles, up to ``max_chars``."""
    if not CORPUS_DIR.is_dir():
        raise FileNotFoundError(f"corpus folder {CORPUS_DIR} not found; set AUTOMIXER_DATA to the data folder")
    texts, total = [], 0
    for path in sorted((CORPUS_DIR / "wikitext").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                texts.append(json.loads(line)["text"])
                total += len(texts[-1])
    for path in sorted((CORPUS_DIR / "news").glob("*/*.txt")):
        if total > max_chars:
            break
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(texts[-1])
    return texts


def benchmark_tokenizer(vocab_size: int = 8192):
    """Train (once, then load from benchmarks/.cache) a byte-level BPE tokenizer on the real corpus."""
    from transformers import AutoTokenizer

    from automixer_ray.tokenizer import train_tokenizer

    path = CACHE_DIR / f"tokenizer-{vocab_size}"
    if not (path / "tokenizer.json").is_file():
        train_tokenizer(corpus_texts(), str(path), vocab_size=vocab_size, model_max_length=1024)
    return AutoTokenizer.from_pretrained(str(path))


def token_chunks(tokenizer, num_samples: int, num_tokens: int):
    """Return [num_samples, num_tokens] int64 ids: consecutive chunks of the tokenized corpus."""
    import torch

    ids: list[int] = []
    for text in corpus_texts():
        ids.extend(tokenizer(text)["input_ids"])
        if len(ids) >= num_samples * num_tokens:
            break
    if len(ids) < num_samples * num_tokens:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than {num_samples} x {num_tokens}; "
                         "ask for fewer or shorter samples")
    return torch.tensor(ids[:num_samples * num_tokens], dtype=torch.long).view(num_samples, num_tokens)


def gpt2_model(*, width: int, layers: int, vocab_size: int, context: int = 1024, seed: int = 0):
    """Build a randomly initialised GPT-2 (head size 64) in eval mode, without dropout."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # GPT-2's default special-token id 50256 lies outside a small vocabulary; the tokenizers of
    # automixer_ray.tokenizer give their end-of-text token id 0.
    config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def time_call(function: Callable[[], Any], *, repeats: int, warmup: int = 1) -> list[float]:
    """Run ``function`` ``warmup`` times untimed, then ``repeats`` times; return each run's seconds."""
    import torch

    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def summarize(seconds: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "runs_s": [round(s, 4) for s in seconds]}


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``result`` with the machine facts to benchmarks/results/<name>.json and print it."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **result}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(payload, indent=2))
    return path
