"""Task gradients, discriminative layer selection, influence scores and the Ray scoring actor.

The definitions follow AutoMixer (Chang et al., ACL 2025, arXiv 2506.21910), with these choices:

- Task gradient: psi_{c,t} is the mean projected gradient phi over the valid examples of task t's
  influence split, computed with checkpoint c. The projection is linear, so psi is the projection
  of the mean validation-loss gradient.
- Layer discriminativeness: disc(l) = 1 - the mean cosine between the layer-l blocks of psi over
  all pairs of tasks, averaged over checkpoints. A layer where every task pulls the same way
  cannot tell tasks apart.
- Influence: I_{c,t}(x) = cos(phi_c(x), psi_{c,t}) over the kept layers (``dot`` is an option).
  Cosine is the default because raw gradient norms shrink with sample length.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from automixer_ray.config import ProjectionConfig
from automixer_ray.evaluation import max_context_length
from automixer_ray.featurize import (
    Featurizer,
    encode_task_examples,
    find_candidate_layers,
    layer_shapes,
    pad_batch,
)
from automixer_ray.projection import Projector, ProjectorIdentity

logger = logging.getLogger(__name__)

METRICS = ("cosine", "dot")


def influence_column(checkpoint_name: str, task: str) -> str:
    """Return the influence table's column name for one (checkpoint, task) pair."""
    return f"{checkpoint_name}/{task}"


def compute_task_gradients(model, tokenizer, examples_by_task: Mapping[str, Sequence[Any]],
                           featurizer: Featurizer, *, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Return psi_t [D] float32 per task: the mean projected gradient over the task's valid examples.

    Each example's target is its gold continuation only. Raises ``ValueError`` for a task with no
    valid example.
    """
    max_length = max_context_length(model)
    gradients = {}
    for task, examples in examples_by_task.items():
        total = np.zeros(featurizer.dim, dtype=np.float64)
        num_valid, reasons = 0, {}
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = featurizer.featurize(*encode_task_examples(tokenizer, chunk, max_length))
            total += batch.features[batch.valid].astype(np.float64).sum(0)
            num_valid += int(batch.valid.sum())
            for example, reason in zip(chunk, batch.reasons):
                if reason is not None:
                    reasons.setdefault(reason, []).append(example.example_id)
        if num_valid == 0:
            raise ValueError(f"task {task} has no usable example among {len(examples)} ({reasons}); "
                             "check its loader and the influence split")
        for reason, ids in reasons.items():
            logger.warning("task %s: %d example(s) skipped (%s), e.g. %s", task, len(ids), reason, ids[:5])
        gradients[task] = (total / num_valid).astype(np.float32)
        logger.info("task gradient %s: %d of %d examples, norm %.4g", task, num_valid, len(examples),
                    float(np.linalg.norm(gradients[task])))
    return gradients


@dataclass(kw_only=True)
class TaskGradients:
    """Task gradients psi_{c,t} of one checkpoint over every candidate layer."""

    layer_names: list[str]
    # Feature entries per layer (k_out * k_in); layer i owns columns [i * block_size, (i + 1) * block_size).
    block_size: int
    gradients: dict[str, np.ndarray]
    identity: ProjectorIdentity


def _pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_featurizer(model, layer_names: Sequence[str], projection: ProjectionConfig,
                     model_fingerprint: str) -> Featurizer:
    """Build a Featurizer over ``layer_names`` with the projector that ``projection`` configures."""
    projector = Projector.from_config(projection, layer_shapes(model, layer_names), model_fingerprint)
    return Featurizer(model, layer_names, projector)


def task_gradients_for_checkpoint(checkpoint_path: str, examples_by_task: Mapping[str, Sequence[Any]], *,
                                  projection: ProjectionConfig, batch_size: int = 16,
                                  allow_pickle: bool = False, trust_remote_code: bool = False) -> TaskGradients:
    """Load one checkpoint and compute its task gradients over all candidate layers."""
    from automixer_ray.checkpoints import fingerprint_checkpoint, load_model, load_tokenizer

    model = load_model(checkpoint_path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                       device=_pick_device())
    tokenizer = load_tokenizer(checkpoint_path, trust_remote_code=trust_remote_code)
    layer_names = find_candidate_layers(model, projection.layers)
    featurizer = build_featurizer(model, layer_names, projection, fingerprint_checkpoint(checkpoint_path))
    gradients = compute_task_gradients(model, tokenizer, examples_by_task, featurizer, batch_size=batch_size)
    return TaskGradients(layer_names=layer_names, block_size=featurizer.projector.block_size,
                         gradients=gradients, identity=featurizer.identity)


def _cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm > 0 else None


def layer_scores(gradients_by_checkpoint: Mapping[str, Mapping[str, np.ndarray]], layer_names: Sequence[str],
                 block_size: int) -> dict[str, float]:
    """Return disc(l) = 1 - mean pairwise cosine of the tasks' layer-l blocks, averaged over checkpoints.

    With one task there are no pairs, so every layer scores 0. A pair in which one block is zero
    counts as cosine 1, because a zero block cannot separate tasks.
    """
    if not gradients_by_checkpoint:
        raise ValueError("gradients_by_checkpoint is empty; compute task gradients for at least one checkpoint")
    totals = dict.fromkeys(layer_names, 0.0)
    for checkpoint, gradients in gradients_by_checkpoint.items():
        tasks = sorted(gradients)
        for task in tasks:
            if gradients[task].shape != (len(layer_names) * block_size,):
                raise ValueError(f"task gradient {checkpoint}/{task} has shape {gradients[task].shape}; expected "
                                 f"({len(layer_names)} layers x {block_size},)")
        if len(tasks) < 2:
            logger.warning("checkpoint %s has %d task(s): no task pairs, so every layer scores 0 and all tie",
                           checkpoint, len(tasks))
            continue
        for index, layer in enumerate(layer_names):
            columns = slice(index * block_size, (index + 1) * block_size)
            cosines = []
            for first, second in itertools.combinations(tasks, 2):
                cosine = _cosine(gradients[first][columns], gradients[second][columns])
                if cosine is None:
                    logger.warning("layer %s at %s: zero task-gradient block for %s or %s; counted as cosine 1",
                                   layer, checkpoint, first, second)
                    cosine = 1.0
                cosines.append(cosine)
            totals[layer] += 1.0 - float(np.mean(cosines))
    return {layer: total / len(gradients_by_checkpoint) for layer, total in totals.items()}


def select_layers(scores: Mapping[str, float], keep: int | float, layer_order: Sequence[str]) -> list[str]:
    """Keep the top layers by score: ``keep`` is a count (int) or a fraction in (0, 1] (rounded up).

    Ties go to the earlier layer in ``layer_order``; the result is in ``layer_order`` order.
    """
    if set(scores) != set(layer_order):
        raise ValueError(f"scores name layers {sorted(scores)} but layer_order is {list(layer_order)}; "
                         "pass the scores of exactly these layers")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep={keep!r} is invalid; use a count (int >= 1) or a fraction in (0, 1]")
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"keep={keep} is invalid; a layer count must be >= 1")
        count = keep
    else:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep} is invalid; a fraction must be in (0, 1]")
        count = math.ceil(keep * len(layer_order))
    if count > len(layer_order):
        logger.warning("keep=%s exceeds the %d candidate layers; keeping all", keep, len(layer_order))
    position = {name: index for index, name in enumerate(layer_order)}
    ranked = sorted(layer_order, key=lambda name: (-scores[name], position[name]))
    kept = set(ranked[:count])
    return [name for name in layer_order if name in kept]


def influence_scores(features: np.ndarray, task_matrix: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Return I [B, T] float32 between features [B, D] and task gradients [T, D].

    A feature row that is zero or not finite gets NaN in every column; the caller reports it.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is invalid; allowed: {', '.join(METRICS)}")
    features = np.asarray(features, dtype=np.float64)
    task_matrix = np.asarray(task_matrix, dtype=np.float64)
    if features.ndim != 2 or task_matrix.ndim != 2 or features.shape[1] != task_matrix.shape[1]:
        raise ValueError(f"features {features.shape} and task_matrix {task_matrix.shape} must be [B, D] and "
                         "[T, D] with the same D; restrict both to the same kept layers")
    row_norms = np.linalg.norm(features, axis=1)  # [B]
    bad_rows = ~np.isfinite(row_norms) | (row_norms == 0)
    safe = np.where(bad_rows[:, None], 0.0, features)
    scores = safe @ task_matrix.T  # [B, T]
    if metric == "cosine":
        task_norms = np.linalg.norm(task_matrix, axis=1)  # [T]
        if np.any(task_norms == 0):
            raise ValueError("a task gradient is zero, so cosine influence is undefined; check the task data")
        scores = scores / (np.where(bad_rows, 1.0, row_norms)[:, None] * task_norms[None, :])
    scores[bad_rows] = np.nan
    return scores.astype(np.float32)


# Messages of the RuntimeError that PyTorch raises when the CPU allocator fails (torch 2.x);
# CUDA and other accelerators raise torch.OutOfMemoryError instead.
_CPU_OOM_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Return True for an accelerator or CPU out-of-memory error raised by PyTorch."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _CPU_OOM_MESSAGES)


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def model_batches(rows: Sequence[int], lengths: Sequence[int], *, max_rows: int,
                  max_tokens: int | None = None) -> list[list[int]]:
    """Cut ``rows`` (sorted by length) into model batches of at most ``max_rows`` samples.

    With ``max_tokens``, a batch also stays within ``max_tokens`` padded tokens (its sample count
    times its longest sample). A single sample longer than ``max_tokens`` forms its own batch.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for row, length in zip(rows, lengths):
        grown = max(longest, length)
        too_many_tokens = max_tokens is not None and grown * (len(current) + 1) > max_tokens
        if current and (len(current) >= max_rows or too_many_tokens):
            batches.append(current)
            current, grown = [], length
        current.append(row)
        longest = grown
    if current:
        batches.append(current)
    return batches


def _has_skip_reason(value: Any) -> bool:
    # Ray Data turns an all-null string column into float NaN (numpy.float32) between stages, so
    # only a non-empty string is a reason.
    return isinstance(value, str) and value != ""


class ScoringActor:
    """Ray Data ``map_batches`` callable that scores corpus samples against one checkpoint's tasks.

    The checkpoint is loaded once per actor. ``identity`` is the ``ProjectorIdentity.to_dict()`` of
    the task gradients restricted to the kept layers. The actor rebuilds its own projector and
    raises :class:`ProjectorMismatchError` if the two differ, so that features never meet task
    gradients from another projection or another checkpoint.
    """

    def __init__(self, *, checkpoint_name: str, checkpoint_path: str, layer_names: list[str],
                 projection: ProjectionConfig, task_names: list[str], task_matrix: np.ndarray,
                 identity: dict, metric: str, batch_size: int, num_threads: int,
                 allow_pickle: bool = False, trust_remote_code: bool = False,
                 max_batch_tokens: int | None = None) -> None:
        from automixer_ray.checkpoints import fingerprint_checkpoint, load_model, load_tokenizer

        if metric not in METRICS:
            raise ValueError(f"metric={metric!r} is invalid; allowed: {', '.join(METRICS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid; it must be >= 1")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} is invalid; it must be >= 1 or None")
        torch.set_num_threads(max(1, int(num_threads)))
        self.checkpoint_name = checkpoint_name
        self.task_names = list(task_names)
        self.metric = metric
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        model = load_model(checkpoint_path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                           device=_pick_device())
        self.pad_id = load_tokenizer(checkpoint_path, trust_remote_code=trust_remote_code).pad_token_id
        self.max_length = max_context_length(model)
        self.featurizer = build_featurizer(model, layer_names, projection, fingerprint_checkpoint(checkpoint_path))
        ProjectorIdentity.from_dict(identity).check_compatible(self.featurizer.identity)
        self.task_matrix = np.asarray(task_matrix, dtype=np.float32)
        expected = (len(self.task_names), self.featurizer.dim)
        if self.task_matrix.shape != expected:
            raise ValueError(f"task_matrix has shape {self.task_matrix.shape}; expected {expected} "
                             f"({len(self.task_names)} tasks x {len(layer_names)} kept layers x "
                             f"{self.featurizer.projector.block_size})")
        self.columns = [influence_column(checkpoint_name, task) for task in self.task_names]
        logger.info("scoring actor for %s ready: %d layers, %d tasks, device %s", checkpoint_name,
                    len(layer_names), len(self.task_names), self.featurizer.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        input_ids = batch["input_ids"]
        num_rows = len(input_ids)
        skip_reason = np.empty(num_rows, dtype=object)
        skip_reason[:] = [value if _has_skip_reason(value) else None for value in batch["skip_reason"]]
        scores = np.full((num_rows, len(self.task_names)), np.nan, dtype=np.float32)  # [B, T]
        rows = []
        for row in range(num_rows):
            if _has_skip_reason(skip_reason[row]):
                continue
            if len(input_ids[row]) > self.max_length:
                skip_reason[row] = f"{self.checkpoint_name}:too_long:{len(input_ids[row])}>{self.max_length}"
                continue
            rows.append(row)
        # Sorting by length keeps padding short within each model batch.
        rows.sort(key=lambda row: len(input_ids[row]))
        for chunk in model_batches(rows, [len(input_ids[row]) for row in rows], max_rows=self.batch_size,
                                   max_tokens=self.max_batch_tokens):
            self._score_with_split(chunk, input_ids, scores, skip_reason)
        output = dict(batch)
        output["skip_reason"] = skip_reason
        for index, column in enumerate(self.columns):
            output[column] = scores[:, index]
        return output

    def _score_with_split(self, rows: list[int], input_ids: np.ndarray, scores: np.ndarray,
                          skip_reason: np.ndarray) -> None:
        """Score ``rows``; on out-of-memory, split them in half and retry each half.

        A single sample that still runs out of memory is skipped with the reason ``out_of_memory``.
        """
        try:
            self._score_rows(rows, input_ids, scores, skip_reason)
            return
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            _release_memory()
            max_tokens = max(len(input_ids[row]) for row in rows)
            if len(rows) == 1:
                logger.error("scoring %s: one sample of %d tokens ran out of memory (%s); skipping it as "
                             "out_of_memory", self.checkpoint_name, max_tokens, _first_line(error))
                skip_reason[rows[0]] = f"{self.checkpoint_name}:out_of_memory"
                return
            half = len(rows) // 2
            logger.warning("scoring %s: a batch of %d samples (up to %d tokens each) ran out of memory (%s); "
                           "retrying as %d + %d samples", self.checkpoint_name, len(rows), max_tokens,
                           _first_line(error), half, len(rows) - half)
        self._score_with_split(rows[:half], input_ids, scores, skip_reason)
        self._score_with_split(rows[half:], input_ids, scores, skip_reason)

    def _featurize(self, ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.featurizer.featurize(ids, attention_mask, attention_mask)

    def _score_rows(self, rows: list[int], input_ids: np.ndarray, scores: np.ndarray,
                    skip_reason: np.ndarray) -> None:
        ids, attention_mask = pad_batch([np.asarray(input_ids[row]) for row in rows], self.pad_id)
        features = self._featurize(ids, attention_mask)
        chunk_scores = influence_scores(features.features, self.task_matrix, self.metric)  # [b, T]
        for position, row in enumerate(rows):
            reason = features.reasons[position]
            if reason is None and not np.all(np.isfinite(chunk_scores[position])):
                reason = "zero_gradient"
            if reason is None:
                scores[row] = chunk_scores[position]
            else:
                skip_reason[row] = f"{self.checkpoint_name}:{reason}"
