"""Training data that follows a mixture manifest: a torch ``IterableDataset`` and a Ray Data builder.

The mixture is an infinite (or ``num_samples``-long) sequence of draws. Draw i picks a group with
probability equal to its manifest weight, then takes that group's next sample in rank order,
starting over at rank 0 when the group is exhausted (a group with ``epochs > 1`` repeats). Both
choices are pure functions of ``(seed, i)``, so:

- the sequence is the same on every run for a seed;
- data-parallel rank r of ``world_size`` takes draws r, r + world_size, r + 2 * world_size, ...,
  so ranks are disjoint and together give the single-rank sequence;
- a resumed loader replays only the cheap group choices up to its position and continues with
  exactly the draws it would have produced next.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from automixer_ray.manifest import group_file_uri, read_manifest, resolve_manifest_uri

logger = logging.getLogger(__name__)

# Group choices are drawn in blocks of this many draws, each block from its own seeded generator.
DRAW_BLOCK = 65536
STATE_VERSION = 1
_LOCATION_COLUMNS = ("sample_id", "source", "location", "uri", "row", "char_start", "char_end", "n_tokens")


@dataclass(frozen=True, kw_only=True)
class GroupSamples:
    """A group file's samples in rank order (location columns only, never the text)."""

    name: str
    columns: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.columns["sample_id"])

    def row(self, position: int) -> dict[str, Any]:
        return {name: values[position] for name, values in self.columns.items()}


@functools.lru_cache(maxsize=64)
def load_group_samples(uri: str, name: str) -> GroupSamples:
    """Read a group file's location columns, cached per process."""
    with fsspec.open(uri, "rb") as handle:
        table = pq.read_table(handle, columns=list(_LOCATION_COLUMNS))
    if table.num_rows == 0:
        raise ValueError(f"group file {uri} of group {name} is empty; a manifest group needs at least one sample")
    return GroupSamples(name=name, columns={column: table.column(column).to_pylist() for column in _LOCATION_COLUMNS})


class DrawSequence:
    """The mixture's draw sequence: which group and which rank in it each draw index takes."""

    def __init__(self, weights: list[float], seed: int) -> None:
        weights_array = np.asarray(weights, dtype=np.float64)
        if len(weights_array) == 0 or not np.all(weights_array > 0) or not np.all(np.isfinite(weights_array)):
            raise ValueError(f"group weights {weights} are invalid; each must be a finite number > 0")
        self.weights = weights_array / weights_array.sum()
        self.seed = seed

    def block_groups(self, block: int) -> np.ndarray:
        """Return the group index of each draw in ``block``, shape [DRAW_BLOCK]."""
        rng = np.random.default_rng([self.seed, block])
        return rng.choice(len(self.weights), size=DRAW_BLOCK, p=self.weights)

    def cursors_at(self, draw_index: int) -> np.ndarray:
        """Return how often each group was drawn before ``draw_index``, shape [groups].

        NOTE: this replays every block before ``draw_index``, so resuming deep into a run costs
        time linear in the position (one ``Generator.choice`` call per 65536 draws).
        """
        counts = np.zeros(len(self.weights), dtype=np.int64)
        full_blocks, rest = divmod(draw_index, DRAW_BLOCK)
        for block in range(full_blocks):
            counts += np.bincount(self.block_groups(block), minlength=len(self.weights))
        if rest:
            counts += np.bincount(self.block_groups(full_blocks)[:rest], minlength=len(self.weights))
        return counts

    def iter_draws(self, start: int, stop: Optional[int],
                   cursors: Optional[np.ndarray] = None) -> Iterator[tuple[int, int, int]]:
        """Yield (draw index, group index, group position) for draws ``start`` <= i < ``stop``.

        The position counts that group's earlier draws from draw 0 on. ``stop=None`` never ends.
        ``cursors`` is ``cursors_at(start)`` when the caller has it already.
        """
        cursors = self.cursors_at(start) if cursors is None else np.array(cursors, dtype=np.int64)
        block = start // DRAW_BLOCK
        while stop is None or block * DRAW_BLOCK < stop:
            groups = self.block_groups(block)  # [DRAW_BLOCK]
            first = max(start - block * DRAW_BLOCK, 0)
            last = DRAW_BLOCK if stop is None else min(DRAW_BLOCK, stop - block * DRAW_BLOCK)
            positions = np.empty(DRAW_BLOCK, dtype=np.int64)
            for group in range(len(self.weights)):
                hits = np.flatnonzero(groups[first:last] == group) + first
                positions[hits] = cursors[group] + np.arange(len(hits))
                cursors[group] += len(hits)
            for offset in range(first, last):
                yield block * DRAW_BLOCK + offset, int(groups[offset]), int(positions[offset])
            block += 1


def _load_tokenizer(tokenizer: Any, manifest: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    if tokenizer is None:
        first = next(iter(manifest["selected"].values()))
        paths = {entry["name"]: entry["path"] for entry in manifest["checkpoints"]}
        tokenizer = paths[first]
        logger.info("loader uses the tokenizer of checkpoint %s at %s", first, tokenizer)
    if isinstance(tokenizer, str):
        return AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


class MixtureDataset(IterableDataset):
    """Token sequences drawn from a manifest's groups by weight; deterministic, resumable, shardable.

    Each item is ``{"sample_id", "group", "draw_index", "input_ids"}`` with ``input_ids`` a 1-D
    ``torch.long`` tensor of the sample's tokens (no special tokens added). ``num_samples`` bounds
    the global draw sequence (all ranks together); None makes the dataset infinite.

    Under a torch ``DataLoader`` with workers, worker k of K takes every K-th of this rank's draws.
    With ``batch_size=1`` the loader then yields the rank's draws in order. ``state_dict()``
    counts the samples this object yielded in the current process. With workers the main
    process's copy does not see them, so pass ``{"samples_yielded": n}`` (the samples the training
    loop consumed) to ``load_state_dict``, together with the seed, rank and world size.
    """

    def __init__(self, manifest_uri: str, *, tokenizer: Union[str, Any, None] = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_samples: Optional[int] = None) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size} is invalid; need world_size >= 1 and "
                             "0 <= rank < world_size")
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples={num_samples} is invalid; pass a count >= 0 or None for no end")
        self.manifest_uri = resolve_manifest_uri(manifest_uri)
        self.manifest = read_manifest(self.manifest_uri)
        self.groups = self.manifest["groups"]
        self.sequence = DrawSequence([group["weight"] for group in self.groups], seed)
        self.seed, self.rank, self.world_size, self.num_samples = seed, rank, world_size, num_samples
        corpus = self.manifest["config"].get("corpus", {})
        self.text_field = corpus.get("text_field", "text")
        self.decode_errors = corpus.get("decode_errors", "replace")
        self.corpus_format = corpus.get("format", "auto")
        self._tokenizer_spec = tokenizer
        self._tokenizer = None
        self._samples_yielded = 0

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "samples_yielded": self._samples_yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["samples_yielded"]`` samples of this rank's sequence."""
        for key in ("seed", "rank", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state has {key}={state[key]} but this loader has {key}={getattr(self, key)}; "
                                 "resume with the same seed and sharding to continue the same sequence")
        samples = state.get("samples_yielded")
        if not isinstance(samples, int) or samples < 0:
            raise ValueError(f"state samples_yielded={samples!r} is invalid; expected an integer >= 0")
        self._samples_yielded = samples

    def _group(self, index: int) -> GroupSamples:
        group = self.groups[index]
        return load_group_samples(group_file_uri(self.manifest_uri, group), group["name"])

    def _tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self._tokenizer_spec, self.manifest)
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def _read_text(self, sample: dict[str, Any]) -> str:
        from automixer_ray.corpus import read_record_text

        text = read_record_text(sample["uri"], sample["row"], text_field=self.text_field,
                                decode_errors=self.decode_errors, format=self.corpus_format)
        return text[sample["char_start"]:sample["char_end"]]

    def iter_locations(self) -> Iterator[dict[str, Any]]:
        """Yield this rank's (and worker's) draws as location rows, without reading any text."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first_local = self._samples_yielded
        start = self.rank + first_local * self.world_size
        for draw_index, group_index, position in self.sequence.iter_draws(start, self.num_samples):
            if draw_index % self.world_size != self.rank:
                continue
            local = (draw_index - self.rank) // self.world_size
            if (local - first_local) % num_workers != worker:
                continue
            group = self._group(group_index)
            sample = group.row(position % len(group))
            yield {"draw_index": draw_index, "group": group.name, **sample}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for sample in self.iter_locations():
            input_ids = self._tokenize(self._read_text(sample))
            if len(input_ids) != sample["n_tokens"]:
                logger.debug("sample %s has %d tokens with this tokenizer, %d in the manifest",
                             sample["sample_id"], len(input_ids), sample["n_tokens"])
            self._samples_yielded += 1
            yield {"sample_id": sample["sample_id"], "group": sample["group"], "draw_index": sample["draw_index"],
                   "input_ids": torch.tensor(input_ids, dtype=torch.long)}


def _expand_blocks(batch: dict[str, np.ndarray], *, manifest_uri: str, seed: int, num_samples: int) -> dict[str, list]:
    """Turn draw blocks (id and start cursors) into their draw rows; runs in Ray Data tasks."""
    manifest = read_manifest(manifest_uri)
    groups = manifest["groups"]
    sequence = DrawSequence([group["weight"] for group in groups], seed)
    rows: dict[str, list] = {name: [] for name in ("draw_index", "group", *_LOCATION_COLUMNS)}
    for block, cursors in zip(batch["block"].tolist(), batch["cursors"]):
        stop = min((block + 1) * DRAW_BLOCK, num_samples)
        for draw_index, group_index, position in sequence.iter_draws(block * DRAW_BLOCK, stop, cursors):
            samples = load_group_samples(group_file_uri(manifest_uri, groups[group_index]), groups[group_index]["name"])
            rows["draw_index"].append(draw_index)
            rows["group"].append(samples.name)
            for name, value in samples.row(position % len(samples)).items():
                rows[name].append(value)
    return rows


def build_ray_dataset(manifest_uri: str, *, num_samples: int, seed: int = 0):
    """Return a ``ray.data.Dataset`` of the first ``num_samples`` draws, in draw order.

    Rows hold ``draw_index``, ``group`` and the sample's location columns (``sample_id``,
    ``source``, ``location``, ``uri``, ``row``, ``char_start``, ``char_end``, ``n_tokens``); the
    sequence equals a single-rank :class:`MixtureDataset` with the same seed. Ray Train workers
    can shard it with ``streaming_split`` and read the text with ``corpus.read_record_text``.
    """
    import ray.data

    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} is invalid; pass the number of draws to build (>= 1)")
    manifest_uri = resolve_manifest_uri(manifest_uri)
    manifest = read_manifest(manifest_uri)  # fails on the driver, naming the URI, before any task starts
    sequence = DrawSequence([group["weight"] for group in manifest["groups"]], seed)
    # Each block's start cursors come from one pass over the group choices here, so that no task
    # has to replay the blocks before its own.
    items, cursors = [], np.zeros(len(sequence.weights), dtype=np.int64)
    for block in range(-(-num_samples // DRAW_BLOCK)):
        items.append({"block": block, "cursors": cursors.tolist()})
        cursors = cursors + np.bincount(sequence.block_groups(block), minlength=len(cursors))
    blocks = ray.data.from_items(items)
    dataset = blocks.map_batches(_expand_blocks, batch_size=1, fn_kwargs={
        "manifest_uri": manifest_uri, "seed": seed, "num_samples": num_samples})
    dataset.context.execution_options.preserve_order = True
    return dataset
