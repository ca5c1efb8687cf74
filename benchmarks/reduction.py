"""Time and peak memory of the reduction (mixture.build_mixture) against influence-table size.

Each table is synthetic: sample rows with the influence table's columns, two artifact checkpoints,
three tasks and normally distributed scores, written to Parquet and read back with Ray Data as
the job does. Peak memory is the summed RSS of this driver and every Ray worker process, sampled
every 0.2 s by psutil in a thread.

    .venv/bin/python benchmarks/reduction.py                 # 10k, 100k and 1M rows
    .venv/bin/python benchmarks/reduction.py --rows 10000    # one size
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import common
import memory
from automixer_ray.config import MixtureConfig
from automixer_ray.mixture import build_mixture, influence_column

logger = logging.getLogger(__name__)
SELECTED = {"arc_easy": "checkpoint-100", "boolq": "checkpoint-200", "piqa": "checkpoint-200"}


def write_table(path: str, rows: int, *, seed: int = 0, rows_per_file: int = 100_000) -> None:
    """Write ``rows`` synthetic influence rows as Parquet files under ``path``."""
    rng = np.random.default_rng(seed)
    columns = [influence_column(c, t) for c in sorted(set(SELECTED.values())) for t in SELECTED]
    for part, start in enumerate(range(0, rows, rows_per_file)):
        count = min(rows_per_file, rows - start)
        index = np.arange(start, start + count)
        uri = [f"file:///corpus/shard-{i // 1000:05d}.jsonl" for i in index]
        table = {
            "sample_id": [f"{i:016x}" for i in index], "doc_id": [f"{i // 4:016x}" for i in index],
            "source": np.where(index % 3 == 0, "wikitext", "news").astype(object),
            "uri": uri, "row": index % 1000, "chunk": (index % 4).astype(np.int32),
            "char_start": np.zeros(count, dtype=np.int64), "char_end": np.full(count, 900, dtype=np.int64),
            "location": [f"{u}#row={i % 1000}&chars=0-900" for u, i in zip(uri, index)],
            "n_tokens": rng.integers(16, 256, count).astype(np.int32),
            "skip_reason": pa.nulls(count, pa.string()),
        }
        for name in columns:
            table[name] = rng.standard_normal(count).astype(np.float32)
        pq.write_table(pa.table(table), f"{path}/part-{part:05d}.parquet")


def measure(rows: int) -> dict:
    import ray

    with tempfile.TemporaryDirectory() as folder:
        write_table(folder, rows)
        with memory.PeakRSS() as peak:
            start = time.perf_counter()
            result = build_mixture(ray.data.read_parquet(folder), selected=SELECTED,
                                   config=MixtureConfig(top_k_percent=50.0, beta=1.0, token_budget=rows * 64),
                                   output_dir=f"{folder}/out")
            seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_gib": peak.peak_bytes / 2**30, "driver_peak_rss_gib": peak.driver_peak_bytes / 2**30,
            "groups": len(result.groups), "scored": result.counts["scored"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="influence-table sizes")
    parser.add_argument("--name", default="reduction", help="result file name under benchmarks/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from automixer_ray.raycluster import init_local_ray

    init_local_ray()
    runs = [measure(rows) for rows in args.rows]
    common.write_result(args.name, {"runs": runs})


if __name__ == "__main__":
    main()
