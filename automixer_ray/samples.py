"""The Ray Data stream of corpus samples: read shards, chunk and tokenize, subsample, score.

Read tasks are plain Ray tasks that each read a few shards. Chunking and tokenizing run in
``map_batches`` with a tokenizer loaded once per actor, and scoring runs in one actor pool per
artifact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data

from automixer_ray import corpus
from automixer_ray.chunking import SAMPLE_SCHEMA, ChunkAndTokenize
from automixer_ray.config import JobConfig
from automixer_ray.influence import ScoringActor, influence_column
from automixer_ray.raycluster import STREAM_TASK_CPUS, max_tokenize_actors, plan_pools

logger = logging.getLogger(__name__)


def model_context_length(checkpoint_path: str) -> int:
    """Return the model's context size in tokens, from its ``config.json``."""
    with open(os.path.join(checkpoint_path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len"):
        if isinstance(config.get(key), int):
            return config[key]
    raise ValueError(f"{checkpoint_path}/config.json has no context size (n_positions or "
                     "max_position_embeddings); set corpus.chunk_num_tokens")


def _read_shard_rows(item: dict[str, Any], *, text_field: str, source_field: str | None,
                     decode_errors: str) -> Iterator[dict[str, Any]]:
    shard = corpus.Shard(uri=item["uri"], format=item["format"], source=item["source"])
    yield from corpus.read_shard(shard, text_field=text_field, source_field=source_field,
                                 decode_errors=decode_errors)


def subsample_key(sample_id: str, seed: int) -> str:
    """Return the seeded hash that orders samples for subsampling (16 hex digits)."""
    return hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).hexdigest()


class SampleBuilder(ChunkAndTokenize):
    """Chunk and tokenize records, then keep only samples whose subsample key is <= ``max_key``.

    Filtering here, inside the tokenizing actor, keeps the subsample a per-shard decision: a sample
    is kept or not whatever else the corpus holds, once the threshold is known.
    """

    def __init__(self, tokenizer_path: str, chunk_num_tokens: int, *, max_key: str | None = None,
                 seed: int = 0, keys_only: bool = False) -> None:
        super().__init__(tokenizer_path, chunk_num_tokens)
        self.max_key = max_key
        self.seed = seed
        self.keys_only = keys_only

    def __call__(self, batch: Any):
        table = super().__call__(batch)
        if self.max_key is None and not self.keys_only:
            return table
        keys = np.array([subsample_key(sid, self.seed) for sid in table.column("sample_id").to_pylist()],
                        dtype=object)
        if self.keys_only:
            return {"subsample_key": keys}
        return table.filter(pa.array(keys <= self.max_key))


def _records(config: JobConfig, shards: list) -> ray.data.Dataset:
    items = [{"uri": s.uri, "format": s.format, "source": s.source} for s in shards]
    # A read task takes several small shards, which keeps per-task overhead low for corpora of
    # many small files (one news article a file). Ray Data's block sizing splits large shards.
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64))).flat_map(
        _read_shard_rows,
        fn_kwargs={"text_field": config.corpus.text_field, "source_field": config.corpus.source_field,
                   "decode_errors": config.corpus.decode_errors},
        num_cpus=STREAM_TASK_CPUS,
    )


def _build(records: ray.data.Dataset, *, tokenizer_path: str, chunk_num_tokens: int, **kwargs) -> ray.data.Dataset:
    return records.map_batches(
        SampleBuilder,
        fn_constructor_kwargs={"tokenizer_path": tokenizer_path, "chunk_num_tokens": chunk_num_tokens, **kwargs},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_tokenize_actors()),
        batch_size=64,
        num_cpus=STREAM_TASK_CPUS,
    )


def subsample_threshold(config: JobConfig, shards: list, *, tokenizer_path: str) -> str | None:
    """Find the largest subsample key among the ``max_samples`` smallest, by a pass over the corpus.

    Only the 16-hex-digit keys reach the driver (8 bytes a sample), never the samples.
    """
    limit = config.corpus.max_samples
    if limit is None:
        return None
    chunk_num_tokens = config.corpus.chunk_num_tokens or model_context_length(tokenizer_path)
    keyed = _build(_records(config, shards), tokenizer_path=tokenizer_path, chunk_num_tokens=chunk_num_tokens,
                   seed=config.corpus.sample_seed, keys_only=True)
    keys = []
    for batch in keyed.iter_batches(batch_format="numpy", batch_size=None):
        keys.append(np.asarray(batch["subsample_key"], dtype="U16"))
    all_keys = np.concatenate(keys) if keys else np.array([], dtype="U16")
    total = len(all_keys)
    if total <= limit:
        logger.info("subsampling: the corpus has %d samples, within corpus.max_samples=%d; keeping all", total, limit)
        return None
    threshold = str(np.partition(all_keys, limit - 1)[limit - 1])
    logger.info("subsampling: keeping %d of %d samples (seed %d, key threshold %s)",
                limit, total, config.corpus.sample_seed, threshold)
    return threshold


def build_sample_dataset(config: JobConfig, shards: list, *, tokenizer_path: str,
                         max_key: str | None = None) -> ray.data.Dataset:
    """Build the lazy dataset of sample rows (the columns of docs/DESIGN.md "Sample rows")."""
    chunk_num_tokens = config.corpus.chunk_num_tokens or model_context_length(tokenizer_path)
    logger.info("corpus: %d shards, chunks of at most %d tokens", len(shards), chunk_num_tokens)
    return _build(_records(config, shards), tokenizer_path=tokenizer_path, chunk_num_tokens=chunk_num_tokens,
                  max_key=max_key, seed=config.corpus.sample_seed)


def score_samples(config: JobConfig, samples: ray.data.Dataset, plan) -> ray.data.Dataset:
    """Chain one scoring actor pool per artifact checkpoint; each adds its influence columns."""
    pools = plan_pools(len(plan.artifacts), actors_per_pool=config.ray.actors_per_checkpoint,
                       num_gpus_per_actor=config.ray.num_gpus_per_actor,
                       num_cpus_per_actor=config.ray.num_cpus_per_actor)
    scored = samples
    for info in plan.artifacts:
        scored = scored.map_batches(
            ScoringActor,
            fn_constructor_kwargs={
                "checkpoint_name": info.name,
                "checkpoint_path": info.path,
                "layer_names": plan.kept_layers,
                "projection": config.projection,
                "task_names": plan.task_names,
                "task_matrix": plan.task_matrices[info.name],
                "identity": plan.identities[info.name],
                "metric": config.influence.metric,
                "batch_size": config.influence.batch_size,
                "max_batch_tokens": config.influence.max_batch_tokens,
                "num_threads": pools.num_threads_per_actor,
                "allow_pickle": config.checkpoints.allow_pickle,
                "trust_remote_code": config.checkpoints.trust_remote_code,
            },
            compute=ray.data.ActorPoolStrategy(size=pools.num_actors),
            batch_size=config.influence.batch_size * 4,
            batch_format="numpy",
            num_cpus=pools.num_cpus_per_actor,
            num_gpus=pools.num_gpus_per_actor,
        )
    columns = [influence_column(info.name, task) for info in plan.artifacts for task in plan.task_names]
    return scored.map_batches(to_influence_rows, fn_kwargs={"influence_columns": columns},
                              batch_format="numpy", num_cpus=STREAM_TASK_CPUS)


def influence_schema(influence_columns: list[str]) -> pa.Schema:
    """Return the influence table's Arrow schema: the sample columns without tokens, then scores."""
    fields = [field for field in SAMPLE_SCHEMA if field.name != "input_ids"]
    return pa.schema(fields + [pa.field(name, pa.float32()) for name in influence_columns])


def to_influence_rows(batch: dict[str, np.ndarray], *, influence_columns: list[str]) -> pa.Table:
    """Drop the tokens and give every block the same schema, whatever its values (all-null or not)."""
    schema = influence_schema(influence_columns)
    arrays = []
    for field in schema:
        values = batch[field.name]
        if field.name == "skip_reason":
            values = [value if isinstance(value, str) else None for value in values]
        arrays.append(pa.array(values, type=field.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)
